"""The SD1.5 noise schedule and the sigma schedules the samplers walk (uniform, Karras, exponential, trailing,
SGM Uniform).

SD1.5 was trained on 1000 steps of a "scaled_linear" beta schedule; a sampler with n steps visits n of its noise
levels. Two families of rules exist in diffusers, and each sampler follows the one its diffusers scheduler uses:
- `spaced`: Euler, Euler a, LMS, DPM++ SDE. The levels of the "leading" timesteps, or a Karras / exponential
  ramp between the highest and the lowest of them; the model sees fractional timesteps.
- `solver`: DPM++ 2M (SDE), UniPC. Leading timesteps over steps + 1 intervals, or a Karras / exponential ramp over
  the whole trained range with the timesteps rounded (Karras) or truncated (exponential) to integers.
Two spacings are the same under both rules, for the few-step models (SDXL-Lightning, Hyper-SD) that were distilled
to start from the last trained timestep: diffusers' "trailing" timesteps, and k-diffusion's "SGM Uniform" (A1111,
ComfyUI), evenly spaced fractional timesteps from 999 towards 0; their sigmas follow from the timesteps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # "scaled_linear": linear in sqrt(beta)
STEPS_OFFSET = 1  # "leading" spacing with offset 1, as SD1.5 was configured
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
SCHEDULES = ("", "karras", "exponential", "trailing", "sgm_uniform")  # "" is the sampler's own (uniform in timesteps)
SPACINGS = ("trailing", "sgm_uniform")  # timesteps first, their sigmas after, whatever the sampler
# A1111's "Schedule type" names; it has no "Trailing" (its "Simple", 999 - floor(1000 k / n), is one timestep higher
# wherever trailing's 999 - round(1000 k / n) rounds up)
SCHEDULE_LABELS = {"": "", "karras": "Karras", "exponential": "Exponential", "trailing": "Trailing",
                   "sgm_uniform": "SGM Uniform"}  # fmt: skip


def alphas_cumprod() -> torch.Tensor:
    """The SD1.5 training schedule (fp32 as diffusers computes it)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def train_sigmas() -> torch.Tensor:
    """sigma = sqrt((1 - a) / a) for each of the 1000 trained timesteps, ascending (fp32)."""
    ac = alphas_cumprod()
    return ((1 - ac) / ac) ** 0.5


def leading_timesteps(steps: int) -> torch.Tensor:
    """[.., 2*r+1, r+1, 1] with r = 1000 // steps, descending."""
    ratio = TRAIN_STEPS // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio) + STEPS_OFFSET


def solver_timesteps(steps: int) -> torch.Tensor:
    """[steps*r+1, .., r+1] with r = 1000 // (steps + 1): diffusers' leading spacing for DPM-Solver and UniPC."""
    ratio = TRAIN_STEPS // (steps + 1)
    t = torch.arange(steps, 0, -1, dtype=torch.int64) * ratio + STEPS_OFFSET
    # 999 steps would start at 1000, past the trained schedule (diffusers then repeats the last sigma and its
    # solver divides by a zero step): the ramp moves down into it instead. Fewer steps never reach 1000.
    return t - max(0, int(t[0]) - (TRAIN_STEPS - 1))


def trailing_timesteps(steps: int) -> torch.Tensor:
    """[999, .., 1000 / steps - 1]: diffusers' "trailing" spacing, each step at the top of its interval (float64).
    Built with numpy's arange as diffusers builds it (its float steps decide which halves round up); at some counts
    (61, 103, ...) that arange makes one entry too many, a timestep -1 past the schedule, which is left off here."""
    t = np.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps)[:steps].round() - 1
    return torch.from_numpy(t)


def sgm_uniform_timesteps(steps: int) -> torch.Tensor:
    """k-diffusion's "SGM Uniform": `steps` fractional timesteps evenly spaced from the last trained one (999)
    towards 0, which the next step would reach (float64)."""
    return torch.linspace(TRAIN_STEPS - 1, 0, steps + 1, dtype=torch.float64)[:-1]


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma at fractional timesteps, interpolated in log sigma between the trained ones (k-diffusion's rule; exact
    at integer timesteps, where diffusers' linear interpolation gives the same)."""
    log_sigmas = log_train_sigmas()
    low = t.floor().long().clamp(0, TRAIN_STEPS - 1)
    high = t.ceil().long().clamp(0, TRAIN_STEPS - 1)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def spacing(steps: int, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas with a final 0 (steps + 1, fp32), timesteps (steps, fp32)) of a spacing in `SPACINGS`."""
    t = trailing_timesteps(steps) if schedule == "trailing" else sgm_uniform_timesteps(steps)
    return torch.cat([t_to_sigma(t).float(), torch.zeros(1)]), t.float()


def noise_scale(sigmas: torch.Tensor, schedule: str) -> torch.Tensor:
    """How much the first noise is scaled in the sigma form x = x0 + sigma noise: sigma_max on the trailing and SGM
    Uniform spacings (diffusers' init_noise_sigma for trailing; k-diffusion always), sqrt(sigma_max^2 + 1) on the
    others (diffusers' init_noise_sigma for leading spacing, which the samplers of A1111's names follow here)."""
    top = sigmas.max()
    return top if schedule in SPACINGS else (top**2 + 1) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    """Evenly spaced in log sigma, from sigma_max down to sigma_min (float64)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def ramp(schedule: str, sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    if schedule == "karras":
        return karras_sigmas(sigma_min, sigma_max, steps)
    if schedule == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, steps)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(repr(s) for s in SCHEDULES)}")


def log_train_sigmas() -> torch.Tensor:
    """log sigma of the trained timesteps, taken in fp32 as diffusers takes it (the last bit decides where a
    truncated timestep lands), then widened."""
    return train_sigmas().log().double()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep whose log-sigma interpolates to `sigma`."""
    log_sigma = sigma.clamp(min=1e-10).log()
    dists = log_sigma[None] - log_sigmas[:, None]  # (1000, n)
    low = (dists >= 0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def spaced(steps: int, schedule: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas with a final 0 (steps + 1, fp32), timesteps (steps, fp32)) by diffusers' Euler / LMS / DPM SDE rule."""
    if schedule in SPACINGS:
        return spacing(steps, schedule)
    leading = leading_timesteps(steps)
    sig = train_sigmas().double()[leading]
    t = leading.to(torch.float64)
    if schedule:
        sig = ramp(schedule, float(sig[-1]), float(sig[0]), steps)
        t = sigma_to_t(sig, log_train_sigmas())
    return torch.cat([sig.float(), torch.zeros(1)]), t.float()


def solver(steps: int, schedule: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas with a final 0 (steps + 1, fp32), integer timesteps (steps,)) by diffusers' DPM-Solver / UniPC rule
    (fractional ones on the SGM Uniform spacing)."""
    if schedule in SPACINGS:
        return spacing(steps, schedule)
    trained = train_sigmas()
    if not schedule:
        t = solver_timesteps(steps)
        sig = trained[t]
    else:
        sig = ramp(schedule, float(trained[0]), float(trained[-1]), steps)
        t = sigma_to_t(sig, log_train_sigmas())
        t = (t.round() if schedule == "karras" else t).to(torch.int64)  # diffusers truncates exponential ones
    return torch.cat([sig.float(), torch.zeros(1)]), t
