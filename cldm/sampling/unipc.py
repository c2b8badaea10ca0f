"""UniPC (Zhao et al. 2023), the unified predictor-corrector sampler, as diffusers' UniPCMultistepScheduler."""

from __future__ import annotations

import torch

from cldm.sampling import schedules
from cldm.sampling.sampler import VPSampler


class UniPC(VPSampler):
    """UniPC (Zhao et al.), diffusers' UniPCMultistepScheduler defaults: order 2, the B(h) = e^h - 1 variant ("bh2"),
    predicting x0, lower order at the start and on the last step. Each step first corrects the previous step's result
    with the new model output (UniC), then predicts the next (UniP). Leading spacing over steps + 1 intervals, as
    diffusers spaces UniPC's timesteps."""

    name = "unipc"
    solver_order = 2

    def __init__(self, steps: int):
        super().__init__(steps)
        self.sigmas, self.timesteps = schedules.solver(steps)
        self.outputs: list[torch.Tensor] = []  # the x0 predictions of the last steps, newest last
        self.last_sample: torch.Tensor | None = None
        self.this_order = 1

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
        lower_final = min(self.solver_order, len(self.timesteps) - i)
        self.this_order = min(lower_final, len(self.outputs))
        self.last_sample = x32
        older = self.outputs[-2] if self.this_order == 2 else None
        return self._update(x32, m, i, i + 1, self.this_order, older, i - 1, None).to(x.dtype)
