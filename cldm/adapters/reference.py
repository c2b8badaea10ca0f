"""Reference-only control (the A1111 ControlNet extension's `reference_only`, `reference_adain`,
`reference_adain+attn`): no extra weights, the reference picture steers the UNet from inside.

At every step where the unit is active, the reference's latent is noised to the step's timestep
(sqrt(a_t) x0 + sqrt(1 - a_t) noise, t rounded to an integer) and run through the UNet with the same text context
("write"): each transformer block keeps the normalised input of its self-attention, and the AdaIN blocks (the middle
block, the input blocks below the first level, the first two thirds of the output blocks) keep the mean and variance
of their output. Then the real UNet call ("read"):

- attention (`only`, `adain+attn`): self-attention also attends to the reference's tokens,
  attn(x, [x, ref]); with style fidelity f the conditional half gets that and the unconditional half
  f * attn(x, x) + (1 - f) * attn(x, [x, ref]), so f = 1 puts the reference into the guidance direction only;
- AdaIN (`adain`, `adain+attn`): each AdaIN block's output is renormalised to the reference's mean and standard
  deviation (std floored at sqrt(1e-6)), with the same fidelity mix on the unconditional half.

Which blocks take part follows the extension's weights: block k of n (widest first) joins when `weight > k / n`,
AdaIN blocks when `weight > 2 * (their rank weight)`, so weight 1 (the default) uses every attention block and the
deeper AdaIN blocks. The reference's noise comes from its own generator (seeded with the request's seed), so the
main noise stream, and every picture made without a reference, is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from cldm.models.attention import processors_set

MODES = ("only", "adain", "adain+attn")
EPS = 1e-6


def uses_attention(mode: str) -> bool:
    return mode in ("only", "adain+attn")


def uses_adain(mode: str) -> bool:
    return mode in ("adain", "adain+attn")


@dataclass
class ReferenceState:
    """What one step's write and read passes share (layer or block -> banks)."""

    mode: str
    style_fidelity: float
    weight: float
    uncond: int  # rows of the batch that are the unconditional half (0 without guidance)
    writing: bool = True
    attn_bank: dict[int, torch.Tensor] = field(default_factory=dict)
    gn_bank: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def attention(self) -> bool:
        return uses_attention(self.mode)

    @property
    def adain(self) -> bool:
        return uses_adain(self.mode)

    def self_attention(self, attn: nn.Module, plain, h: torch.Tensor, weight: float) -> torch.Tensor:
        """A self-attention layer's output on its normalised input `h` (`plain`: the layer's own processor), writing
        or reading the bank."""
        if not self.attention:
            return plain(attn, h, None)
        if self.writing:
            if self.weight > weight:
                self.attn_bank[id(attn)] = h.detach()
            return plain(attn, h, None)
        ref = self.attn_bank.pop(id(attn), None)
        if ref is None:
            return plain(attn, h, None)
        with_ref = plain(attn, h, torch.cat([h, ref], dim=1))
        out = with_ref.clone()
        if self.uncond and self.style_fidelity > 1e-5:
            out[: self.uncond] = plain(attn, h[: self.uncond], None)
        return self.style_fidelity * out + (1.0 - self.style_fidelity) * with_ref

    def block_output(self, block: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor:
        """An AdaIN block's output, writing or reading its statistics."""
        if not self.adain:
            return x
        if self.writing:
            if self.weight > weight:
                var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
                self.gn_bank[id(block)] = (mean, var)
            return x
        stats = self.gn_bank.pop(id(block), None)
        if stats is None:
            return x
        mean_ref, var_ref = stats
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        std = var.clamp_min(EPS) ** 0.5
        std_ref = var_ref.clamp_min(EPS) ** 0.5
        styled = (x - mean) / std * std_ref + mean_ref
        out = styled.clone()
        if self.uncond and self.style_fidelity > 1e-5:
            out[: self.uncond] = x[: self.uncond]
        return (self.style_fidelity * out + (1.0 - self.style_fidelity) * styled).to(x.dtype)


def attention_weights(unet) -> list[float]:
    """The extension's participation weight of each self-attention layer, in `unet.self_attentions()` order: rank
    over the count, widest first (stable within a width)."""
    layers = unet.self_attentions()
    order = sorted(range(len(layers)), key=lambda i: -layers[i].to_q.in_features)
    weights = [0.0] * len(layers)
    for rank, i in enumerate(order):
        weights[i] = rank / len(layers)
    return weights


def adain_weights(unet) -> list[tuple[nn.Module, float]]:
    """The AdaIN blocks and their participation weights: the middle block, the input blocks below the first level,
    the first two thirds of the output blocks."""
    cfg = unet.cfg
    inputs, index = [], 1  # input_blocks[0] is conv_in
    for level in range(len(cfg.channel_mult)):
        for _ in range(cfg.num_res_blocks):
            if level >= 1:
                inputs.append(index)
            index += 1
        if level != len(cfg.channel_mult) - 1:
            index += 1  # the downsample
    outputs = list(range(round(len(unet.output_blocks) * 2 / 3)))
    return [
        (unet.middle_block, 0.0),
        *((unet.input_blocks[i], 2 * (1.0 - w / len(inputs))) for w, i in enumerate(inputs)),
        *((unet.output_blocks[i], 2 * (w / len(outputs))) for w, i in enumerate(outputs)),
    ]


class Reference:
    """A reference unit attached to a UNet: `state` is the step's (None: the reference does not act this step)."""

    def __init__(self, mode: str, style_fidelity: float, weight: float, uncond: int):
        self.mode, self.style_fidelity, self.weight, self.uncond = mode, style_fidelity, weight, uncond
        self.state: ReferenceState | None = None

    def write(self) -> None:
        """The next UNet call runs the noised reference: its layers and blocks fill fresh banks."""
        self.state = ReferenceState(self.mode, self.style_fidelity, self.weight, self.uncond)

    def read(self) -> None:
        """The next UNet call is the real one: it reads what the write pass kept."""
        self.state.writing = False

    def off(self) -> None:
        self.state = None

    def processor(self, plain, weight: float):
        """A self-attention processor over `plain` (the layer's processor before this one)."""

        def attend(attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
            if self.state is None or context is not None:
                return plain(attn, x, context)
            return self.state.self_attention(attn, plain, x, weight)

        return attend

    def hook(self, weight: float):
        """A forward hook on an AdaIN block's output."""

        def on_output(block: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
            return out if self.state is None else self.state.block_output(block, out, weight)

        return on_output


@contextlib.contextmanager
def attached(unet, mode: str, style_fidelity: float, weight: float, uncond: int) -> Iterator[Reference]:
    """The reference's processors on the UNet's self-attention layers and its hooks on the AdaIN blocks, for the
    block's duration; the caller drives `write()` / `read()` / `off()` step by step."""
    ref = Reference(mode, style_fidelity, weight, uncond)
    layers = unet.self_attentions() if uses_attention(mode) else []
    processors = [ref.processor(a.processor, w) for a, w in zip(layers, attention_weights(unet))]
    handles = [b.register_forward_hook(ref.hook(w)) for b, w in adain_weights(unet)] if uses_adain(mode) else []
    try:
        with processors_set(layers, processors):
            yield ref
    finally:
        for h in handles:
            h.remove()


def noised_reference(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, generator) -> torch.Tensor:
    """The reference latent at timestep t (rounded), with fresh noise from the reference's own generator."""
    step = int(torch.round(t.float()).clamp(0, len(alphas_cumprod) - 1))
    a = alphas_cumprod[step]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    return (a**0.5) * x0 + ((1 - a) ** 0.5) * noise
