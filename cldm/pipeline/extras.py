"""The optional parts of a generation request: an image prompt, a reference, LoRAs, the hires fix; and the field
checks every request type shares. `cldm.pipeline.request` holds the request and its ControlNet units."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real

import numpy as np

from cldm.adapters.ip_masks import mask_problem
from cldm.adapters.ip_scales import scale_numbers
from cldm.adapters.reference import MODES as REFERENCE_MODES
from cldm.errors import InputError
from cldm.pipeline.vocabulary import Upscaler

# SD's schedule has 1000 noise levels; with its "leading" spacing and offset 1, 1000 steps would ask for level 1000.
MAX_STEPS = 999
MAX_IP_SCALE = 5.0
MAX_IMAGE_PROMPTS = 8  # IP-Adapters in one request: each adds a key/value path to every cross-attention
MAX_HIRES_SIZE = 2048  # the hires pass's largest side
MAX_LORA_WEIGHT = 10.0


@dataclass(frozen=True)
class ImagePrompt:
    """An IP-Adapter image prompt: the adapter, its CLIP image encoder, one or more pictures (their encoder features
    are averaged), a scale: a number, or diffusers' per-block dictionary ({"down": {"block_2": [0.0, 1.0]}, ...}),
    and an optional region `mask` (HxW uint8 or bool, white = where it acts; `ip_masks` gives the rule).

    `adapter` and `encoder` are files/folders (the model manager loads them) or loaded modules."""

    adapter: object  # str | os.PathLike | ip_adapter.IPAdapter
    images: tuple[np.ndarray, ...]
    encoder: object = None  # str | os.PathLike | image_encoder.ImageEncoder
    scale: float | dict = 1.0
    name: str = ""
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        images = self.images if isinstance(self.images, (list, tuple)) else (self.images,)
        object.__setattr__(self, "images", tuple(images))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return stem(self.adapter) if isinstance(self.adapter, (str, os.PathLike)) else "ip-adapter"

    def problems(self, where: str = "image_prompt") -> list[str]:
        """What is wrong with this image prompt (`where` names it in messages); empty when it is fine."""
        out = []
        if not self.images:
            out.append(f"{where}: give at least one picture")
        for i, img in enumerate(self.images):
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                out.append(f"{where}.images[{i}] must be an HxWx3 uint8 picture")
        if self.encoder is None:
            out.append(f"{where}.encoder is missing: give the image-encoder folder (models/image_encoder)")
        try:
            scales = scale_numbers(self.scale)  # its form; the layout is checked against the base
            if any(not 0 <= x <= MAX_IP_SCALE for x in scales):
                out.append(f"{where}.scale must be 0..{MAX_IP_SCALE:g} (got {self.scale})")
        except (InputError, TypeError, ValueError) as e:
            out.append(f"{where}.scale: {e}")
        if self.mask is not None and (why := mask_problem(self.mask)) is not None:
            out.append(f"{where}.mask {why}")
        return out


@dataclass(frozen=True)
class ReferenceUnit:
    """Reference-only control (A1111's reference_only / reference_adain / reference_adain+attn; `cldm.adapters.reference`)."""

    image: np.ndarray  # HxWx3 uint8, resized to the picture size
    mode: str = "only"  # "only", "adain", "adain+attn"
    style_fidelity: float = 0.5  # 0..1: 1 keeps the reference out of the unconditional half
    weight: float = 1.0  # which blocks take part (the extension's control weight)
    start: float = 0.0
    end: float = 1.0

    def problems(self) -> list[str]:
        out = [f"reference: {p}" for p in number_problems(self, ("style_fidelity", "weight", "start", "end"))]
        if out:
            return out
        if self.mode not in REFERENCE_MODES:
            out.append(f"reference.mode must be one of {', '.join(REFERENCE_MODES)} (got {self.mode!r})")
        if not 0 <= self.style_fidelity <= 1:
            out.append(f"reference.style_fidelity must be 0..1 (got {self.style_fidelity})")
        if not 0 <= self.weight <= 2:
            out.append(f"reference.weight must be 0..2 (got {self.weight})")
        if not 0 <= self.start < self.end <= 1:
            out.append(f"reference: need 0 <= start < end <= 1 (got start {self.start}, end {self.end})")
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            out.append("reference.image must be an HxWx3 uint8 picture")
        return out


@dataclass(frozen=True)
class LoraUnit:
    """A LoRA in a request: a file (the model manager loads it) or a loaded `lora.Lora`, and its weight."""

    model: object
    weight: float = 1.0  # the UNet's (and the text encoder's, unless text_weight is given)
    text_weight: float | None = None  # A1111's <lora:name:te:unet>: the text encoder's own weight

    @property
    def label(self) -> str:
        name = getattr(self.model, "name", None)
        return name if isinstance(name, str) else stem(self.model)

    def problems(self, i: int) -> list[str]:
        names = ("weight",) if self.text_weight is None else ("weight", "text_weight")
        out = [f"LoRA {i + 1}: {p}" for p in number_problems(self, names)]
        for name in names if not out else ():
            if not -MAX_LORA_WEIGHT <= getattr(self, name) <= MAX_LORA_WEIGHT:
                out.append(f"LoRA {i + 1} ({self.label}): {name} must be -{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g} "
                           f"(got {getattr(self, name)})")  # fmt: skip
        return out


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: after the first pass, the latents (or the decoded pictures) are upscaled by `scale` and
    denoised again from `strength` (img2img), the ControlNet hints fitted to the new size. As in A1111, exactly
    `steps` steps run (0: as many as the first pass): the last ones of a schedule of int(steps / strength) steps."""

    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7
    upscaler: Upscaler = Upscaler.LATENT  # or any name `Upscaler.parse` reads ("lanczos")

    def __post_init__(self) -> None:
        object.__setattr__(self, "upscaler", Upscaler.coerce(self.upscaler))

    def size(self, width: int, height: int, f: int = 8) -> tuple[int, int]:
        """The second pass's size: the first pass's times `scale`, cut down to multiples of `f` (A1111 truncates)."""
        return max(f, int(width * self.scale) // f * f), max(f, int(height * self.scale) // f * f)

    def schedule(self, first_steps: int) -> tuple[int, int]:
        """(steps that run, steps of the schedule they end)."""
        steps = int(self.steps) or int(first_steps)
        return steps, int(steps / min(self.strength, 0.999))

    def problems(self, width: int, height: int, f: int, first_steps: int = 1) -> list[str]:
        out = [f"hires: {p}" for p in number_problems(self, ("scale", "steps", "strength"))]
        if out:
            return out
        if not 1 <= self.scale <= 4:
            out.append(f"hires.scale must be 1..4 (got {self.scale})")
        elif max(self.size(width, height, f)) > MAX_HIRES_SIZE:
            w, h = self.size(width, height, f)
            out.append(f"hires: {width}x{height} x {self.scale:g} = {w}x{h} px; the hires pass allows at most "
                       f"{MAX_HIRES_SIZE} px a side. Lower the scale or the first-pass size.")  # fmt: skip
        if self.steps != int(self.steps) or not 0 <= self.steps <= MAX_STEPS:
            out.append(f"hires.steps must be a whole number 0..{MAX_STEPS} (0 = as the first pass; got {self.steps})")
        if not 0 < self.strength <= 1:
            out.append(f"hires.strength (denoising strength) must be in (0, 1] (got {self.strength})")
        elif self.steps == int(self.steps) and int((self.steps or first_steps) / min(self.strength, 0.999)) > MAX_STEPS:
            steps = int(self.steps or first_steps)
            out.append(f"hires: {steps} steps at strength {self.strength} need a schedule of over {MAX_STEPS} steps; "
                       "raise the hires strength or lower the hires steps")  # fmt: skip
        if not isinstance(self.upscaler, Upscaler):
            out.append(f"hires.upscaler must be one of {', '.join(Upscaler.keys())} (got {self.upscaler!r})")
        return out


def number_problems(obj, names: tuple[str, ...]) -> list[str]:
    """Fields that are missing, not numbers (booleans are not numbers here) or not finite."""
    out = []
    for name in names:
        v = getattr(obj, name)
        if v is None:
            out.append(f"{name} is missing: give a number")
        elif isinstance(v, bool) or not isinstance(v, Real):
            out.append(f"{name} must be a number (got {type(v).__name__})")
        elif not math.isfinite(v):
            out.append(f"{name} must be a finite number (got {v})")
    return out


def stem(path: str | os.PathLike) -> str:
    """A weight file's or folder's name without its extension (what users call the model); a folder's name, or a
    name whose dot is no weight extension ("controlnet-canny-sdxl-1.0"), is kept whole."""
    name = str(path).rstrip("/").split("/")[-1]
    base, dot, ext = name.rpartition(".")
    return base if dot and ext.lower() in WEIGHT_EXTENSIONS else name


WEIGHT_EXTENSIONS = ("safetensors", "ckpt", "pth", "pt", "bin")
