"""Linear multistep (order 4), as diffusers' LMSDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import torch

from cldm.sampling import schedules
from cldm.sampling.sampler import SigmaSampler


class LMS(SigmaSampler):
    """Linear multistep (order 4), as diffusers' LMSDiscreteScheduler: on a Karras or exponential ramp the sigmas
    span those of the leading timesteps and the model sees fractional timesteps; each step integrates the Lagrange
    polynomial through the last derivatives (exactly, where diffusers integrates numerically)."""

    name = "lms"
    lms_order = 4

    def __init__(self, steps: int, schedule: str = ""):
        super().__init__(steps, schedule)
        self.sigmas, timesteps = schedules.spaced(steps, schedule)
        self.timesteps = timesteps.float()
        self.derivatives: list[torch.Tensor] = []

    def init_noise(self, noise):
        return noise * schedules.noise_scale(self.sigmas, self.schedule)

    def scale_input(self, x, i):
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i]

    def coefficient(self, order: int, i: int, j: int) -> float:
        """The integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial of sigma_{i-j} over the
        sigmas sigma_i .. sigma_{i-order+1}."""
        nodes = [float(self.sigmas[i - k]) for k in range(order)]
        poly = np.poly1d([1.0])
        for k in range(order):
            if k != j:
                poly *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
        integral = poly.integ()
        return float(integral(float(self.sigmas[i + 1])) - integral(float(self.sigmas[i])))

    def step(self, x, eps, i, generator):
        x32 = x.float()
        self.derivatives.append(eps.float())  # (x - x0) / sigma with x0 = x - sigma * eps
        if len(self.derivatives) > self.lms_order:
            self.derivatives.pop(0)
        order = min(i + 1, self.lms_order)  # diffusers' rule (with img2img it may exceed the derivatives kept)
        coeffs = [self.coefficient(order, i, j) for j in range(order)]
        return (x32 + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))).to(x.dtype)
