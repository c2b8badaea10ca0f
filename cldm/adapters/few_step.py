"""Few-step LoRAs: the distilled LoRAs that make a base sample in 1-8 steps, and the settings their model cards ask
for, proposed when one is loaded (the user may override them).

| LoRA (published files)                                   | sampler                 | steps        | guidance |
|----------------------------------------------------------|-------------------------|--------------|----------|
| LCM-LoRA SD1.5 / SDXL (latent-consistency/lcm-lora-*)     | LCM                     | 4            | 1.0      |
| TCD-LoRA SD1.5 / SDXL (h1t/TCD-SD15-LoRA, TCD-SDXL-LoRA)  | TCD, gamma 0.3          | 4            | 1.0      |
| Hyper-SD N-step (ByteDance/Hyper-SD, Hyper-SD15-8steps..) | Euler, trailing spacing | N            | 1.0      |
| Hyper-SD N-step CFG (Hyper-SDXL-8steps-CFG-lora)          | Euler, trailing spacing | N            | 5.0      |
| Hyper-SD 1-step unified (Hyper-SD15-1step-lora)           | TCD, gamma 1.0          | 1            | 1.0      |
| SDXL-Lightning N-step (ByteDance/SDXL-Lightning)          | Euler, trailing spacing | N            | 1.0      |

Guidance 1.0 here is diffusers' guidance_scale 0 (no classifier-free guidance: one UNet batch, half the work).
Hyper-SD's cards name DDIM with trailing spacing; deterministic DDIM is Euler on the same noise levels (both step
the probability-flow ODE in x / alpha), so Euler on trailing timesteps takes the same path.

How a file is recognised: these LoRAs carry no marker of their own in their tensors (diffusers saves them with
{"format": "pt"} as the only metadata, and users rename them: every LCM-LoRA downloads as
`pytorch_lora_weights.safetensors`), so the name a trainer wrote into the metadata (kohya's `ss_output_name`,
`modelspec.title`) is read first, then the file's stem, then the names of the three folders above it (the hub's cache keeps a file under
`models--<org>--<repo>/snapshots/<commit>/`). This only
proposes settings; what the file is (its family, its layers) is still read from its content by `lora.parse`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cldm.errors import CheckpointError
from cldm.io.files import read_metadata

TCD_GAMMA = 0.3  # the TCD card's default "eta" (gamma): how much fresh noise each step keeps
HYPER_CFG_GUIDANCE = 5.0  # the Hyper-SD CFG LoRAs' card: guidance 5-8
_METADATA_NAMES = ("ss_output_name", "modelspec.title", "name")
_STEPS = re.compile(r"(\d+)[-_ ]?steps?", re.IGNORECASE)


@dataclass(frozen=True)
class Proposal:
    """The settings a few-step LoRA's card asks for."""

    kind: str  # what was recognised, as users name it ("LCM-LoRA")
    sampler: str  # our sampler key
    steps: int
    cfg_scale: float
    eta: float = 0.0  # TCD's gamma

    def text(self, name: str) -> str:
        gamma = f", gamma {self.eta:g}" if self.sampler == "tcd" else ""
        return (f"{name} is a {self.kind}: its card asks for sampler {self.sampler}{gamma}, {self.steps} steps, "
                f"guidance {self.cfg_scale:g}")  # fmt: skip


def _steps(name: str, default: int) -> int:
    found = _STEPS.search(name)
    return int(found.group(1)) if found else default


def proposal_for_name(name: str) -> Proposal | None:
    """The proposal for a LoRA called `name` (a file stem, a repo or a trainer's output name), None if unknown."""
    low = name.lower().replace("_", "-")
    if "lcm" in low and "lora" in low or low.startswith("lcm-"):
        return Proposal("LCM-LoRA", "lcm", 4, 1.0)
    if "tcd" in low:
        return Proposal("TCD-LoRA", "tcd", 4, 1.0, TCD_GAMMA)
    if "hyper-sd" in low or "hypersd" in low:
        steps = _steps(low, 8)
        if steps == 1:  # the unified 1-step LoRA: the TCD scheduler with gamma 1 (the card's eta=1.0)
            return Proposal("Hyper-SD 1-step LoRA", "tcd", 1, 1.0, 1.0)
        cfg = HYPER_CFG_GUIDANCE if "cfg" in low else 1.0
        return Proposal(f"Hyper-SD {steps}-step LoRA", "euler_trailing", steps, cfg)
    if "lightning" in low:
        steps = _steps(low, 4)
        return Proposal(f"SDXL-Lightning {steps}-step LoRA", "euler_trailing", steps, 1.0)
    return None


def proposal_for(path: str | os.PathLike) -> Proposal | None:
    """The proposal for the LoRA file at `path` (its metadata's name, its stem, its folder), None if unknown.
    A file whose header cannot be read proposes nothing here: loading it reports the damage."""
    p = Path(path)
    names = []
    try:
        meta = read_metadata(p) if p.is_file() else {}
    except CheckpointError:
        meta = {}
    names += [meta[k] for k in _METADATA_NAMES if meta.get(k)]
    names += [p.stem, *(folder.name for folder in list(p.parents)[:3])]  # the hub cache: models--org--repo/...
    for name in names:
        if (found := proposal_for_name(name)) is not None:
            return found
    return None
