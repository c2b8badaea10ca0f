"""What one generation asks for: a GenerationRequest with its ControlUnits, validated in one place.

The CLI, the app, the model manager and `pipeline.generate` all speak these two types; nothing else describes a
request or a ControlNet in it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from numbers import Real

import numpy as np
import torch

from .controlnet import ControlNet
from .errors import InputError
from .fit import RESIZE_MODES
from .ip_adapter import layer_scales
from .reference import MODES as REFERENCE_MODES
from .samplers import SAMPLERS

# A1111's control modes, by the names its API uses for them: Balanced, My prompt is more important, ControlNet is
# more important.
CONTROL_MODES = ("balanced", "prompt", "control")
# diffusers' guess mode spaces the 13 scales logarithmically from 0.1 to 1 instead of the original 0.825 decay.
GUESS_STYLES = ("original", "diffusers")
# SD's schedule has 1000 noise levels; with its "leading" spacing and offset 1, 1000 steps would ask for level 1000.
MAX_STEPS = 999
MAX_CFG = 100.0
MIN_SIZE, MAX_SIZE = 64, 4096
MAX_BATCH = 64
MAX_CONTROL_SCALE = 10.0
MAX_IP_SCALE = 5.0
MAX_HIRES_SIZE = 2048  # the hires pass's largest side
HIRES_UPSCALERS = ("latent", "lanczos")  # A1111's "Latent" (bilinear on the latents) and a picture upscaler
INPAINT_MODES = ("only", "global")  # the extension's inpaint_only and inpaint_global_harmonious
MAX_MASK_BLUR = 64.0
MAX_LORA_WEIGHT = 10.0


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet in a request: which weights, which hint, how strongly and when.

    `model` is a weight file or folder (the model manager loads it) or an already loaded ControlNet.
    """

    model: str | os.PathLike | ControlNet
    hint: np.ndarray | torch.Tensor  # HxWx3 uint8, or (1, 3, H, W) float in [0, 1] (-1 marks inpaint holes)
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before which this ControlNet is off
    end: float = 1.0  # fraction of the steps after which it is off
    global_average_pooling: bool | None = None  # None: as the weights say (the original shuffle .pth cannot say)
    name: str = ""  # shown in the parameters; by default the weight file's stem
    # A1111's control mode: "balanced"; "prompt" (My prompt is more important: residuals scaled 0.825 ** (12 - i) on
    # both guidance halves); "control" (ControlNet is more important: the conditional half only, so the CFG scale
    # multiplies its effect)
    mode: str = "balanced"
    resize_mode: str = "crop"  # how a hint of another shape becomes the picture size (`cldm.fit`)
    # what made the hint, for the parameters text only (A1111's Module, Processor Res, Pixel Perfect)
    preprocessor: str = ""
    processor_res: int | None = None
    pixel_perfect: bool = False

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "controlnet" if isinstance(self.model, ControlNet) else stem(self.model)

    def problems(self, i: int) -> list[str]:
        """What is wrong with this unit (`i` numbers it in messages); empty when it is fine."""
        who = f"ControlNet {i + 1} ({self.label})"
        out = [f"{who}: {p}" for p in _number_problems(self, ("scale", "start", "end"))]
        if out:
            return out
        if not 0 <= self.scale <= MAX_CONTROL_SCALE:
            out.append(f"{who}: scale must be 0..{MAX_CONTROL_SCALE:g} (got {self.scale})")
        if not 0 <= self.start < self.end <= 1:
            out.append(f"{who}: need 0 <= start < end <= 1 (got start {self.start}, end {self.end})")
        if self.mode not in CONTROL_MODES:
            out.append(f"{who}: mode must be one of {', '.join(CONTROL_MODES)} (got {self.mode!r})")
        if self.resize_mode not in RESIZE_MODES:
            out.append(f"{who}: resize_mode must be one of {', '.join(RESIZE_MODES)} (got {self.resize_mode!r})")
        if not isinstance(self.model, (ControlNet, str, os.PathLike)):
            out.append(
                f"{who}: model must be a weight file, a folder or a ControlNet (got {type(self.model).__name__})"
            )
        hint = self.hint
        if isinstance(hint, np.ndarray):
            if hint.ndim != 3 or hint.shape[2] != 3 or hint.dtype != np.uint8 or 0 in hint.shape:
                out.append(f"{who}: hint must be an HxWx3 uint8 picture (got {hint.dtype} {hint.shape})")
        elif isinstance(hint, torch.Tensor):
            if hint.ndim != 4 or hint.shape[:2] != (1, 3) or 0 in hint.shape:
                out.append(f"{who}: hint tensor must be (1, 3, H, W) (got {tuple(hint.shape)})")
        else:
            out.append(f"{who}: hint is missing: give a picture (got {type(hint).__name__})")
        return out


