"""DDIM (Song et al. 2021), as the original ControlNet and diffusers' DDIMScheduler run it."""

from __future__ import annotations

from cldm.sampling.sampler import Sampler, noise_like
from cldm.sampling.schedules import TRAIN_STEPS


class DDIM(Sampler):
    """DDIM (Song et al.) as in the original ControlNet and diffusers; eta=0 is deterministic."""

    name = "ddim"

    def __init__(self, steps: int, eta: float = 0.0):
        super().__init__(steps)
        self.eta = eta
        self.ratio = TRAIN_STEPS // steps

    def step(self, x, eps, i, generator):
        t = int(self.timesteps[i])
        prev = t - self.ratio
        a_t = self.ac[t]
        a_prev = self.ac[prev] if prev >= 0 else self.ac[0]  # SD1.5: set_alpha_to_one=False
        x32, e32 = x.float(), eps.float()
        x0 = (x32 - (1 - a_t).sqrt() * e32) / a_t.sqrt()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var.sqrt()
        out = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * e32
        if self.eta > 0:
            out = out + std * noise_like(x.shape, generator, out)
        return out.to(x.dtype)
