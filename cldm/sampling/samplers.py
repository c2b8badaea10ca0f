"""The samplers: DDIM, Euler (a), LMS, DPM++ 2M (SDE), DPM++ SDE and UniPC, each on its diffusers scheduler's
sigma schedules (`schedules.py`: uniform, Karras, exponential).

Every sampler works on an epsilon-predicting model and keeps to the same small interface, so the loop in
`pipeline.py` does not care which one runs:
    x = s.init_noise(noise) or s.add_noise(x0, noise, s.index(start))
    for i in range(s.index(start), len(s.timesteps)): x = s.step(x, eps_model(s.scale_input(x, i), s.timesteps[i]), i, gen)
A second-order sampler (DPM++ SDE) calls the model twice per step, so its `timesteps` hold 2 * steps - 1 entries.
They follow diffusers' schedulers with the SD1.5 scheduler config, step for step, so a seed gives the same picture.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from cldm.sampling import schedules
from cldm.sampling.dpm_sde import DPMPPSDE
from cldm.sampling.sampler import Sampler, _randn, _SigmaSampler, _VPSampler
from cldm.sampling.schedules import SCHEDULE_LABELS, TRAIN_STEPS
from cldm.sampling.unipc import UniPC


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
            out = out + std * _randn(x.shape, generator, out)
        return out.to(x.dtype)


class EulerAncestral(_SigmaSampler):
    """Euler ancestral (k-diffusion / diffusers), leading spacing: x lives in the "variance exploding" scale."""

    name = "euler_a"

    def __init__(self, steps: int):
        super().__init__(steps)
        sig = self.train_sigmas[self.timesteps]
        self.sigmas = torch.cat([sig, sig.new_zeros(1)])

    def init_noise(self, noise):
        return noise * (self.sigmas[0] ** 2 + 1) ** 0.5  # leading spacing: sqrt(sigma_max^2 + 1)

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
        out = out + _randn(x.shape, generator, out) * s_up
        return out.to(x.dtype)


class DPMPP2M(_VPSampler):
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


class Euler(EulerAncestral):
    """Euler (k-diffusion's sample_euler, diffusers' EulerDiscreteScheduler without churn): the ODE step alone."""

    name = "euler"

    def __init__(self, steps: int, schedule: str = ""):
        _SigmaSampler.__init__(self, steps, schedule)
        self.sigmas, timesteps = schedules.spaced(steps, schedule)
        if schedule:  # fractional timesteps on a Karras / exponential ramp
            self.timesteps = timesteps

    def init_noise(self, noise):
        return noise * (self.sigmas.max() ** 2 + 1) ** 0.5

    def step(self, x, eps, i, generator):
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        x32 = x.float()
        x0 = x32 - s_from * eps.float()
        return (x32 + (x32 - x0) / s_from * (s_to - s_from)).to(x.dtype)


class DPMPP2MSDE(DPMPP2M):
    """DPM-Solver++(2M) SDE (diffusers' "sde-dpmsolver++", midpoint): every step adds fresh noise of the size the
    step removed, drawn from the generator as Euler a draws its noise."""

    name = "dpmpp_2m_sde"

    def step(self, x, eps, i, generator):
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        x32 = x.float()
        x0 = (x32 - sigma_s * eps.float()) / alpha_s
        noise = _randn(x.shape, generator, x32)  # drawn on every step, the last included, as diffusers does
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


class LMS(_SigmaSampler):
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
        return noise * (self.sigmas.max() ** 2 + 1) ** 0.5

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


# Each sampler with the schedules its diffusers scheduler offers; the key is the name plus "_karras" or
# "_exponential", the label A1111's ("DPM++ 2M" + " Karras").
_KINDS = {
    "ddim": (DDIM, "DDIM", ("",)),
    "euler_a": (EulerAncestral, "Euler a", ("",)),
    "euler": (Euler, "Euler", schedules.SCHEDULES),
    "lms": (LMS, "LMS", schedules.SCHEDULES),
    "dpmpp_2m": (DPMPP2M, "DPM++ 2M", schedules.SCHEDULES),
    "dpmpp_sde": (DPMPPSDE, "DPM++ SDE", schedules.SCHEDULES),
    "dpmpp_2m_sde": (DPMPP2MSDE, "DPM++ 2M SDE", schedules.SCHEDULES),
    "unipc": (UniPC, "UniPC", ("",)),
}
SAMPLERS: dict[str, type[Sampler] | partial] = {}
# The names A1111 writes in its "parameters" text (and shows in its sampler list).
SAMPLER_LABELS: dict[str, str] = {}
for _kind, (_cls, _label, _schedules) in _KINDS.items():
    for _schedule in _schedules:
        _key = f"{_kind}_{_schedule}" if _schedule else _kind
        SAMPLERS[_key] = partial(_cls, schedule=_schedule) if _schedule else _cls
        SAMPLER_LABELS[_key] = f"{_label} {SCHEDULE_LABELS[_schedule]}".strip()
# A1111 >= 1.9 writes the schedule apart; "Automatic" means the sampler's own default there.
A1111_AUTOMATIC = {
    "dpmpp_2m": "dpmpp_2m_karras",
    "dpmpp_sde": "dpmpp_sde_karras",
    "dpmpp_2m_sde": "dpmpp_2m_sde_exponential",
}


def sampler_class(name: str) -> type[Sampler]:
    entry = SAMPLERS[name]
    return entry.func if isinstance(entry, partial) else entry


def make_sampler(name: str, steps: int, eta: float = 0.0) -> Sampler:
    """Sampler by name (`SAMPLERS`, e.g. ddim (uses eta), euler_a, dpmpp_2m_karras, dpmpp_sde_karras, unipc)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    s = DDIM(steps, eta) if name == "ddim" else SAMPLERS[name](steps)
    s.name = name
    return s
