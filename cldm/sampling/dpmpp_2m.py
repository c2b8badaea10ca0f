"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler."""

from __future__ import annotations

import torch

from cldm.sampling import schedules
from cldm.sampling.sampler import VPSampler, noise_like


class DPMPP2M(VPSampler):
    """DPM-Solver++(2M), in diffusers' VP form (x unscaled, first order on the last step); final sigma 0, so the last
    step returns x0."""

    name = "dpmpp_2m"

    def __init__(self, steps: int, schedule: str = ""):
        super().__init__(steps, schedule)
        self.sigmas, self.timesteps = schedules.solver(steps, schedule)
        self.prev_x0: torch.Tensor | None = None

    def step(self, x, eps, i, generator):
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        x32 = x.float()
        x0 = (x32 - sigma_s * eps.float()) / alpha_s
        last = i == len(self.timesteps) - 1
        if last:  # sigma_t = 0: the exact first-order answer is x0 itself
            out = x0
        else:
            h = self._lambda(i + 1) - self._lambda(i)
            phi = torch.expm1(-h)  # exp(-h) - 1
            out = (sigma_t / sigma_s) * x32 - alpha_t * phi * x0
            if self.prev_x0 is not None:  # second order from the previous x0 estimate (midpoint rule)
                r0 = (self._lambda(i) - self._lambda(i - 1)) / h
                out = out - 0.5 * alpha_t * phi * (x0 - self.prev_x0) / r0
        self.prev_x0 = x0
        return out.to(x.dtype)


class DPMPP2MSDE(DPMPP2M):
    """DPM-Solver++(2M) SDE (diffusers' "sde-dpmsolver++", midpoint): every step adds fresh noise of the size the
    step removed, drawn from the generator as Euler a draws its noise."""

    name = "dpmpp_2m_sde"

    def step(self, x, eps, i, generator):
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        x32 = x.float()
        x0 = (x32 - sigma_s * eps.float()) / alpha_s
        noise = noise_like(x.shape, generator, x32)  # drawn on every step, the last included, as diffusers does
        if i == len(self.timesteps) - 1:  # sigma_t = 0: x0 itself
            out = x0
        else:
            h = self._lambda(i + 1) - self._lambda(i)
            decay = 1 - torch.exp(-2.0 * h)
            out = (sigma_t / sigma_s * torch.exp(-h)) * x32 + alpha_t * decay * x0 + sigma_t * decay.sqrt() * noise
            if self.prev_x0 is not None:  # midpoint second order from the previous x0 estimate
                r0 = (self._lambda(i) - self._lambda(i - 1)) / h
                out = out + 0.5 * alpha_t * decay * (x0 - self.prev_x0) / r0
        self.prev_x0 = x0
        return out.to(x.dtype)
