"""DPM++ SDE (Lu et al. 2022, k-diffusion's sample_dpmpp_sde) with its Brownian-tree noise."""

from __future__ import annotations

import warnings

import torch

from cldm.sampling import schedules
from cldm.sampling.sampler import SigmaSampler


class _BrownianNoise:
    """k-diffusion's Brownian-tree noise (torchsde's BrownianInterval), as diffusers' DPMSolverSDEScheduler and A1111
    draw it: the noise between two sigmas is a fixed function of the seed, whatever steps ask for it. One tree for the
    whole batch from one seed, or one tree per picture from a list of seeds (A1111's per-picture seeds)."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: int | list[int]):
        import torchsde  # only this sampler needs it

        self.lo, self.hi = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.batched = isinstance(seeds, list)
        shape = x.shape[1:] if self.batched else x.shape
        self.trees = [
            torchsde.BrownianInterval(
                t0=self.lo,
                t1=self.hi,
                size=shape,
                dtype=x.dtype,
                device=x.device,
                entropy=seed,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )  # fmt: skip
            for seed in (seeds if self.batched else [seeds])
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1.0 if t0 < t1 else -1.0
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():  # sigma_max read back through exp(-(-log s)) may pass the end by one ulp
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()


def _seeds(generator) -> int | list[int]:
    """The seeds behind the sampling generator(s): the Brownian tree is seeded from them, not drawn from them."""
    if isinstance(generator, (list, tuple)):
        return [int(g.initial_seed()) for g in generator]
    return int(generator.initial_seed()) if generator is not None else int(torch.randint(0, 2**63 - 1, ()).item())


class DPMPPSDE(SigmaSampler):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, diffusers' DPMSolverSDEScheduler): two model calls per step,
    the second at the midpoint in log sigma, with Brownian-tree noise seeded from the picture's seed. The loop's
    entries alternate: even ones start a step, odd ones finish it at the midpoint; the last step is one Euler call."""

    name = "dpmpp_sde"
    order = 2

    def __init__(self, steps: int, schedule: str = ""):
        super().__init__(steps, schedule)
        sig, t = schedules.spaced(steps, schedule)
        mid = (sig[:-2] * sig[1:-1]).double().sqrt()  # exp of the mean of -log sigma over each interval
        t_mid = schedules.sigma_to_t(mid, schedules.log_train_sigmas())
        timesteps = torch.cat([t[:1].double(), t[1:].double().repeat_interleave(2)])
        timesteps[1::2] = t_mid
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        self.first_x: torch.Tensor | None = None  # the step's start, kept between its two halves
        self.mid_sigma: torch.Tensor | None = None
        self.noise: _BrownianNoise | None = None

    def init_noise(self, noise):
        return noise * schedules.noise_scale(self.sigmas, self.schedule)

    def input_sigma(self, i):
        return self.sigmas[i] if self.first_x is None else self.mid_sigma

    def scale_input(self, x, i):
        sigma = self.input_sigma(i)
        return x / (sigma**2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i]

    def step(self, x, eps, i, generator):
        x32 = x.float()
        if self.noise is None:
            positive = self.sigmas[self.sigmas > 0]
            self.noise = _BrownianNoise(x32, positive.min().item(), positive.max().item(), _seeds(generator))
        first = self.first_x is None
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        t, t_next = -sigma.log(), -sigma_next.log()
        t_mid = t + (t_next - t) * 0.5
        x0 = x32 - (sigma if first else (-t_mid).exp()) * eps.float()
        if sigma_next == 0:  # the last step: Euler to sigma 0
            return (x32 + (x32 - x0) / sigma * (sigma_next - sigma)).to(x.dtype)
        start = x32 if first else self.first_x
        if first:
            t_next = t_mid
        s_from, s_to = (-t).exp(), (-t_next).exp()
        s_up = torch.minimum(s_to, (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
        t_down = -((s_to**2 - s_up**2) ** 0.5).log()
        out = ((-t_down).exp() / (-t).exp()) * start - (t - t_down).expm1() * x0
        out = out + self.noise(s_from, s_to) * s_up
        self.first_x, self.mid_sigma = (start, s_to) if first else (None, None)
        return out.to(x.dtype)
