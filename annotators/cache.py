"""Load each detector once per (kind, models_dir, device) and keep the most recently used ones: loading is slow,
running is not. The cache is bounded by count (`MAX_LOADED`, env CLDM_MAX_DETECTORS) and by the weights' bytes
(`MAX_BYTES`, env CLDM_DETECTOR_GB), and every access holds its lock. Detectors run on the device the app sets with
`use_device` (the model manager's: a GPU server runs depth, pose, HED ... on the GPU too)."""

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
MAX_BYTES = int(float(os.environ.get("CLDM_DETECTOR_GB", "4")) * 1024**3)  # the newest one stays, whatever its size
_device = "cpu"


def use_device(device) -> None:
    """Run detectors on `device` from now on (those loaded for another device are loaded again when used)."""
    global _device
    with _lock:
        _device = str(device)


def current_device() -> str:
    return _device


def _modules(detector: Any) -> list:
    """The torch modules a detector holds: itself, its attributes, a dict's values (the pose parts)."""
    import torch

    items = list(detector.values()) if isinstance(detector, dict) else [detector]
    found = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            found.append(item)
        else:
            found += (
                [v for v in vars(item).values() if isinstance(v, torch.nn.Module)] if hasattr(item, "__dict__") else []
            )
    return found


def detector_bytes(detector: Any) -> int:
    return sum(p.numel() * p.element_size() for m in _modules(detector) for p in m.parameters())


def _place(detector: Any, device: str) -> Any:
    """Move a built detector's networks to `device` (controlnet-aux's detectors then send their inputs there)."""
    if device != "cpu":
        for m in _modules(detector):
            m.to(device)
    return detector


def _key(kind: str, models_dir: str | os.PathLike[str] | None) -> tuple[str, str, str]:
    return (kind, "" if models_dir is None else str(Path(models_dir).resolve()), _device)


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
            detector = _place(build(paths), key[2])
        except MissingAnnotatorWeights:
            raise
        except Exception as exc:  # torch/pickle/shape errors all mean "this file is not usable"
            names = ", ".join(str(p) for p in paths)
            raise AnnotatorError(
                f"Could not load the weights of '{annotator}' from {names}: {type(exc).__name__}: {exc}. "
                "The file may be truncated or not the right one; download it again."
            ) from exc
        _loaded[key] = detector
        while len(_loaded) > 1 and (
            len(_loaded) > MAX_LOADED or sum(detector_bytes(d) for d in _loaded.values()) > MAX_BYTES
        ):
            dropped, _ = _loaded.popitem(last=False)
            log.info("dropped annotator %s from memory (over %d loaded or %.1f GB)", dropped[0], MAX_LOADED,
                     MAX_BYTES / 1024**3)  # fmt: skip
        return detector


def loaded() -> list[tuple[str, str, str]]:
    """The (kind, models_dir, device) keys in memory, least recently used first."""
    with _lock:
        return list(_loaded)


def clear() -> None:
    """Forget every loaded detector (tests, or to free memory)."""
    with _lock:
        _loaded.clear()