@dataclass(frozen=True)
class ImagePrompt:
    """An IP-Adapter image prompt: the adapter, its CLIP image encoder, one or more pictures (their embeddings are
    averaged) and a scale: a number, or diffusers' per-block dictionary ({"down": {"block_2": [0.0, 1.0]}, ...}).

    `adapter` and `encoder` are files/folders (the model manager loads them) or loaded modules."""

    adapter: object  # str | os.PathLike | ip_adapter.IPAdapter
    images: tuple[np.ndarray, ...]
    encoder: object = None  # str | os.PathLike | image_encoder.ImageEncoder
    scale: float | dict = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        images = self.images if isinstance(self.images, (list, tuple)) else (self.images,)
        object.__setattr__(self, "images", tuple(images))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return stem(self.adapter) if isinstance(self.adapter, (str, os.PathLike)) else "ip-adapter"

    def problems(self) -> list[str]:
        out = []
        if not self.images:
            out.append("image_prompt: give at least one picture")
        for i, img in enumerate(self.images):
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                out.append(f"image_prompt.images[{i}] must be an HxWx3 uint8 picture")
        if self.encoder is None:
            out.append("image_prompt.encoder is missing: give the image-encoder folder (models/image_encoder)")
        try:
            scales = layer_scales(self.scale)
            if any(not 0 <= x <= MAX_IP_SCALE for x in scales):
                out.append(f"image_prompt.scale must be 0..{MAX_IP_SCALE:g} (got {self.scale})")
        except (InputError, TypeError, ValueError) as e:
            out.append(f"image_prompt.scale: {e}")
        return out


