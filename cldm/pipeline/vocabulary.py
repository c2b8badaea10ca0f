"""The choices a request offers, one enum each, whose values are the labels A1111 shows and writes in its PNG
parameters ("Crop and Resize", "My prompt is more important", "DPM++ 2M Karras").

The library, the CLI, the jobs files, the app and the parameters text all use these enums; no other table maps
names to labels. A member's `key` is its short name (`ResizeMode.CROP.key == "crop"`), the one the CLI flags and
jobs files take. `parse` (and the enum call itself, `ResizeMode("crop")`) accepts the label, the key, and the older
spellings of A1111 and its ControlNet extension ("Scale to Fit (Inner Fit)", "ResizeMode.INNER_FIT", "1"), in any
letter case.
"""

from __future__ import annotations

import enum
import re
from typing import Self

from cldm.errors import InputError
from cldm.sampling.samplers import A1111_AUTOMATIC, SAMPLER_LABELS

_ENUM_PREFIX = re.compile(r"^(?:resize|control)mode\.")  # some extension versions wrote "ResizeMode.INNER_FIT"


class Choice(enum.StrEnum):
    """An enum whose value is A1111's label; its key is the member's name in lower case."""

    @property
    def key(self) -> str:
        return self.name.lower()

    @classmethod
    def keys(cls) -> list[str]:
        return [m.key for m in cls]

    @classmethod
    def parse(cls, value: object) -> Self:
        """The member `value` names (label, key or alias); InputError saying what is allowed when none does."""
        try:
            return cls(value)
        except ValueError:
            words = re.sub(r"(?<!^)([A-Z])", r" \1", cls.__name__).lower()  # ResizeMode -> "resize mode"
            raise InputError(f"{value!r} is not a {words}; choose one of {', '.join(cls.keys())}") from None

    @classmethod
    def coerce(cls, value: object) -> Self | object:
        """The member `value` names, or `value` unchanged when it names none (for a request to report)."""
        try:
            return cls(value)
        except ValueError:
            return value

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        """Older spellings, lower case -> key."""
        return {}

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if not isinstance(value, str):
            return None
        text = _ENUM_PREFIX.sub("", value.strip().lower())
        for m in cls:
            if text in (m.key, m.value.lower()):
                return m
        key = cls._aliases().get(text)
        return cls[key.upper()] if key else None


class ControlMode(Choice):
    """How a ControlNet weighs against the prompt. "prompt": residuals scaled 0.825 ** (12 - i) on both guidance
    halves; "control": the conditional half only, so the guidance scale multiplies its effect."""

    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"0": "balanced", "1": "prompt", "2": "control"}  # the extension's API numbers


class ResizeMode(Choice):
    """How a picture of another shape becomes the picture size (`cldm.pipeline.fit`)."""

    JUST = "Just Resize"
    CROP = "Crop and Resize"
    FILL = "Resize and Fill"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"resize": "just", "0": "just",
                "scale to fit (inner fit)": "crop", "inner_fit": "crop", "1": "crop",
                "envelope (outer fit)": "fill", "outer_fit": "fill", "2": "fill"}  # fmt: skip


class InpaintMode(Choice):
    """What inpainting redraws: "only" keeps the unmasked pixels exactly; "global" redraws the whole picture."""

    ONLY = "Only the painted area (inpaint_only)"
    GLOBAL = "Whole picture (inpaint_global_harmonious)"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"inpaint_only": "only", "inpaint_global_harmonious": "global"}  # the extension's preprocessors


class Upscaler(Choice):
    """The hires fix's upscaler: "latent" is bilinear on the latents; "lanczos" decodes, resizes and encodes."""

    LATENT = "Latent"
    LANCZOS = "Lanczos"


class _SamplerChoice(Choice):
    """A sampler by A1111's label ("DPM++ 2M Karras"); its key is ours ("dpmpp_2m_karras", `SAMPLERS`)."""

    @classmethod
    def from_a1111(cls, label: str, schedule: str | None = None) -> Self:
        """The sampler A1111 >= 1.9 writes in two fields ("DPM++ 2M" + "Schedule type: Karras"); older versions
        write one label. "Automatic" is the sampler's own default schedule there."""
        name, schedule = label.strip().lower(), (schedule or "").strip().lower()
        if schedule not in ("", "automatic", "uniform") and not name.endswith(f" {schedule}"):
            name = f"{name} {schedule}"  # "DPM++ 2M" + "Karras" -> "DPM++ 2M Karras"
        found = cls(name)
        if schedule == "automatic" and found.key in A1111_AUTOMATIC:
            found = cls(A1111_AUTOMATIC[found.key])
        return found


# The members come from the samplers' own table (one per sampler and schedule), in its order.
Sampler = _SamplerChoice("Sampler", [(key.upper(), label) for key, label in SAMPLER_LABELS.items()])

__all__ = ["Choice", "ControlMode", "InpaintMode", "ResizeMode", "Sampler", "Upscaler"]
