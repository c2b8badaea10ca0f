"""How the UNet's predictions of one step become the one the sampler takes: classifier-free guidance, its rescale
and perturbed-attention guidance (PAG), each as diffusers computes it.

- CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4; diffusers'
  `guidance_rescale`): the guided prediction is rescaled to the standard deviation of the conditional one (per
  picture) and mixed with itself, `phi * rescaled + (1 - phi) * guided`. It acts on what the UNet predicts (the noise,
  or v for v models) and only with guidance on (cfg_scale > 1).
- PAG (Ahn et al. 2024; diffusers' PAG pipelines): the conditional rows run once more with the self-attention of the
  chosen layers replaced by the identity (a layer returns its value projection, out(v(x))), and
  `uncond + cfg * (cond - uncond) + pag * (cond - perturbed)` is taken (`cond + pag * (cond - perturbed)` without
  guidance). The perturbed rows read what the conditional rows read: the same text, vector conditioning, ControlNet
  residuals, adapter features and image-prompt tokens (diffusers runs its ControlNets on the perturbed rows with the
  conditional rows' inputs, which gives the same residuals). `pag_adaptive_scale` lowers the scale as the timestep
  falls: max(0, pag - adaptive * (1000 - t)).

PAG's layers are named as diffusers names them: each name is a regular expression searched in the diffusers module
names of the UNet's self-attention layers ("mid", "down_blocks.1", "up_blocks.0.attentions.0", "down" ...); the
older spellings "down.block_1" and "up.block_0.attentions_0" are read as "down_blocks.1" and "up_blocks.0.attentions.0".
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from cldm.io.keymaps import unet_modules
from cldm.models.attention import AttentionProcessor, CrossAttention, processors_set
from cldm.models.freeu import FreeU
from cldm.models.unet import UNet

if TYPE_CHECKING:
    from cldm.pipeline.request import GenerationRequest

PAG_DEFAULT_LAYERS = ("mid",)  # diffusers' default: the middle block's self-attention
MAX_PAG_SCALE = 100.0
ADAPTIVE_FROM = 1000  # diffusers' adaptive PAG scale counts timesteps down from here
_OLD_BLOCK = re.compile(r"\b(down|up)\.block_(\d+)")  # diffusers' first PAG spelling, "down.block_1"
_OLD_ATTENTION = re.compile(r"\battentions_(\d+)")


# ------------------------------------------------------------------------------------------------ the request
def guidance_problems(r: GenerationRequest) -> list[str]:
    """What is wrong with the request's guidance extras (`number_problems` has told non-numbers apart first)."""
    out = []
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    if number(r.cfg_rescale) and not 0 <= r.cfg_rescale <= 1:
        out.append(f"cfg_rescale must be 0..1 (got {r.cfg_rescale})")
    if number(r.pag_scale) and not 0 <= r.pag_scale <= MAX_PAG_SCALE:
        out.append(f"pag_scale must be 0..{MAX_PAG_SCALE:g} (got {r.pag_scale})")
    if number(r.pag_adaptive_scale) and r.pag_adaptive_scale < 0:
        out.append(f"pag_adaptive_scale must be 0 or more (got {r.pag_adaptive_scale})")
    out += pag_layer_problems(r.pag_layers)
    if number(r.pag_scale) and r.pag_scale > 0 and isinstance(r.pag_layers, tuple) and not r.pag_layers:
        out.append("pag_layers: give at least one layer for pag_scale above 0 (diffusers' default: 'mid')")
    if number(r.pag_scale) and r.pag_scale > 0 and r.reference is not None:
        out.append("pag_scale: perturbed-attention guidance does not combine with reference-only control; "
                   "leave one of them out")  # fmt: skip
    if r.freeu is not None:
        out += r.freeu.problems() if isinstance(r.freeu, FreeU) else [
            f"freeu must be a FreeU(b1, b2, s1, s2) or None (got {type(r.freeu).__name__})"]  # fmt: skip
    return out


def pag_layer_problems(layers: object) -> list[str]:
    """What is wrong with `pag_layers` as written (names, not yet the model's layers); empty when fine."""
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        return [f"pag_layers must be a list of layer names such as 'mid', 'down_blocks.1' (got {layers!r})"]
    out = []
    for name in layers:
        if not isinstance(name, str) or not name.strip():
            out.append(f"pag_layers: {name!r} is not a layer name ('mid', 'down_blocks.1', 'up_blocks.0.attentions.0')")
            continue
        try:
            re.compile(diffusers_layer_id(name))
        except re.error as e:
            out.append(f"pag_layers: {name!r} is not a valid pattern ({e})")
    return out


def diffusers_layer_id(name: str) -> str:
    """A PAG layer name in diffusers' current spelling ("down.block_1" -> "down_blocks.1")."""
    return _OLD_ATTENTION.sub(r"attentions.\1", _OLD_BLOCK.sub(r"\1_blocks.\2", name.strip()))


def uses_pag(r: GenerationRequest) -> bool:
    """diffusers' rule: PAG runs when its scale is above 0 and it has layers."""
    return r.pag_scale > 0 and len(r.pag_layers) > 0


