"""Stable Diffusion 1.5 + ControlNet on the project's own model code: the library's public names.

A `ModelManager` holds the base model and loads ControlNets, LoRAs, IP-Adapters and VAEs as requests name them;
`ModelManager.run(GenerationRequest)` makes the pictures and returns a `Result` (pictures, A1111 parameters text,
seeds, timings). A request's parts:

- `ControlUnit`: one ControlNet (weight file or folder, hint picture, weight, start/end, control and resize mode);
- `ImagePrompt` (IP-Adapter), `ReferenceUnit` (reference-only), `LoraUnit` (a LoRA for this request), `HiresFix`,
  `FreeU` (its factors; each family's published ones are `ModelFamily.freeu`);
- the choices, as enums whose values are A1111's labels: `ControlMode`, `ResizeMode`, `InpaintMode`, `Upscaler`,
  `Sampler`. `ModelFamily` says what a family of models is made of: `SD15`, `SD2` and `SDXL` are the ones this runs.

Hints: `fitted_hint(preprocessor, picture, width, height)` runs a preprocessor (canny, depth, scribble, ...) and
fits its hint to the picture size, as the app does. Pictures: `load_rgb` reads a file, bytes or an array as HxWx3 uint8; `save_png` writes one with its parameters
text (`Result.text(i)`), as A1111 does, and `read_parameters` reads that text back. Errors a caller can cause are
`CldmError`s: `InputError` (a bad value or picture), `CheckpointError` (an unusable weight file),
`MissingWeightsError` (weights not on this machine); `Stopped`, raised from `run`'s step callback, ends a
generation at a step boundary.

The names that need torch load on first use, so `import cldm` (and `python -m cldm --help`) stays cheap; the
`TYPE_CHECKING` block below says where each one lives.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cldm.errors import CheckpointError, CldmError, InputError, MissingWeightsError, Stopped

if TYPE_CHECKING:
    from cldm.hints.fitted import fitted_hint
    from cldm.io.images import load_rgb, read_parameters, save_png
    from cldm.models.family import SD2, SD15, SDXL, ModelFamily
    from cldm.models.freeu import FreeU
    from cldm.pipeline.extras import HiresFix, ImagePrompt, LoraUnit, ReferenceUnit
    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.pipeline.stages import Result
    from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode, Sampler, Upscaler
    from cldm.runtime.manager import ModelManager

# public name -> the module that defines it (imported when the name is first used)
_HOMES = {
    "ModelManager": "cldm.runtime.manager",
    "GenerationRequest": "cldm.pipeline.request",
    "ControlUnit": "cldm.pipeline.request",
    "ImagePrompt": "cldm.pipeline.extras",
    "ReferenceUnit": "cldm.pipeline.extras",
    "LoraUnit": "cldm.pipeline.extras",
    "HiresFix": "cldm.pipeline.extras",
    "FreeU": "cldm.models.freeu",
    "Result": "cldm.pipeline.stages",
    "ControlMode": "cldm.pipeline.vocabulary",
    "ResizeMode": "cldm.pipeline.vocabulary",
    "InpaintMode": "cldm.pipeline.vocabulary",
    "Upscaler": "cldm.pipeline.vocabulary",
    "Sampler": "cldm.pipeline.vocabulary",
    "ModelFamily": "cldm.models.family",
    "SD15": "cldm.models.family",
    "SD2": "cldm.models.family",
    "SDXL": "cldm.models.family",
    "fitted_hint": "cldm.hints.fitted",
    "load_rgb": "cldm.io.images",
    "save_png": "cldm.io.images",
    "read_parameters": "cldm.io.images",
}

__all__ = [
    "ModelManager",
    "GenerationRequest",
    "ControlUnit",
    "ImagePrompt",
    "ReferenceUnit",
    "LoraUnit",
    "HiresFix",
    "FreeU",
    "Result",
    "ControlMode",
    "ResizeMode",
    "InpaintMode",
    "Upscaler",
    "Sampler",
    "ModelFamily",
    "SD15",
    "SD2",
    "SDXL",
    "fitted_hint",
    "load_rgb",
    "save_png",
    "read_parameters",
    "CldmError",
    "InputError",
    "CheckpointError",
    "MissingWeightsError",
    "Stopped",
]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cldm' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later uses find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
