"""The SD1.5 noise schedule and samplers (DDIM, Euler ancestral, DPM++ 2M Karras).

Every sampler works on an epsilon-predicting model and keeps to the same small interface, so the loop in
`pipeline.py` does not care which one runs:
    x = s.init_noise(noise) or s.add_noise(x0, noise, start)
    for i in range(start, len(s.timesteps)): x = s.step(x, eps_model(s.scale_input(x, i), s.timesteps[i]), i, gen)
They follow diffusers' DDIMScheduler / EulerAncestralDiscreteScheduler / DPMSolverMultistepScheduler with the
SD1.5 scheduler config, step for step, so a seed gives the same picture.
"""

from __future__ import annotations

import numpy as np
import torch

TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # "scaled_linear": linear in sqrt(beta)
STEPS_OFFSET = 1  # "leading" spacing with offset 1, as SD1.5 was configured
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def alphas_cumprod() -> torch.Tensor:
    """The SD1.5 training schedule (fp32 as diffusers computes it)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(steps: int) -> torch.Tensor:
    """[.., 2*r+1, r+1, 1] with r = 1000 // steps, descending."""
    ratio = TRAIN_STEPS // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio) + STEPS_OFFSET


def _randn(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """Noise shaped like `shape`: from one generator, or row by row from a list of them (one seed per picture)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([_randn((1, *shape[1:]), g, like) for g in generator])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


class Sampler:
    """Base: timesteps, input scaling and forward noising (VP form: x = sqrt(a) x0 + sqrt(1-a) noise)."""

    name = "base"

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.ac = alphas_cumprod()
        self.timesteps = leading_timesteps(steps)

    def init_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        a = self.ac[int(self.timesteps[i])].to(x0.device, torch.float32)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


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


class _SigmaSampler(Sampler):
    """Samplers that think in sigma = sqrt((1 - a) / a)."""

    def __init__(self, steps: int):
        super().__init__(steps)
        self.train_sigmas = ((1 - self.ac) / self.ac) ** 0.5


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


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep whose log-sigma interpolates to `sigma`."""
    log_sigma = sigma.clamp(min=1e-10).log()
    dists = log_sigma[None] - log_sigmas[:, None]  # (1000, n)
    low = (dists >= 0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


class DPMPP2MKarras(_SigmaSampler):
    """DPM-Solver++(2M) with Karras sigmas, in diffusers' VP form (x unscaled, first order on the last step)."""

    name = "dpmpp_2m_karras"

    def __init__(self, steps: int):
        super().__init__(steps)
        sig = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), steps)
        log_sigmas = self.train_sigmas.double().log()
        self.timesteps = sigma_to_t(sig, log_sigmas).round().to(torch.int64)
        self.sigmas = torch.cat([sig.float(), torch.zeros(1)])  # final sigma 0: the last step returns x0
        self.prev_x0: torch.Tensor | None = None

    def add_noise(self, x0, noise, i):
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)

    @staticmethod
    def _alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1 / (s**2 + 1) ** 0.5
        return alpha, s * alpha

    def _lambda(self, i: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return alpha.log() - sigma.log()

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

    def step(self, x, eps, i, generator):
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        x32 = x.float()
        x0 = x32 - s_from * eps.float()
        return (x32 + (x32 - x0) / s_from * (s_to - s_from)).to(x.dtype)


class DPMPP2MSDEKarras(DPMPP2MKarras):
    """DPM-Solver++(2M) SDE with Karras sigmas (diffusers' "sde-dpmsolver++", midpoint): every step adds fresh noise
    of the size the step removed, so it needs the generator as Euler a does."""

    name = "dpmpp_2m_sde_karras"

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


class LMSKarras(_SigmaSampler):
    """Linear multistep (order 4) on Karras sigmas, as diffusers' LMSDiscreteScheduler(use_karras_sigmas=True): the
    sigmas span those of the leading timesteps, the model sees fractional timesteps, and each step integrates the
    Lagrange polynomial through the last derivatives (exactly, where diffusers integrates numerically)."""

    name = "lms_karras"
    order = 4

    def __init__(self, steps: int):
        super().__init__(steps)
        leading = self.train_sigmas.double()[self.timesteps]
        sig = karras_sigmas(float(leading[-1]), float(leading[0]), steps)
        self.timesteps = sigma_to_t(sig, self.train_sigmas.double().log()).float()
        self.sigmas = torch.cat([sig.float(), torch.zeros(1)])
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
        if len(self.derivatives) > self.order:
            self.derivatives.pop(0)
        order = min(i + 1, self.order)  # diffusers' rule (with img2img it may exceed the derivatives kept)
        coeffs = [self.coefficient(order, i, j) for j in range(order)]
        return (x32 + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))).to(x.dtype)


