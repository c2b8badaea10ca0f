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

from dataclasses import dataclass, field

import torch
from torch import nn

MODES = ("only", "adain", "adain+attn")
EPS = 1e-6


@dataclass
class ReferenceState:
    """What one step's write and read passes share (module -> banks), created by the pipeline per step."""

    mode: str
    style_fidelity: float
    weight: float
    uncond: int  # rows of the batch that are the unconditional half (0 without guidance)
    writing: bool = True
    attn_bank: dict[int, torch.Tensor] = field(default_factory=dict)
    gn_bank: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def attention(self) -> bool:
        return self.mode in ("only", "adain+attn")

    @property
    def adain(self) -> bool:
        return self.mode in ("adain", "adain+attn")

    def self_attention(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """A transformer block's self-attention on its normalised input `h`, writing or reading the bank."""
        weight = getattr(block, "ref_weight", None)
        if not self.attention or weight is None:
            return block.attn1(h)
        if self.writing:
            if self.weight > weight:
                self.attn_bank[id(block)] = h.detach()
            return block.attn1(h)
        ref = self.attn_bank.pop(id(block), None)
        if ref is None:
            return block.attn1(h)
        with_ref = block.attn1(h, torch.cat([h, ref], dim=1))
        out = with_ref.clone()
        if self.uncond and self.style_fidelity > 1e-5:
            out[: self.uncond] = block.attn1(h[: self.uncond])
        return self.style_fidelity * out + (1.0 - self.style_fidelity) * with_ref

    def block_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An AdaIN block's output, writing or reading its statistics."""
        weight = getattr(block, "ref_gn_weight", None)
        if not self.adain or weight is None:
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


def assign_weights(unet) -> None:
    """Give the UNet's transformer blocks and AdaIN blocks the extension's participation weights."""
    from cldm.models.attention import BasicTransformerBlock

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    blocks = sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])  # widest first, stable within a width
    for i, b in enumerate(blocks):
        b.ref_weight = i / len(blocks)
    cfg = unet.cfg
    per_level = cfg.num_res_blocks
    inputs, index = [], 1  # input_blocks[0] is conv_in
    for level in range(len(cfg.channel_mult)):
        for _ in range(per_level):
            if level >= 1:
                inputs.append(index)
            index += 1
        if level != len(cfg.channel_mult) - 1:
            index += 1  # the downsample
    outputs = list(range(round(len(unet.output_blocks) * 2 / 3)))
    unet.middle_block.ref_gn_weight = 0.0
    for w, i in enumerate(inputs):
        unet.input_blocks[i].ref_gn_weight = 2 * (1.0 - w / len(inputs))
    for w, i in enumerate(outputs):
        unet.output_blocks[i].ref_gn_weight = 2 * (w / len(outputs))


def noised_reference(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, generator) -> torch.Tensor:
    """The reference latent at timestep t (rounded), with fresh noise from the reference's own generator."""
    step = int(torch.round(t.float()).clamp(0, len(alphas_cumprod) - 1))
    a = alphas_cumprod[step]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    return (a**0.5) * x0 + ((1 - a) ** 0.5) * noise
