"""What every sampler shares: the loop interface, the noise draw, the sigma and VP (alpha, sigma) forms."""

from __future__ import annotations

import torch

from cldm.sampling import schedules
from cldm.sampling.schedules import alphas_cumprod, leading_timesteps


def noise_like(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """Noise shaped like `shape`: from one generator, or row by row from a list of them (one seed per picture)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([noise_like((1, *shape[1:]), g, like) for g in generator])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


class Sampler:
    """Base: timesteps, input scaling and forward noising (VP form: x = sqrt(a) x0 + sqrt(1-a) noise)."""

    name = "base"
    order = 1  # model calls per step (the last step makes one)

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.ac = alphas_cumprod()
        self.timesteps = leading_timesteps(steps)

    def index(self, step: int) -> int:
        """The loop index where step `step` (0-based, of `steps`) begins."""
        return step * self.order

    @classmethod
    def model_calls(cls, steps: int, start: int = 0) -> int:
        """Model calls that steps start .. steps - 1 take."""
        return (steps - start) * cls.order - (cls.order - 1)

    def init_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        a = self.ac[int(self.timesteps[i])].to(x0.device, torch.float32)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def vp(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma') of the model's input at loop entry i: scale_input(x, i) = alpha x0 + sigma' noise."""
        a = self.ac[int(self.timesteps[i])].double()
        return a.sqrt(), (1 - a).sqrt()

    def noise_estimate(self, out: torch.Tensor, x_in: torch.Tensor, i: int, prediction: str) -> torch.Tensor:
        """The model's output at loop entry i as a noise estimate, the form every sampler steps with. A v model
        predicts v = alpha noise - sigma' x0; with x_in = alpha x0 + sigma' noise and alpha^2 + sigma'^2 = 1 the noise
        is sigma' x_in + alpha v (diffusers' schedulers reach the same x0 through their own forms)."""
        if prediction == "epsilon":
            return out
        alpha, sigma = self.vp(i)
        return (sigma * x_in.double() + alpha * out.double()).to(out.dtype)


def alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP form of noise level sigma: x = alpha x0 + sigma' noise with alpha = 1 / sqrt(sigma^2 + 1)."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


def log_snr(s: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma'), the DPM-Solver time variable."""
    alpha, sigma = alpha_sigma(s)
    return alpha.log() - sigma.log()


class SigmaSampler(Sampler):
    """Samplers that think in sigma = sqrt((1 - a) / a), on a schedule of `schedules.SCHEDULES`."""

    def __init__(self, steps: int, schedule: str = ""):
        super().__init__(steps)
        self.train_sigmas = schedules.train_sigmas()
        self.schedule = schedule

    def input_sigma(self, i: int) -> torch.Tensor:
        """The sigma the model's input at loop entry i is scaled for."""
        return self.sigmas[i]

    def vp(self, i):
        return alpha_sigma(self.input_sigma(i).double())


class VPSampler(SigmaSampler):
    """Sigma samplers that keep x in the VP scale (x = alpha x0 + sigma' noise), as diffusers' DPM-Solver and UniPC."""

    _alpha_sigma = staticmethod(alpha_sigma)

    def add_noise(self, x0, noise, i):
        alpha, sigma = alpha_sigma(self.sigmas[i])
        return (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)

    def _lambda(self, i: int) -> torch.Tensor:
        return log_snr(self.sigmas[i])
