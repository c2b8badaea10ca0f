"""Region masks for IP-Adapters: where in the picture an image prompt acts, by diffusers' IPAdapterMaskProcessor rule.

The mask (HxW, white = the image prompt acts) is resized to the picture size with Lanczos, as an 8-bit grey picture,
and cut at one half into 0 / 1. In each cross-attention layer the mask is resized (bicubic, so values near an edge
overshoot a little past 0 and 1, as there) to a grid of as many cells as the layer has queries, with the mask's
aspect ratio, and multiplies the adapter's attention output row by row before its scale. With the picture's aspect
ratio the grid is the layer's own; with another the cells are laid out row-major all the same, padded with 0 or cut
off at the end (diffusers warns and does the same).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BINARY_CUT = 0.5  # grey levels at or above half of white are inside


def mask_problem(mask: object) -> str | None:
    """Why `mask` is no region mask (an HxW uint8 or bool array), or None."""
    if not isinstance(mask, np.ndarray):
        return f"must be an HxW array (got {type(mask).__name__})"
    if mask.ndim != 2 or 0 in mask.shape:
        return (f"must be HxW, one grey level per pixel (got shape {mask.shape}); give a grey picture, or one "
                "channel of a colour one")  # fmt: skip
    if mask.dtype not in (np.uint8, np.bool_):
        return f"must be uint8 (0-255, white = where it acts) or bool (got {mask.dtype})"
    return None


def fitted_mask(mask: np.ndarray, width: int, height: int) -> torch.Tensor:
    """The mask at the picture size, 0 or 1: (1, height, width) float32."""
    grey = mask.astype(np.uint8) * 255 if mask.dtype == np.bool_ else mask
    resized = Image.fromarray(grey, mode="L").resize((width, height), resample=Image.LANCZOS)
    out = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    return (out >= BINARY_CUT).float()[None]


def mask_for_queries(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """The fitted mask (1, H, W) on an attention layer's `queries` rows: (queries, 1), to multiply its output."""
    h, w = mask.shape[1:]
    rows = int(math.sqrt(queries / (w / h)))
    rows += int(queries % rows != 0)  # a grid that does not fill the queries exactly takes one row more
    cols = queries // rows
    small = F.interpolate(mask[None], size=(rows, cols), mode="bicubic")[0].reshape(-1)  # (rows * cols,)
    if small.numel() < queries:
        small = F.pad(small, (0, queries - small.numel()))
    return small[:queries, None]
