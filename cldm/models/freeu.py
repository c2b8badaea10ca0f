"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): a training-free change to the UNet's decoder.

At the two deepest decoder stages (diffusers' up_blocks 0 and 1, the first two groups of `output_blocks` in the
LDM layout), before each output block joins the backbone features with its skip connection, the first half of the
backbone's channels is multiplied by `b` (more backbone: cleaner shapes) and the lowest frequencies of the skip are
multiplied by `s` (less skip: fewer stray high-frequency details). The numbers are diffusers' `enable_freeu(s1, s2,
b1, b2)`, whose arithmetic (`apply_freeu`, `fourier_filter`) this follows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# The skip's scale multiplies the centred (2 * LOW_FREQUENCY_HALF_WIDTH)^2 square of its shifted spectrum: the
# lowest frequencies (diffusers' `threshold=1`).
LOW_FREQUENCY_HALF_WIDTH = 1
MAX_FACTOR = 10.0  # ComfyUI's FreeU node allows 0..10; the published values are 0.2..1.6


@dataclass(frozen=True)
class FreeU:
    """FreeU's factors: `b1`, `b2` on the backbone and `s1`, `s2` on the skip, at decoder stages 1 and 2."""

    b1: float
    b2: float
    s1: float
    s2: float

    def problems(self) -> list[str]:
        """What is wrong with the factors (each must be a number 0..MAX_FACTOR); empty when they are fine."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= MAX_FACTOR:
                out.append(f"freeu: {f.name} must be a number 0..{MAX_FACTOR:g} (got {v!r})")
        return out

    def apply(self, stage: int, h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone features `h` and the `skip` of an output block at decoder `stage` (0 = the deepest)."""
        if stage > 1:
            return h, skip
        b, s = (self.b1, self.s1) if stage == 0 else (self.b2, self.s2)
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
        return h, low_frequencies_scaled(skip, s)


def low_frequencies_scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (b, c, h, w) with the lowest spatial frequencies times `scale`, in fp32 (the FFT's precision)."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    rows, cols = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
    k = LOW_FREQUENCY_HALF_WIDTH
    weight = torch.ones(spectrum.shape[-2:], device=x.device)
    weight[rows - k : rows + k, cols - k : cols + k] = scale  # diffusers' slice, also on a 1-pixel side
    spectrum = torch.fft.ifftshift(spectrum * weight, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)
