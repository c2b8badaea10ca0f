"""The samplers by name: DDIM, Euler (a), LMS, DPM++ 2M (SDE), DPM++ SDE, UniPC, and LCM and TCD for
consistency-distilled models (one module per family), each on its diffusers scheduler's sigma schedules
(`schedules.py`: uniform, Karras, exponential, and the trailing and SGM Uniform spacings of few-step models).

Every sampler works on an epsilon-predicting model and keeps to the same small interface, so the loop in
`cldm/pipeline/stages.py` does not care which one runs:
    x = s.init_noise(noise) or s.add_noise(x0, noise, s.index(start))
    for i in range(s.index(start), len(s.timesteps)): x = s.step(x, eps_model(s.scale_input(x, i), s.timesteps[i]), i, gen)
A second-order sampler (DPM++ SDE) calls the model twice per step, so its `timesteps` hold 2 * steps - 1 entries.
They follow diffusers' schedulers with the SD1.5 scheduler config, step for step, so a seed gives the same picture.
"""

from __future__ import annotations

from functools import partial

from cldm.sampling import schedules
from cldm.sampling.consistency import LCM, TCD
from cldm.sampling.ddim import DDIM
from cldm.sampling.dpmpp_2m import DPMPP2M, DPMPP2MSDE
from cldm.sampling.dpmpp_sde import DPMPPSDE
from cldm.sampling.euler import Euler, EulerAncestral
from cldm.sampling.lms import LMS
from cldm.sampling.sampler import Sampler
from cldm.sampling.schedules import SCHEDULE_LABELS
from cldm.sampling.unipc import UniPC

# Each sampler with the schedules its diffusers scheduler offers; the key is the name plus "_" and the schedule
# ("_karras", "_sgm_uniform"), the label A1111's ("DPM++ 2M" + " Karras").
_SPACED = ("", *schedules.SPACINGS)  # diffusers' Euler a has no Karras or exponential sigmas
_KINDS = {
    "ddim": (DDIM, "DDIM", ("",)),
    "euler_a": (EulerAncestral, "Euler a", _SPACED),
    "euler": (Euler, "Euler", schedules.SCHEDULES),
    "lms": (LMS, "LMS", schedules.SCHEDULES),
    "dpmpp_2m": (DPMPP2M, "DPM++ 2M", schedules.SCHEDULES),
    "dpmpp_sde": (DPMPPSDE, "DPM++ SDE", schedules.SCHEDULES),
    "dpmpp_2m_sde": (DPMPP2MSDE, "DPM++ 2M SDE", schedules.SCHEDULES),
    "unipc": (UniPC, "UniPC", ("",)),
    "lcm": (LCM, "LCM", ("",)),
    "tcd": (TCD, "TCD", ("",)),
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
    """Sampler by name (`SAMPLERS`, e.g. ddim, euler_a, dpmpp_2m_karras, euler_trailing, lcm, tcd). `eta` is DDIM's
    eta and TCD's gamma, as diffusers' pipelines pass it to both (0 by default there too; TCD's cards use 0.3)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    s = SAMPLERS[name](steps, eta) if name in ("ddim", "tcd") else SAMPLERS[name](steps)
    s.name = name
    return s
