"""T2I-Adapter units in a generation: each adapter reads its hint once, and at every step the features of the units
active there, each times its scale, are summed and added to the UNet's encoder (diffusers' MultiAdapter with
weights, its `adapter_conditioning_factor` being the unit's `end`).
"""

from __future__ import annotations

import torch
from torch import nn

from cldm.models.sd import StableDiffusion
from cldm.models.t2i_adapter import SPATIAL, T2I_ADAPTERS, StyleAdapter, fit_problem, injection_points
from cldm.pipeline.regions import apply_region_mask
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.t2i_style import is_style, style_problems
from cldm.pipeline.vocabulary import ControlMode

# ITU-R 601 luma, as PIL's "L" conversion: what a 1-channel (sketch / canny) adapter reads of an RGB hint
GREY = (0.299, 0.587, 0.114)


def is_adapter(model: object) -> bool:
    return isinstance(model, T2I_ADAPTERS)


def unit_problems(model: StableDiffusion, r: GenerationRequest, i: int, u: ControlUnit) -> list[str]:
    """Why this T2I-Adapter unit cannot run on `model` with request `r` (its number `i` in messages)."""
    who = f"ControlNet {i + 1} ({u.label})"
    if (why := fit_problem(u.model, model.config.unet, model.family.name, model.latent_factor)) is not None:
        return [f"{who} does not fit this base model: {why}. Use a T2I-Adapter made for {model.family.name} models."]
    if isinstance(u.model, StyleAdapter):
        return [f"{who} is a T2I style adapter without its CLIP image encoder: load it through the ModelManager "
                "(it finds CLIP ViT-L/14) or with cldm.io.clip_vision.style_control."]  # fmt: skip
    if is_style(u.model):
        return style_problems(r, u, who)
    out = []
    if r.width % u.model.cfg.unshuffle or r.height % u.model.cfg.unshuffle:
        out.append(f"{who}: a T2I-Adapter needs width and height in multiples of {u.model.cfg.unshuffle} "
                   f"(got {r.width}x{r.height})")  # fmt: skip
    if u.mode is not ControlMode.BALANCED or u.global_average_pooling:
        out.append(f"{who}: control modes and global average pooling are for ControlNets; a T2I-Adapter takes "
                   "the balanced mode")  # fmt: skip
    return out


def hint_features(adapter: nn.Module, hint: torch.Tensor) -> list[torch.Tensor]:
    """The adapter's features of a (1, 3, H, W) hint in [0, 1]; a 1-channel adapter reads the hint's grey."""
    weight = next(adapter.parameters())
    hint = hint.to(weight.device, weight.dtype)
    if adapter.cfg.hint_channels == 1:
        hint = sum(c * hint[:, i : i + 1] for i, c in enumerate(GREY))
    return adapter(hint)


def encoder_additions(
    model: StableDiffusion, r: GenerationRequest, features: list, active: list[bool], batch: int
) -> dict[int, torch.Tensor] | None:
    """The summed features of the adapter units `active` at this step (`features[i]`: unit i's, from
    `hint_features`), by UNet input block, for a batch of `batch` rows (both guidance halves get them, as diffusers
    does); None when none acts."""
    out: dict[int, torch.Tensor] = {}
    for u, feats, on in zip(r.units, features, active):
        if not on or u.scale == 0 or not isinstance(u.model, SPATIAL):  # style tokens go to the context instead
            continue
        blocks = injection_points(u.model.cfg, model.config.unet)
        # the unit's region multiplies its features as it does a ControlNet's residuals (the extension's hook)
        scaled = apply_region_mask([f * u.scale for f in feats], u.mask)
        for block, f in zip(blocks, scaled):
            add = f.expand(batch, -1, -1, -1)
            out[block] = add if block not in out else out[block] + add
    return out or None
