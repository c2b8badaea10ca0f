"""T2I style adapter units in a generation: each unit's picture becomes style tokens once per generation (CLIP
ViT-L/14's last hidden states through the StyleAdapter), and at each step where units act, their tokens are appended
to the text context that the UNet, the ControlNets and the reference pass read.

The rule is the original's (TencentARC T2I-Adapter, `ldm/inference_base.py` + `ldm/models/diffusion/ddim.py`,
`append_to_context`): the tokens of the acting units, each times its scale, are joined in unit order and appended to
the conditional context; the unconditional context is lengthened by as many of its own last tokens, so both halves
keep one length. The A1111 extension (hook.py) appends the same scaled tokens but pads the unconditional half with
zeros (its cond mark); we follow the original, whose pictures the adapter was trained and published with. Both act
on the steps from the unit's start to its end (the original has only the end: `style_cond_tau`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cldm.models.t2i_adapter import StyleControl
from cldm.pipeline.conditioning import Conditioning
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.vocabulary import ControlMode

TEXT_TOKENS = 77  # one chunk of the prompt's context


def is_style(model: object) -> bool:
    return isinstance(model, StyleControl)


def style_problems(r: GenerationRequest, u: ControlUnit, who: str) -> list[str]:
    """Why this style unit cannot run: it reads a picture, on the whole image, in the balanced mode."""
    out = []
    tokens = sum(v.model.cfg.num_tokens for v in r.units if is_style(v.model))
    if tokens > TEXT_TOKENS:  # the unconditional half is padded with that many of its own last tokens
        out.append(f"{who}: the style adapters add {tokens} tokens; at most {TEXT_TOKENS} fit")
    if not isinstance(u.hint, np.ndarray):
        out.append(f"{who}: a T2I style adapter reads a picture (HxWx3 uint8) as its hint, not a tensor")
    if u.mode is not ControlMode.BALANCED or u.global_average_pooling:
        out.append(f"{who}: control modes and global average pooling are for ControlNets; a T2I style adapter "
                   "takes the balanced mode")  # fmt: skip
    if u.mask is not None:
        out.append(f"{who}: a T2I style adapter's tokens act on the whole picture; it takes no region mask")
    return out


def style_tokens(model: StyleControl, picture: np.ndarray) -> torch.Tensor:
    """(1, tokens, context width) for the unit's picture, on the model's device and dtype."""
    return model.tokens(picture)


def with_style(ctx: Conditioning, r: GenerationRequest, embedded: list, on: list[bool]) -> Conditioning:
    """The conditioning with the tokens of the style units acting at this step (`on[i]`; `embedded[i]`: unit i's
    tokens from `style_tokens`) appended; `ctx` itself when none acts."""
    parts = [t * u.scale for u, t, o in zip(r.units, embedded, on) if o and is_style(u.model)]
    if not parts:
        return ctx
    style = torch.cat(parts, dim=1).to(ctx.cond.dtype)  # (1, n, width)
    n = style.shape[1]
    cond = torch.cat([ctx.cond, style.expand(ctx.cond.shape[0], -1, -1)], dim=1)
    uncond = torch.cat([ctx.uncond, ctx.uncond[:, -n:]], dim=1)  # the original's padding: its own last n tokens
    return replace(ctx, uncond=uncond, cond=cond, full=torch.cat([uncond, cond]) if r.use_cfg else cond)
