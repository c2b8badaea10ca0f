"""Load each detector once per (kind, models_dir) and keep the most recently used ones: loading is slow, running
is not. The cache is bounded (`MAX_LOADED`, env CLDM_MAX_DETECTORS) and every access holds its lock."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from annotators.errors import AnnotatorError, MissingAnnotatorWeights
from annotators.weights import WeightFile, resolve

log = logging.getLogger(__name__)

# One lock for all loads: two requests for the same detector must not both spend seconds loading it, and loads are
# rare enough that serialising different detectors costs nothing noticeable. Inference runs outside the lock.
_lock = threading.Lock()
_loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()  # least recently used first
# Detectors weigh 5 MB (MLSD) to 2.5 GB (SAM); four cover a user moving between a few tabs.
MAX_LOADED = max(1, int(os.environ.get("CLDM_MAX_DETECTORS", "4")))


def _key(kind: str, models_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    return (kind, "" if models_dir is None else str(Path(models_dir).resolve()))


def is_loaded(kind: str, models_dir: str | os.PathLike[str] | None) -> bool:
    """Whether `kind` is already in memory for this models_dir."""
    with _lock:
        return _key(kind, models_dir) in _loaded


def cached_load(
    kind: str,
    files: Sequence[WeightFile],
    build: Callable[[list[Path]], Any],
    models_dir: str | os.PathLike[str] | None,
    annotator: str,
) -> Any:
    """Return the detector `kind`, building it from the resolved `files` on first use.

    The key includes models_dir so that a different models folder is honoured. Errors while reading a file that
    exists (truncated download, wrong file) become AnnotatorError naming the file.
    """
    key = _key(kind, models_dir)
    with _lock:
        detector = _loaded.get(key)
        if detector is not None:
            _loaded.move_to_end(key)
            return detector
        paths = resolve(files, models_dir, annotator)
        log.info("loading annotator %s from %s", kind, ", ".join(str(p) for p in paths))
        try:
            detector = build(paths)
        except MissingAnnotatorWeights:
            raise
        except Exception as exc:  # torch/pickle/shape errors all mean "this file is not usable"
            names = ", ".join(str(p) for p in paths)
            raise AnnotatorError(
                f"Could not load the weights of '{annotator}' from {names}: {type(exc).__name__}: {exc}. "
                "The file may be truncated or not the right one; download it again."
            ) from exc
        _loaded[key] = detector
        while len(_loaded) > MAX_LOADED:
            dropped, _ = _loaded.popitem(last=False)
            log.info("dropped annotator %s from memory (more than %d loaded)", dropped[0], MAX_LOADED)
        return detector


def loaded() -> list[tuple[str, str]]:
    """The (kind, models_dir) keys in memory, least recently used first."""
    with _lock:
        return list(_loaded)


def clear() -> None:
    """Forget every loaded detector (tests, or to free memory)."""
    with _lock:
        _loaded.clear()
