"""Checking the input image and bringing hints back to the input's size."""

from __future__ import annotations

import cv2
import numpy as np

from annotators.errors import AnnotatorError

MIN_RESOLUTION = 64
MAX_RESOLUTION = 2048
# Detectors scale the short side up to the resolution: a 60000x8 strip would become gigapixels. The same bounds as
# cldm.io.images (kept apart: the annotators never import cldm).
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 1, 16384, 8.0


def as_rgb(image: object) -> np.ndarray:
    """Return `image` as a contiguous HxWx3 uint8 RGB array, or raise AnnotatorError saying what is wrong.

    HxW (grey) and HxWx4 (RGBA, composited on white as controlnet-aux does) are accepted too, because browser
    canvases and PNG uploads produce them; anything else is refused.
    """
    if not isinstance(image, np.ndarray):
        raise AnnotatorError(f"The image must be a numpy array, got {type(image).__name__}.")
    if image.dtype != np.uint8:
        raise AnnotatorError(f"The image must be uint8 (0..255), got dtype {image.dtype}.")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise AnnotatorError(f"The image must be HxWx3 RGB, got shape {tuple(image.shape)}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise AnnotatorError(f"The image is empty (shape {tuple(image.shape)}).")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE or max(h, w) / min(h, w) > MAX_ASPECT:
        raise AnnotatorError(
            f"The image is {w}x{h} px: each side must be {MIN_SIDE}..{MAX_SIDE} px and at most {MAX_ASPECT:g}:1 "
            "between them. Crop or resize it first."
        )
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 4:
        color = image[:, :, :3].astype(np.float32)
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).round().clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def check_resolution(resolution: object) -> int:
    """The detection resolution (short side, pixels) as an int, or AnnotatorError."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float, np.integer, np.floating)):
        raise AnnotatorError(f"resolution must be a number, got {resolution!r}.")
    if not (MIN_RESOLUTION <= float(resolution) <= MAX_RESOLUTION):
        raise AnnotatorError(f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {resolution}.")
    return int(resolution)


def to_size(hint: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    """Resize a detector's output to height x width and make it HxWx3 uint8.

    Detectors work at `resolution` on the short side rounded to multiples of 64, so their output is almost never
    the input's size. Linear interpolation is what the ControlNet 1.1 apps use; `nearest` keeps label colours
    (segmentation) exact.
    """
    hint = np.asarray(hint)
    if hint.dtype != np.uint8:
        hint = hint.clip(0, 255).astype(np.uint8)
    if hint.ndim == 2:
        hint = hint[:, :, None]
    if hint.shape[2] == 1:
        hint = np.repeat(hint, 3, axis=2)
    if hint.shape[:2] != (height, width):
        interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        hint = cv2.resize(hint, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(hint[:, :, :3])
