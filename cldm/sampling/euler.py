"""Euler and Euler ancestral (k-diffusion's sample_euler / sample_euler_ancestral, diffusers' Euler schedulers)."""

from __future__ import annotations

from cldm.sampling import schedules
from cldm.sampling.sampler import SigmaSampler, noise_like


class EulerAncestral(SigmaSampler):
    """Euler ancestral (k-diffusion / diffusers): x lives in the "variance exploding" scale."""

    name = "euler_a"

    def __init__(self, steps: int, schedule: str = ""):
        super().__init__(steps, schedule)
        self.sigmas, timesteps = schedules.spaced(steps, schedule)
        if schedule:  # fractional timesteps on a ramp or spacing of its own
            self.timesteps = timesteps

    def init_noise(self, noise):
        return noise * schedules.noise_scale(self.sigmas, self.schedule)

    def scale_input(self, x, i):
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i]

    def step(self, x, eps, i, generator):
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        x32 = x.float()
        x0 = x32 - s_from * eps.float()
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2) ** 0.5
        out = x32 + (x32 - x0) / s_from * (s_down - s_from)
        out = out + noise_like(x.shape, generator, out) * s_up
        return out.to(x.dtype)


class Euler(EulerAncestral):
    """Euler (k-diffusion's sample_euler, diffusers' EulerDiscreteScheduler without churn): the ODE step alone."""

    name = "euler"

    def step(self, x, eps, i, generator):
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        x32 = x.float()
        x0 = x32 - s_from * eps.float()
        return (x32 + (x32 - x0) / s_from * (s_to - s_from)).to(x.dtype)
