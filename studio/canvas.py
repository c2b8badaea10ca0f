"""The app's picture widgets' values as pictures: uploads, drawing canvases, and painted inpaint masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cldm.errors import InputError
from cldm.io.images import array_to_rgb, load_rgb, resize_rgb
from cldm.pipeline.fit import fit_mask, fit_rgb


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


def inpaint_hint(value, width: int, height: int, resize_mode: str = "crop"):
    """ImageEditor (background + painted layers) -> init picture, mask (255 = repaint) and the inpaint hint, fitted
    to the size by `resize_mode` ("fill" marks the new border painted: outpainting)."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise InputError("Inpaint: upload a picture, then paint over the area to change.")
    background = array_to_rgb(np.asarray(value["background"]))
    painted = np.zeros(background.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3:
            alpha = layer[..., 3] if layer.shape[2] == 4 else layer.max(axis=-1)
        else:
            alpha = layer
        painted |= resize_rgb(array_to_rgb(alpha), background.shape[1], background.shape[0])[..., 0] > 127
    init = fit_rgb(background, width, height, resize_mode, fill="edge")
    mask = fit_mask(painted.astype(np.uint8) * 255, width, height, resize_mode) > 127
    if not mask.any():
        raise InputError(
            "Inpaint: paint over the area to change (the mask is empty), or outpaint with Resize and Fill."
        )
    hint = init.astype(np.float32) / 255.0
    hint[mask] = -1.0  # the inpaint ControlNet reads -1 as "to be filled"
    return init, mask.astype(np.uint8) * 255, torch.from_numpy(hint).permute(2, 0, 1)[None]