class UniPC(_SigmaSampler):
    """UniPC (Zhao et al.), diffusers' UniPCMultistepScheduler defaults: order 2, the B(h) = e^h - 1 variant ("bh2"),
    predicting x0, lower order at the start and on the last step. Each step first corrects the previous step's result
    with the new model output (UniC), then predicts the next (UniP). Leading spacing over steps + 1 intervals, as
    diffusers spaces UniPC's timesteps."""

    name = "unipc"
    order = 2

    def __init__(self, steps: int):
        super().__init__(steps)
        ratio = TRAIN_STEPS // (steps + 1)
        self.timesteps = torch.arange(steps, 0, -1, dtype=torch.int64) * ratio + STEPS_OFFSET
        self.sigmas = torch.cat([self.train_sigmas[self.timesteps].float(), torch.zeros(1)])
        self.outputs: list[torch.Tensor] = []  # the x0 predictions of the last steps, newest last
        self.last_sample: torch.Tensor | None = None
        self.this_order = 1

    _alpha_sigma = staticmethod(DPMPP2MKarras._alpha_sigma)

    def add_noise(self, x0, noise, i):
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)

    def _lambda(self, i: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return alpha.log() - sigma.log()

    def _coefficients(self, h: torch.Tensor, rks: list[torch.Tensor], order: int):
        """(h phi_1, B(h), b): the exponential-integrator terms and the right-hand side of the order conditions."""
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k, factorial, b_h = h_phi_1 / hh - 1, 1, torch.expm1(hh)
        b = []
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rows = torch.stack([torch.stack([*rks, torch.ones(())]) ** (k - 1) for k in range(1, order + 1)])
        return h_phi_1, b_h, torch.stack(b), rows

    def _update(self, x, m0, s_from: int, s_to: int, order: int, older: torch.Tensor | None, s_older: int,
                model_t: torch.Tensor | None):  # fmt: skip
        """UniP (model_t None) or UniC from step s_from to s_to, with the x0 estimate m0 made at s_from."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[s_to])
        _, sigma_s = self._alpha_sigma(self.sigmas[s_from])
        h = self._lambda(s_to) - self._lambda(s_from)
        rks, d1 = [], None
        if order == 2:
            rk = (self._lambda(s_older) - self._lambda(s_from)) / h
            rks, d1 = [rk], (older - m0) / rk
        h_phi_1, b_h, b, rows = self._coefficients(h, rks, order)
        base = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
        if model_t is None:  # predictor
            return base if d1 is None else base - alpha_t * b_h * 0.5 * d1
        rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, b)
        res = 0 if d1 is None else rhos[0] * d1
        return base - alpha_t * b_h * (res + rhos[-1] * (model_t - m0))

    def step(self, x, eps, i, generator):
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        x32 = x.float()
        m = (x32 - sigma_s * eps.float()) / alpha_s
        if self.last_sample is not None:  # UniC: correct the last prediction with this step's model output
            older = self.outputs[-2] if self.this_order == 2 else None
            x32 = self._update(self.last_sample, self.outputs[-1], i - 1, i, self.this_order, older, i - 2, m)
        self.outputs = [*self.outputs[-1:], m]
        lower_final = min(self.order, len(self.timesteps) - i)
        self.this_order = min(lower_final, len(self.outputs))
        self.last_sample = x32
        older = self.outputs[-2] if self.this_order == 2 else None
        return self._update(x32, m, i, i + 1, self.this_order, older, i - 1, None).to(x.dtype)


SAMPLERS = {cls.name: cls for cls in (DDIM, EulerAncestral, Euler, DPMPP2MKarras, DPMPP2MSDEKarras, LMSKarras, UniPC)}
# The names A1111 writes in its "parameters" text (and shows in its sampler list).
SAMPLER_LABELS = {
    "ddim": "DDIM", "euler_a": "Euler a", "euler": "Euler", "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "lms_karras": "LMS Karras", "unipc": "UniPC",
}  # fmt: skip


def make_sampler(name: str, steps: int, eta: float = 0.0) -> Sampler:
    """Sampler by name (`SAMPLERS`): ddim (uses eta), euler_a, euler, dpmpp_2m_karras, dpmpp_2m_sde_karras,
    lms_karras."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return DDIM(steps, eta) if name == "ddim" else SAMPLERS[name](steps)
