"""The app's picture widgets' values as pictures: uploads, drawing canvases, and painted inpaint masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cldm.errors import InputError
from cldm.images import array_to_rgb, load_rgb, resize_rgb


def editor_image(value) -> np.ndarray | None:
    """Image or ImageEditor value -> HxWx3 uint8 (None when nothing was given). Drawn strokes are composited."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return load_rgb(value)
    if isinstance(value, dict):
        value = value.get("composite") if value.get("composite") is not None else value.get("background")
        if value is None:
            return None
    return array_to_rgb(np.asarray(value))


def inpaint_hint(value, width: int, height: int):
    """ImageEditor (background + painted layers) -> init picture, mask (255 = repaint) and the inpaint hint."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise InputError("Inpaint: upload a picture, then paint over the area to change.")
    init = resize_rgb(array_to_rgb(np.asarray(value["background"])), width, height)
    mask = np.zeros(init.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3:
            alpha = layer[..., 3] if layer.shape[2] == 4 else layer.max(axis=-1)
        else:
            alpha = layer
        mask |= resize_rgb(array_to_rgb(alpha), width, height)[..., 0] > 127
    if not mask.any():
        raise InputError("Inpaint: paint over the area to change (the mask is empty).")
    hint = init.astype(np.float32) / 255.0
    hint[mask] = -1.0  # the inpaint ControlNet reads -1 as "to be filled"
    return init, mask.astype(np.uint8) * 255, torch.from_numpy(hint).permute(2, 0, 1)[None]
