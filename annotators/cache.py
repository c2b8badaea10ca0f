"""Load each detector once per (kind, models_dir) and keep it: loading is slow, running is not."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from annotators.errors import AnnotatorError, MissingAnnotatorWeights
from annotators.weights import WeightFile, resolve

log = logging.getLogger(__name__)

# One lock for all loads: two requests for the same detector must not both spend seconds loading it, and loads are
# rare enough that serialising different detectors costs nothing noticeable. Inference runs outside the lock.
_lock = threading.Lock()
_loaded: dict[tuple[str, str], Any] = {}


def _key(kind: str, models_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    return (kind, "" if models_dir is None else str(Path(models_dir).resolve()))


def is_loaded(kind: str, models_dir: str | os.PathLike[str] | None) -> bool:
    """Whether `kind` is already in memory for this models_dir."""
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
    detector = _loaded.get(key)
    if detector is not None:
        return detector
    with _lock:
        detector = _loaded.get(key)
        if detector is not None:
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
        return detector


def clear() -> None:
    """Forget every loaded detector (tests, or to free memory)."""
    with _lock:
        _loaded.clear()
