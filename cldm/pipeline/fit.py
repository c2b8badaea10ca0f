"""Resize modes: how a picture of another shape becomes the picture size (A1111's ControlNet resize modes).

- "just" (Just Resize): stretched to the size; the aspect ratio is not kept.
- "crop" (Crop and Resize, the default): scaled until it covers the size (`max` of the two factors), then the
  centre is cut out.
- "fill" (Resize and Fill): scaled until it fits inside (`min` of the factors), centred, and the border filled: a hint
  with the median colour of its own border (as the extension does), an init picture by repeating its edge pixels
  (A1111's img2img), an inpaint mask and an inpaint hint with "to be painted", so inpainting there is outpainting.

The same mode is applied to a request's hints, init picture and mask, so their pixels stay in register. Sizes after
scaling are rounded as the extension rounds them (`round(side * k)`); when the shape already matches, every mode is a
plain resize.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cldm.io.images import mask_values, resize_rgb
from cldm.pipeline.vocabulary import ResizeMode

# Every function takes a ResizeMode or any name `ResizeMode.parse` reads ("crop", "Crop and Resize").
Mode = ResizeMode | str


def geometry(src_w: int, src_h: int, width: int, height: int, mode: Mode) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, x offset, y offset) of the source inside the target.

    "crop": the offsets are where the cut starts in the scaled picture; "fill": where it sits on the canvas."""
    mode = ResizeMode.parse(mode)
    if mode is ResizeMode.JUST:
        return width, height, 0, 0
    k0, k1 = height / src_h, width / src_w
    k = max(k0, k1) if mode is ResizeMode.CROP else min(k0, k1)
    w, h = max(1, int(round(src_w * k))), max(1, int(round(src_h * k)))
    if mode is ResizeMode.CROP:
        return w, h, max(0, (w - width) // 2), max(0, (h - height) // 2)
    return w, h, max(0, (width - w) // 2), max(0, (height - h) // 2)


def _place(scaled: np.ndarray, width: int, height: int, mode: Mode, ox: int, oy: int, background) -> np.ndarray:
    if ResizeMode.parse(mode) is ResizeMode.CROP:
        return scaled[oy : oy + height, ox : ox + width]
    if isinstance(background, str):  # "edge": the border pixels repeated outwards
        h, w = scaled.shape[:2]
        pads = ((oy, height - h - oy), (ox, width - w - ox)) + ((0, 0),) * (scaled.ndim - 2)
        return np.pad(scaled, pads, mode="edge")
    out = np.empty((height, width, *scaled.shape[2:]), scaled.dtype)
    out[...] = background
    out[oy : oy + scaled.shape[0], ox : ox + scaled.shape[1]] = scaled
    return out


def border_median(img: np.ndarray) -> np.ndarray:
    """The median colour of the picture's outermost rows and columns (the extension's fill colour for hints)."""
    borders = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    return np.median(borders, axis=0).astype(img.dtype)


def fit_rgb(img: np.ndarray, width: int, height: int, mode: Mode = ResizeMode.CROP, fill: str = "median") -> np.ndarray:
    """HxWx3 uint8 -> height x width x 3 by `mode`; `fill` is "median" (hints) or "edge" (init pictures)."""
    src_h, src_w = img.shape[:2]
    w, h, ox, oy = geometry(src_w, src_h, width, height, mode)
    if (w, h) == (width, height):
        return resize_rgb(img, width, height)
    background = "edge" if fill == "edge" else border_median(img)
    return np.ascontiguousarray(_place(resize_rgb(img, w, h), width, height, mode, ox, oy, background))


def fit_mask(mask: np.ndarray, width: int, height: int, mode: Mode = ResizeMode.CROP, outside: int = 255) -> np.ndarray:
    """HxW mask (any scale, white = repaint) -> height x width uint8 0/255; "fill" marks the new border `outside`
    (255: painted, so inpainting with "Resize and Fill" outpaints)."""
    m = mask_values(mask)
    m = ((m > 0.5) * 255).astype(np.uint8)
    src_h, src_w = m.shape
    w, h, ox, oy = geometry(src_w, src_h, width, height, mode)
    scaled = m if (src_w, src_h) == (w, h) else np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
    if (w, h) == (width, height):
        return scaled
    return np.ascontiguousarray(_place(scaled, width, height, mode, ox, oy, np.uint8(outside)))


def fit_tensor(
    t: torch.Tensor, width: int, height: int, mode: Mode = ResizeMode.CROP, outside: float = -1.0
) -> torch.Tensor:
    """(1, C, H, W) float hint (an inpaint hint: -1 marks the pixels to paint) -> (1, C, height, width), bilinear;
    "fill" fills the new border with `outside` (-1: to be painted)."""
    src_h, src_w = t.shape[-2:]
    w, h, ox, oy = geometry(src_w, src_h, width, height, mode)
    scaled = t if (src_h, src_w) == (h, w) else F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    if (w, h) == (width, height):
        return scaled
    if ResizeMode.parse(mode) is ResizeMode.CROP:
        return scaled[..., oy : oy + height, ox : ox + width]
    out = torch.full((*t.shape[:-2], height, width), outside, dtype=t.dtype)
    out[..., oy : oy + h, ox : ox + w] = scaled
    return out


def pixel_perfect_resolution(src_w: int, src_h: int, width: int, height: int, mode: Mode = ResizeMode.CROP) -> int:
    """The preprocessor resolution (its short side) at which the hint comes out at the picture's own scale: the
    extension's rule, `round(k * short side)` with k the factor the resize mode applies ("fill" the smaller of the
    two, the others the larger)."""
    k0, k1 = height / src_h, width / src_w
    k = min(k0, k1) if ResizeMode.parse(mode) is ResizeMode.FILL else max(k0, k1)
    return int(np.round(k * min(src_w, src_h)))


def picture_size(src_w: int, src_h: int, longest: int, smallest: int = 64, multiple: int = 8) -> tuple[int, int]:
    """(width, height) for "use the picture's size": the picture's own size, scaled down when its long side is over
    `longest` (up when its short side is under `smallest`), keeping the aspect ratio, each side a multiple of 8."""
    k = min(1.0, longest / max(src_w, src_h))
    k = max(k, smallest / min(src_w, src_h))

    top, bottom = longest // multiple * multiple, -(-smallest // multiple) * multiple

    def side(v: float) -> int:
        return int(min(top, max(bottom, round(v * k / multiple) * multiple)))

    return side(src_w), side(src_h)