@dataclass(frozen=True)
class ReferenceUnit:
    """Reference-only control (A1111's reference_only / reference_adain / reference_adain+attn; `cldm.reference`)."""

    image: np.ndarray  # HxWx3 uint8, resized to the picture size
    mode: str = "only"  # "only", "adain", "adain+attn"
    style_fidelity: float = 0.5  # 0..1: 1 keeps the reference out of the unconditional half
    weight: float = 1.0  # which blocks take part (the extension's control weight)
    start: float = 0.0
    end: float = 1.0

    def problems(self) -> list[str]:
        out = [f"reference: {p}" for p in _number_problems(self, ("style_fidelity", "weight", "start", "end"))]
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
    weight: float = 1.0

    @property
    def label(self) -> str:
        name = getattr(self.model, "name", None)
        return name if isinstance(name, str) else stem(self.model)

    def problems(self, i: int) -> list[str]:
        out = [f"LoRA {i + 1}: {p}" for p in _number_problems(self, ("weight",))]
        if not out and not -MAX_LORA_WEIGHT <= self.weight <= MAX_LORA_WEIGHT:
            out.append(f"LoRA {i + 1} ({self.label}): weight must be -{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g} "
                       f"(got {self.weight})")  # fmt: skip
        return out


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: after the first pass, the latents (or the decoded pictures) are upscaled by `scale` and
    denoised again from `strength` (img2img), the ControlNet hints fitted to the new size. As in A1111, exactly
    `steps` steps run (0: as many as the first pass): the last ones of a schedule of int(steps / strength) steps."""

    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7
    upscaler: str = "latent"  # "latent": bilinear on the latents; "lanczos": decode, resize the pictures, encode

    def size(self, width: int, height: int, f: int = 8) -> tuple[int, int]:
        """The second pass's size: the first pass's times `scale`, cut down to multiples of `f` (A1111 truncates)."""
        return max(f, int(width * self.scale) // f * f), max(f, int(height * self.scale) // f * f)

    def schedule(self, first_steps: int) -> tuple[int, int]:
        """(steps that run, steps of the schedule they end)."""
        steps = int(self.steps) or int(first_steps)
        return steps, int(steps / min(self.strength, 0.999))

    def problems(self, width: int, height: int, f: int) -> list[str]:
        out = [f"hires: {p}" for p in _number_problems(self, ("scale", "steps", "strength"))]
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
        elif int((self.steps or 1) / min(self.strength, 0.999)) > MAX_STEPS:
            out.append(f"hires: {self.steps} steps at strength {self.strength} need a {MAX_STEPS}+ step schedule; "
                       "raise the strength or lower the steps")  # fmt: skip
        if self.upscaler not in HIRES_UPSCALERS:
            out.append(f"hires.upscaler must be one of {', '.join(HIRES_UPSCALERS)} (got {self.upscaler!r})")
        return out


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call of `pipeline.generate` takes, besides the model.

    Classifier-free guidance runs the negative and positive prompt in one batch (off when cfg_scale <= 1). Guess
    mode runs ControlNets on the conditional half only, with the residual scales of `guess_style`. `init_image`
    (HxWx3 uint8) with `strength` < 1 is img2img; adding `mask` (HxW, 1 or 255 = repaint) inpaints and, with
    `inpaint_mode` "only", keeps the unmasked pixels. A batch shares one noise generator (diffusers) unless
    `seed_per_picture` gives picture i the seed `seed + i` (A1111).
    """

    prompt: str
    negative_prompt: str = ""
    units: tuple[ControlUnit, ...] = ()
    steps: int = 20
    cfg_scale: float = 7.5
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    width: int = 512
    height: int = 512
    batch: int = 1
    guess_mode: bool = False
    guess_style: str = "original"
    clip_skip: int = 1
    init_image: np.ndarray | None = None
    strength: float = 1.0
    mask: np.ndarray | None = None
    image_prompt: ImagePrompt | None = None
    reference: ReferenceUnit | None = None
    resize_mode: str = "crop"  # how the init picture and the mask become the picture size (`cldm.fit`)
    mask_blur: float = 0.0  # Gaussian sigma in px for the mask's edge (the 1.1 inpaint app's default is 5)
    inpaint_mode: str = "only"  # "only": the unmasked area is kept exactly; "global": the whole picture is redrawn
    seed_per_picture: bool = False  # A1111: picture i has its own noise from seed + i (reproducible alone)
    hires: HiresFix | None = None
    emphasis: bool = True  # A1111's (word:1.2) / [word] / BREAK syntax; False: the prompt is taken literally
    loras: tuple[LoraUnit, ...] = ()  # merged into the UNet and text encoder for this request only

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))  # a list given by a caller stays immutable here
        object.__setattr__(self, "loras", tuple(self.loras))

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def validate(self, latent_factor: int = 8) -> GenerationRequest:
        """Raise InputError naming every field that is wrong (and what is allowed); return self when all is well."""
        problems = _text_problems(self) + _number_problems(
            self,
            ("steps", "cfg_scale", "eta", "seed", "width", "height", "batch", "clip_skip", "strength", "mask_blur"),
        )
        if not problems:
            problems += self._range_problems(latent_factor)
        for i, unit in enumerate(self.units):
            if not isinstance(unit, ControlUnit):
                problems.append(f"units[{i}] must be a ControlUnit (got {type(unit).__name__})")
            else:
                problems += unit.problems(i)
        if self.image_prompt is not None:
            if isinstance(self.image_prompt, ImagePrompt):
                problems += self.image_prompt.problems()
            else:
                problems.append(f"image_prompt must be an ImagePrompt (got {type(self.image_prompt).__name__})")
        if self.reference is not None:
            if isinstance(self.reference, ReferenceUnit):
                problems += self.reference.problems()
            else:
                problems.append(f"reference must be a ReferenceUnit (got {type(self.reference).__name__})")
        for i, u in enumerate(self.loras):
            problems += u.problems(i) if isinstance(u, LoraUnit) else [f"loras[{i}] must be a LoraUnit"]
        if self.hires is not None:
            if not isinstance(self.hires, HiresFix):
                problems.append(f"hires must be a HiresFix (got {type(self.hires).__name__})")
            elif not any(p.startswith(("width", "height")) for p in problems):
                problems += self.hires.problems(self.width, self.height, latent_factor)
                if self.mask is not None:
                    problems.append("hires: the hires fix does not combine with inpainting; leave one out")
        if problems:
            raise InputError("; ".join(problems))
        return self

    def _range_problems(self, f: int) -> list[str]:
        out = []
        for name in ("steps", "seed", "width", "height", "batch", "clip_skip"):
            if getattr(self, name) != int(getattr(self, name)):
                out.append(f"{name} must be a whole number (got {getattr(self, name)})")
        if not 1 <= self.steps <= MAX_STEPS:
            out.append(f"steps must be 1..{MAX_STEPS} (got {self.steps})")
        if not 0 <= self.cfg_scale <= MAX_CFG:
            out.append(f"cfg_scale (guidance scale) must be 0..{MAX_CFG:g} (got {self.cfg_scale})")
        if not (MIN_SIZE <= self.width <= MAX_SIZE and MIN_SIZE <= self.height <= MAX_SIZE):
            out.append(f"width and height must be {MIN_SIZE}..{MAX_SIZE} px (got {self.width}x{self.height})")
        elif self.width % f or self.height % f:
            out.append(f"width and height must be multiples of {f} (got {self.width}x{self.height})")
        if not 1 <= self.batch <= MAX_BATCH:
            out.append(f"batch must be 1..{MAX_BATCH} (got {self.batch})")
        if not 0 < self.strength <= 1:
            out.append(f"strength (denoising strength) must be in (0, 1] (got {self.strength})")
        if not -(2**63) <= self.seed < 2**64:
            out.append(f"seed must fit in 64 bits (got {self.seed})")
        elif self.seed_per_picture and self.seed + self.batch - 1 >= 2**64:
            out.append(f"seed + picture number must fit in 64 bits with seed_per_picture (got {self.seed})")
        if self.eta < 0:
            out.append(f"eta must be 0 or more (got {self.eta})")
        if self.clip_skip < 1:
            out.append(f"clip_skip must be 1 or more (1 = the last CLIP layer; got {self.clip_skip})")
        if self.sampler not in SAMPLERS:
            out.append(f"sampler must be one of {', '.join(sorted(SAMPLERS))} (got {self.sampler!r})")
        if self.guess_style not in GUESS_STYLES:
            out.append(f"guess_style must be one of {', '.join(GUESS_STYLES)} (got {self.guess_style!r})")
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, np.ndarray) or value.ndim not in (2, 3) or 0 in value.shape
            ):
                out.append(f"{name} must be a picture array (got {type(value).__name__})")
        if self.init_image is not None and isinstance(self.init_image, np.ndarray) and self.init_image.ndim == 3:
            if self.init_image.shape[2] != 3 or self.init_image.dtype != np.uint8:
                out.append(f"init_image must be HxWx3 uint8 (got {self.init_image.dtype} {self.init_image.shape})")
        if self.resize_mode not in RESIZE_MODES:
            out.append(f"resize_mode must be one of {', '.join(RESIZE_MODES)} (got {self.resize_mode!r})")
        if self.inpaint_mode not in INPAINT_MODES:
            out.append(f"inpaint_mode must be one of {', '.join(INPAINT_MODES)} (got {self.inpaint_mode!r})")
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            out.append(f"mask_blur must be 0..{MAX_MASK_BLUR:g} px (got {self.mask_blur})")
        if self.mask is not None and self.init_image is None:
            out.append("mask: inpainting needs an init_image as well as the mask")
        return out

    def summary(self) -> dict:
        """The fields as plain values (pictures by their shape), for logs and job manifests."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = f"array{v.shape}"
            elif f.name == "units":
                v = [{"model": u.label, "scale": u.scale, "start": u.start, "end": u.end} for u in v]
            elif f.name == "reference" and v is not None:
                v = {"mode": v.mode, "style_fidelity": v.style_fidelity, "weight": v.weight}
            elif f.name == "hires" and v is not None:
                v = {"scale": v.scale, "steps": v.steps, "strength": v.strength, "upscaler": v.upscaler}
            elif f.name == "image_prompt" and v is not None:
                v = {"adapter": v.label, "images": len(v.images), "scale": v.scale}
            out[f.name] = v
        return out


def _text_problems(r: GenerationRequest) -> list[str]:
    out = []
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(r, name), str):
            out.append(f"{name} must be text (got {type(getattr(r, name)).__name__})")
    for name in ("sampler", "guess_style"):
        if not isinstance(getattr(r, name), str):
            out.append(f"{name} must be a name (got {type(getattr(r, name)).__name__})")
    for name in ("guess_mode", "seed_per_picture", "emphasis"):
        if not isinstance(getattr(r, name), bool | np.bool_):
            out.append(f"{name} must be true or false (got {getattr(r, name)!r})")
    for name in ("resize_mode", "inpaint_mode"):
        if not isinstance(getattr(r, name), str):
            out.append(f"{name} must be a name (got {type(getattr(r, name)).__name__})")
    return out


def _number_problems(obj, names: tuple[str, ...]) -> list[str]:
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
    """A weight file's or folder's name without its extension (what users call the model)."""
    name = str(path).rstrip("/").split("/")[-1]
    return name.rsplit(".", 1)[0] if "." in name else name
