"""The effective region of a control unit: a mask (white = where the unit acts) that its residuals are multiplied by.

The rule is the A1111 extension's (sd-webui-controlnet: `ControlParams.apply_effective_region_mask` in
scripts/hook.py, the mask made in scripts/controlnet.py):

- the mask picture becomes floats in [0, 1] (value / 255) and only its first channel is read: (1, 1, H, W);
- at every step, each residual of the unit (already times its scale, soft-injection scales included) is multiplied
  by the mask resized to that residual's height and width, bilinearly (`F.interpolate`, align_corners False, no
  antialiasing). The mask is stretched to each level whatever its own size and aspect: it is not fitted by a resize
  mode as hints are;
- the same mask multiplies both halves of the guidance batch (it broadcasts over the batch); a "ControlNet is more
  important" unit has zeros in the unconditional half, which stay zeros.

So a level's cell whose pixels are all black gets exactly zero, one whose pixels are all white is unchanged, and the
cells on the border are blended. One difference: our ControlNets pool their residuals (global average pooling, the
shuffle model) inside the model, so for them the mask multiplies the pooled residuals; the extension pools after.

`apply_region_mask` is the one place a unit's residuals meet its mask: every kind of control unit calls it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cldm.pipeline.request import GenerationRequest

MASK_CHANNELS = (1, 3, 4)  # grey, RGB or RGBA pictures: the first channel is read


def mask_problems(mask) -> list[str]:
    """What is wrong with a unit's region mask (empty when it is fine or absent), each naming the field."""
    if mask is None:
        return []
    if isinstance(mask, torch.Tensor):
        if mask.ndim != 4 or mask.shape[:2] != (1, 1) or 0 in mask.shape or not mask.is_floating_point():
            return [f"mask tensor must be (1, 1, H, W) floats (got {mask.dtype} {tuple(mask.shape)})"]
        lo, hi = float(mask.min()), float(mask.max())
        return [] if 0 <= lo and hi <= 1 else [f"mask values must be 0..1 (got {lo:g}..{hi:g})"]
    if not isinstance(mask, np.ndarray):
        return [f"mask must be a picture: an HxW or HxWx3 array, white where the unit acts (got {type(mask).__name__})"]
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] not in MASK_CHANNELS) or 0 in mask.shape:
        return [f"mask must be an HxW or HxWx3 picture (got shape {mask.shape})"]
    if mask.dtype == np.uint8 or mask.dtype == np.bool_:
        return []
    if not np.issubdtype(mask.dtype, np.floating):
        return [f"mask must be uint8 (0..255), bool or floats in 0..1 (got {mask.dtype})"]
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        return [f"mask floats must be finite and 0..1 (got {np.nanmin(mask):g}..{np.nanmax(mask):g})"]
    return []


def mask_tensor(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A valid region mask as (1, 1, H, W) float32 in [0, 1]: uint8 / 255, the first channel of a picture."""
    if isinstance(mask, torch.Tensor):
        return mask.float()
    plane = mask if mask.ndim == 2 else mask[..., 0]
    values = plane.astype(np.float32) / 255 if plane.dtype == np.uint8 else plane.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(values))[None, None]


def apply_region_mask(residuals: list[torch.Tensor], mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each residual (b, c, h, w) times `mask` (1, 1, H, W) resized bilinearly to (h, w); the same list without one."""
    if mask is None:
        return residuals
    sized: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for r in residuals:
        size = tuple(r.shape[-2:])
        if size not in sized:
            m = mask.to(r.device, torch.float32)
            sized[size] = F.interpolate(m, size=size, mode="bilinear", align_corners=False).to(r.dtype)
        out.append(r * sized[size])
    return out


def with_region_masks(r: GenerationRequest, device: torch.device) -> GenerationRequest:
    """The request with each unit's mask as a (1, 1, H, W) float32 tensor on the model's device: converted once per
    generation, not at every step (the hires pass keeps them: they are resized per residual)."""
    if all(u.mask is None for u in r.units):
        return r
    units = tuple(u if u.mask is None else replace(u, mask=mask_tensor(u.mask).to(device)) for u in r.units)
    return replace(r, units=units)
