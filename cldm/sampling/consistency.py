"""LCM and TCD, the samplers of consistency-distilled models (LCM-LoRA, TCD-LoRA, Hyper-SD's one-step LoRA), as
diffusers' LCMScheduler and TCDScheduler run them from the SD1.5 scheduler config.

Both walk a few timesteps of the distillation's own 50-step schedule (19, 39, .., 999) and at each one estimate the
clean latent x0 from the model, then noise it again to the next timestep: LCM with fresh noise (its boundary
condition blends in a little of x at small t), TCD partly along the model's own noise and partly fresh, the share
of fresh noise being gamma (diffusers' and the TCD card's "eta"; 0 is deterministic). They keep x in the VP scale,
so the loop's input needs no scaling, and img2img noises the init latent as DDPM does.
"""

from __future__ import annotations

import numpy as np
import torch

from cldm.sampling.sampler import Sampler, noise_like
from cldm.sampling.schedules import TRAIN_STEPS

ORIGINAL_STEPS = 50  # the distillation's schedule: timesteps 19, 39, .., 999 (LCM's original_inference_steps)
TIMESTEP_SCALING = 10.0  # LCM's boundary condition reads t * 10, so c_skip is ~0 but for t near 0
SIGMA_DATA = 0.5  # the data's standard deviation in the consistency-model parameterisation


def distilled_timesteps(steps: int) -> torch.Tensor:
    """`steps` timesteps taken evenly by index from the distillation schedule, 999 first (int64). Above 50 steps the
    schedule is `steps` evenly spaced timesteps instead (diffusers refuses more steps than the schedule has)."""
    original = max(ORIGINAL_STEPS, steps)
    schedule = np.arange(original, 0, -1) * (TRAIN_STEPS // original) - 1  # descending
    picks = np.floor(np.linspace(0, original, steps, endpoint=False)).astype(np.int64)  # numpy, as diffusers
    return torch.from_numpy(schedule[picks])


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's boundary condition: the consistency function is c_skip x + c_out x0, which is x at
    t = 0 (fp32, as diffusers computes them)."""
    scaled = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


class LCM(Sampler):
    """Latent Consistency Model sampling (Luo et al. 2023), diffusers' LCMScheduler: x0 through the boundary
    condition, then fresh noise to the next timestep (none after the last)."""

    name = "lcm"

    def __init__(self, steps: int):
        super().__init__(steps)
        self.timesteps = distilled_timesteps(steps)

    def _x0(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        a = self.ac[self.timesteps[i]]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def step(self, x, eps, i, generator):
        x32 = x.float()
        c_skip, c_out = boundary_scalings(self.timesteps[i])
        denoised = c_out * self._x0(x32, eps.float(), i) + c_skip * x32
        if i == len(self.timesteps) - 1:
            return denoised.to(x.dtype)
        a_next = self.ac[self.timesteps[i + 1]]
        noise = noise_like(x.shape, generator, denoised)
        return (a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise).to(x.dtype)


class TCD(LCM):
    """Trajectory Consistency Distillation sampling (Zheng et al. 2024), diffusers' TCDScheduler: from x0 and the
    model's noise, the latent at the earlier timestep s = floor((1 - gamma) t_next), then on to t_next with fresh
    noise; gamma 0 goes straight to t_next (deterministic), gamma 1 to x0 and all fresh noise."""

    name = "tcd"

    def __init__(self, steps: int, gamma: float = 0.0):
        if not 0 <= gamma <= 1:
            raise ValueError(f"TCD's gamma (eta) must be 0..1 (got {gamma}); its model cards use 0.3")
        super().__init__(steps)
        self.gamma = gamma

    def step(self, x, eps, i, generator):
        x32, e32 = x.float(), eps.float()
        last = i == len(self.timesteps) - 1
        t_next = torch.tensor(0) if last else self.timesteps[i + 1]
        t_s = torch.floor((1 - self.gamma) * t_next).long()  # in fp32, as diffusers takes it
        a_s = self.ac[t_s]
        noised = a_s.sqrt() * self._x0(x32, e32, i) + (1 - a_s).sqrt() * e32
        if self.gamma == 0 or last:
            return noised.to(x.dtype)
        keep = self.ac[t_next] / a_s
        noise = noise_like(x.shape, generator, noised)
        return (keep.sqrt() * noised + (1 - keep).sqrt() * noise).to(x.dtype)