# ------------------------------------------------------------------------------------------------- the layers
def self_attention_names(unet: UNet) -> dict[str, CrossAttention]:
    """The UNet's self-attention layers by their diffusers module names ("mid_block.attentions.0.transformer_blocks.0
    .attn1"), in the order they run."""
    prefixes = {ours: theirs for ours, (theirs, _) in unet_modules(unet.cfg).items()}
    out = {}
    for name, module in unet.named_modules():
        if not name.endswith(".attn1"):
            continue
        block = ".".join(name.split(".")[:3])  # "input_blocks.4.1", "output_blocks.2.1"
        if block not in prefixes:
            block = ".".join(name.split(".")[:2])  # "middle_block.1"
        out[prefixes[block] + name[len(block) :]] = module
    return out


def perturbed_layers(unet: UNet, layers: Sequence[str]) -> tuple[list[CrossAttention], list[str]]:
    """The self-attention layers whose diffusers name matches one of `layers` (re.search, as diffusers does), and
    the names in `layers` that match none."""
    named = self_attention_names(unet)
    chosen: dict[int, CrossAttention] = {}
    unmatched = []
    for layer in layers:
        found = [m for name, m in named.items() if re.search(diffusers_layer_id(layer), name)]
        chosen.update({id(m): m for m in found})
        if not found:
            unmatched.append(layer)
    return list(chosen.values()), unmatched


def pag_problems(unet: UNet, r: GenerationRequest) -> list[str]:
    """The PAG layer names of the request that name no self-attention layer of this UNet (diffusers refuses them)."""
    if not uses_pag(r):
        return []
    _, unmatched = perturbed_layers(unet, r.pag_layers)
    if not unmatched:
        return []
    blocks = sorted({n.split(".transformer_blocks")[0] for n in self_attention_names(unet)})
    return [f"pag_layers: {', '.join(map(repr, unmatched))} names no self-attention layer of this UNet; its "
            f"attention blocks are {', '.join(blocks)} ('down', 'mid' and 'up' name them by part)"]  # fmt: skip


def identity_for_last_rows(inner: AttentionProcessor, rows: int) -> AttentionProcessor:
    """A self-attention processor that computes the first rows of the batch with `inner` and the last `rows` rows
    with the identity attention matrix: each token keeps its own value, out(v(x))."""

    def processor(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kept = inner(attn, x[:-rows], context)
        return torch.cat([kept, attn.to_out(attn.to_v(x[-rows:]))])

    return processor


@contextlib.contextmanager
def perturbed_attention(unet: UNet, r: GenerationRequest) -> Iterator[None]:
    """The chosen layers perturb the last `r.batch` rows for the duration (nothing without PAG)."""
    if not uses_pag(r):
        yield
        return
    layers, _ = perturbed_layers(unet, r.pag_layers)  # `pag_problems` refused names that match nothing
    with processors_set(layers, [identity_for_last_rows(a.processor, r.batch) for a in layers]):
        yield


# --------------------------------------------------------------------------------------------------- the batch
def with_perturbed_rows(r: GenerationRequest, t):
    """A tensor (or list / tuple / dict of them) of the guidance batch ([uncond, cond] or [cond]) with the
    conditional rows once more at the end, for the perturbed pass; unchanged without PAG."""
    if t is None or not uses_pag(r):
        return t
    if isinstance(t, list | tuple):
        return type(t)(with_perturbed_rows(r, v) for v in t)
    if isinstance(t, dict):
        return {k: with_perturbed_rows(r, v) for k, v in t.items()}
    return torch.cat([t, t[-r.batch :]])


def pag_scale_at(r: GenerationRequest, t: torch.Tensor | float) -> float:
    """The PAG scale at timestep t: `pag_scale`, lowered by `pag_adaptive_scale` per timestep below 1000."""
    if r.pag_adaptive_scale > 0:
        return max(0.0, r.pag_scale - r.pag_adaptive_scale * (ADAPTIVE_FROM - float(t)))
    return r.pag_scale


def guided(r: GenerationRequest, out: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The UNet's predictions of the guidance batch ([uncond, cond] and, with PAG, the perturbed rows) -> the one
    prediction the sampler takes."""
    pag = uses_pag(r)
    if not r.use_cfg and not pag:
        return out
    parts = out.chunk((2 if r.use_cfg else 1) + pag)
    cond = parts[1] if r.use_cfg else parts[0]
    result = parts[0] + r.cfg_scale * (cond - parts[0]) if r.use_cfg else cond
    if pag:
        result = result + pag_scale_at(r, t) * (cond - parts[-1])
    if r.use_cfg and r.cfg_rescale > 0:
        result = rescaled(result, cond, r.cfg_rescale)
    return result


def rescaled(guided_out: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """The guided prediction brought to the conditional one's standard deviation (per picture), mixed by phi."""
    dims = list(range(1, cond.ndim))
    matched = guided_out * (cond.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True))
    return phi * matched + (1 - phi) * guided_out
