"""What one generation asks for: a GenerationRequest with its ControlUnits, validated in one place.

The CLI, the app, the model manager and `pipeline.generate` all speak these two types; nothing else describes a
request or a ControlNet in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from cldm.adapters import emphasis
from cldm.adapters.lora import MAX_REQUEST_LORAS
from cldm.errors import InputError
from cldm.models.controlnet import ControlNet
from cldm.models.freeu import FreeU
from cldm.models.t2i_adapter import T2I_ADAPTERS
from cldm.pipeline.extras import (
    MAX_IMAGE_PROMPTS,
    MAX_STEPS,
    HiresFix,
    ImagePrompt,
    LoraUnit,
    ReferenceUnit,
    number_problems,
    stem,
)
from cldm.pipeline.guidance import PAG_DEFAULT_LAYERS, guidance_problems
from cldm.pipeline.regions import mask_problems
from cldm.pipeline.union import ControlType
from cldm.pipeline.vocabulary import Choice, ControlMode, InpaintMode, ResizeMode, Sampler
from cldm.sampling.samplers import SAMPLERS

# diffusers' guess mode spaces the 13 scales logarithmically from 0.1 to 1 instead of the original 0.825 decay.
GUESS_STYLES = ("original", "diffusers")
MAX_CFG = 100.0
MIN_SIZE, MAX_SIZE = 64, 4096
MAX_BATCH = 64
MAX_CONTROL_SCALE = 10.0
MAX_MASK_BLUR = 64.0


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet in a request: which weights, which hint, how strongly and when.

    `model` is a weight file or folder (the model manager loads it) or an already loaded ControlNet or T2I-Adapter.
    A T2I-Adapter acts on the steps from `start` to `end` (diffusers' adapter_conditioning_factor is `end`).
    """

    model: str | os.PathLike | torch.nn.Module
    hint: np.ndarray | torch.Tensor  # HxWx3 uint8, or (1, 3, H, W) float in [0, 1] (-1 marks inpaint holes)
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before which this ControlNet is off
    end: float = 1.0  # fraction of the steps after which it is off
    global_average_pooling: bool | None = None  # None: as the weights say (the original shuffle .pth cannot say)
    name: str = ""  # shown in the parameters; by default the weight file's stem
    # the modes take a member or any name `parse` reads ("prompt", "My prompt is more important")
    mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP  # how a hint of another shape becomes the picture size
    # what made the hint, for the parameters text only (A1111's Module, Processor Res, Pixel Perfect)
    preprocessor: str = ""
    processor_res: int | None = None
    pixel_perfect: bool = False
    # the effective region (`cldm.pipeline.regions`): white where the unit acts, black where it does not; an HxW or
    # HxWx3 picture of any size (stretched to each residual), or a (1, 1, H, W) tensor in [0, 1]. None: everywhere
    mask: np.ndarray | torch.Tensor | None = None
    # a ControlNet Union's control type (`cldm.pipeline.union`): a ControlType, its name or number; None: the one the
    # preprocessor names (A1111's rule). Other ControlNets ignore it
    control_type: ControlType | str | int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ControlMode.coerce(self.mode))
        object.__setattr__(self, "resize_mode", ResizeMode.coerce(self.resize_mode))
        if self.control_type is not None:
            object.__setattr__(self, "control_type", ControlType.coerce(self.control_type))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.model, torch.nn.Module):
            return "controlnet" if isinstance(self.model, ControlNet) else "t2i-adapter"
        return stem(self.model)

    def problems(self, i: int) -> list[str]:
        """What is wrong with this unit (`i` numbers it in messages); empty when it is fine."""
        who = f"ControlNet {i + 1} ({self.label})"
        out = [f"{who}: {p}" for p in number_problems(self, ("scale", "start", "end"))]
        if out:
            return out
        if not 0 <= self.scale <= MAX_CONTROL_SCALE:
            out.append(f"{who}: scale must be 0..{MAX_CONTROL_SCALE:g} (got {self.scale})")
        if not 0 <= self.start < self.end <= 1:
            out.append(f"{who}: need 0 <= start < end <= 1 (got start {self.start}, end {self.end})")
        out += [f"{who}: {p}" for p in _choice_problems(self, {"mode": ControlMode, "resize_mode": ResizeMode})]
        if self.control_type is not None and not isinstance(self.control_type, ControlType):
            out.append(
                f"{who}: control_type must be one of {', '.join(ControlType.keys())} (got {self.control_type!r})"
            )
        if not isinstance(self.model, (ControlNet, *T2I_ADAPTERS, str, os.PathLike)):
            out.append(
                f"{who}: model must be a weight file, a folder, a ControlNet or a T2I-Adapter (got "
                f"{type(self.model).__name__})"
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
        out += [f"{who}: {p}" for p in mask_problems(self.mask)]
        return out


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call of `pipeline.generate` takes, besides the model.

    Classifier-free guidance runs the negative and positive prompt in one batch (off when cfg_scale <= 1). Guess
    mode runs ControlNets on the conditional half only, with the residual scales of `guess_style`. `init_image`
    (HxWx3 uint8) with `strength` < 1 is img2img; adding `mask` (HxW, 1 or 255 = repaint) inpaints and, with
    `inpaint_mode` "only", keeps the unmasked pixels. A batch shares one noise generator (diffusers) unless
    `seed_per_picture` gives picture i the seed `seed + i` (A1111). `width` / `height` left at None take the base's
    native size (`StableDiffusion.native_size`: 512 for SD1.5, 1024 for SDXL), as diffusers' pipelines do.
    """

    prompt: str
    negative_prompt: str = ""
    units: tuple[ControlUnit, ...] = ()
    steps: int = 20
    cfg_scale: float = 7.5
    sampler: str = "ddim"  # our key ("dpmpp_2m_karras"); a Sampler member or A1111's label is turned into it
    eta: float = 0.0
    seed: int = 0
    width: int | None = None  # None: the base's native size
    height: int | None = None
    batch: int = 1
    guess_mode: bool = False
    guess_style: str = "original"
    clip_skip: int = 1
    init_image: np.ndarray | None = None
    strength: float = 1.0
    mask: np.ndarray | None = None
    image_prompt: ImagePrompt | None = None  # one IP-Adapter image prompt
    image_prompts: tuple[ImagePrompt, ...] = ()  # several, each its own adapter, pictures, scale and mask
    reference: ReferenceUnit | None = None
    resize_mode: ResizeMode = ResizeMode.CROP  # how the init picture and the mask become the picture size
    mask_blur: float = 0.0  # Gaussian sigma in px for the mask's edge (the 1.1 inpaint app's default is 5)
    inpaint_mode: InpaintMode = InpaintMode.ONLY  # ONLY: the unmasked area is kept exactly; GLOBAL: all is redrawn
    seed_per_picture: bool = False  # A1111: picture i has its own noise from seed + i (reproducible alone)
    hires: HiresFix | None = None
    emphasis: bool = True  # A1111's (word:1.2) / [word] / BREAK syntax; False: the prompt is taken literally
    loras: tuple[LoraUnit, ...] = ()  # merged into the UNet and text encoder for this request only
    vae: object = None  # another VAE (file, folder or loaded module) for this request; None: the checkpoint's
    # the live previews' decoder (a TAESD file or loaded module: A1111's "TAESD" method, full-size previews); None:
    # the request's VAE when it is a TAESD, else "Approx cheap" (latent-sized)
    preview_vae: object = None
    base: str | None = None  # the base model this request asks for (the model manager switches); None: the current
    # guidance extras (`cldm.pipeline.guidance`), each as diffusers computes it: CFG rescale's phi (0..1, diffusers'
    # guidance_rescale); FreeU's factors (None: off; `model.family.freeu` holds the published ones); perturbed-
    # attention guidance's scale (0: off), layers (diffusers' names) and adaptive scale
    cfg_rescale: float = 0.0
    freeu: FreeU | None = None
    pag_scale: float = 0.0
    pag_layers: tuple[str, ...] = PAG_DEFAULT_LAYERS
    pag_adaptive_scale: float = 0.0

    @property
    def vae_label(self) -> str | None:
        if self.vae is None:
            return None
        source = getattr(self.vae, "source", None)  # A1111 names the VAE by its file name, extension included
        return str(source if isinstance(source, str) else self.vae).rstrip("/").split("/")[-1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))  # a list given by a caller stays immutable here
        object.__setattr__(self, "loras", tuple(self.loras))
        object.__setattr__(self, "image_prompts", tuple(self.image_prompts))
        if isinstance(self.pag_layers, str | list):  # one name, as diffusers takes it, or a list
            object.__setattr__(self, "pag_layers", (self.pag_layers,) if isinstance(self.pag_layers, str) else
                               tuple(self.pag_layers))  # fmt: skip
        object.__setattr__(self, "resize_mode", ResizeMode.coerce(self.resize_mode))
        object.__setattr__(self, "inpaint_mode", InpaintMode.coerce(self.inpaint_mode))
        sampler = Sampler.coerce(self.sampler)  # a Sampler, A1111's label or our key: kept as our key
        if isinstance(sampler, Sampler):
            object.__setattr__(self, "sampler", sampler.key)

    @property
    def all_image_prompts(self) -> tuple[ImagePrompt, ...]:
        """Every image prompt of the request, `image_prompt` first: the adapters act in this order, their outputs
        summed."""
        return self.image_prompts if self.image_prompt is None else (self.image_prompt, *self.image_prompts)

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def sized(self, native: int) -> GenerationRequest:
        """This request with a width / height left at None set to `native` (the base's native size)."""
        if self.width is not None and self.height is not None:
            return self
        return replace(self, width=native if self.width is None else self.width,
                       height=native if self.height is None else self.height)  # fmt: skip

    def validate(self, latent_factor: int = 8) -> GenerationRequest:
        """Raise InputError naming every field that is wrong (and what is allowed); return self when all is well."""
        sizes = tuple(n for n in ("width", "height") if getattr(self, n) is not None)  # None: the base's native size
        problems = _text_problems(self) + number_problems(
            self, ("steps", "cfg_scale", "eta", "seed", *sizes, "batch", "clip_skip", "strength", "mask_blur",
                   "cfg_rescale", "pag_scale", "pag_adaptive_scale")
        )  # fmt: skip
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
        if len(self.all_image_prompts) > MAX_IMAGE_PROMPTS:
            problems.append(f"at most {MAX_IMAGE_PROMPTS} image prompts per request (got "
                            f"{len(self.all_image_prompts)}); leave some out")  # fmt: skip
        for i, p in enumerate(self.image_prompts[:MAX_IMAGE_PROMPTS]):
            where = f"image_prompts[{i}]"
            problems += p.problems(where) if isinstance(p, ImagePrompt) else [f"{where} must be an ImagePrompt"]
        if self.reference is not None:
            if isinstance(self.reference, ReferenceUnit):
                problems += self.reference.problems()
            else:
                problems.append(f"reference must be a ReferenceUnit (got {type(self.reference).__name__})")
        if len(self.loras) > MAX_REQUEST_LORAS:
            problems.append(f"at most {MAX_REQUEST_LORAS} LoRAs per request (got {len(self.loras)}); leave some out")
        for i, u in enumerate(self.loras[:MAX_REQUEST_LORAS]):
            problems += u.problems(i) if isinstance(u, LoraUnit) else [f"loras[{i}] must be a LoraUnit"]
        problems += guidance_problems(self)
        if self.hires is not None:
            if not isinstance(self.hires, HiresFix):
                problems.append(f"hires must be a HiresFix (got {type(self.hires).__name__})")
            elif len(sizes) == 2 and not any(p.startswith(("width", "height")) for p in problems):
                problems += self.hires.problems(self.width, self.height, latent_factor, int(self.steps))
                if self.mask is not None:
                    problems.append("hires: the hires fix does not combine with inpainting; leave one out")
        if problems:
            raise InputError("; ".join(problems))
        return self

    def _range_problems(self, f: int) -> list[str]:
        out = []
        sizes = tuple(n for n in ("width", "height") if getattr(self, n) is not None)  # None: the base's native size
        for name in ("steps", "seed", *sizes, "batch", "clip_skip"):
            if getattr(self, name) != int(getattr(self, name)):
                out.append(f"{name} must be a whole number (got {getattr(self, name)})")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > emphasis.MAX_PROMPT_CHARS:
                out.append(f"{name} is {len(getattr(self, name))} characters long; at most {emphasis.MAX_PROMPT_CHARS}")
            elif self.emphasis:  # weights past emphasis.MAX_WEIGHT: before anything is loaded
                try:
                    emphasis.parse(getattr(self, name))
                except InputError as e:
                    out.append(f"{name}: {e}")
        if not 1 <= self.steps <= MAX_STEPS:
            out.append(f"steps must be 1..{MAX_STEPS} (got {self.steps})")
        if not 0 <= self.cfg_scale <= MAX_CFG:
            out.append(f"cfg_scale (guidance scale) must be 0..{MAX_CFG:g} (got {self.cfg_scale})")
        given = [getattr(self, n) for n in sizes]
        if not all(MIN_SIZE <= v <= MAX_SIZE for v in given):
            out.append(f"width and height must be {MIN_SIZE}..{MAX_SIZE} px (got {self.width}x{self.height})")
        elif any(v % f for v in given):
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
        elif self.sampler == "tcd" and self.eta > 1:
            out.append(f"eta is TCD's gamma and must be 0..1 (got {self.eta}; TCD's model cards use 0.3)")
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
        out += _choice_problems(self, {"resize_mode": ResizeMode, "inpaint_mode": InpaintMode})
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
            elif isinstance(v, Choice):
                v = v.key
            elif f.name == "units":
                v = [_unit_summary(u) for u in v]
            elif f.name == "reference" and v is not None:
                v = {"mode": v.mode, "style_fidelity": v.style_fidelity, "weight": v.weight}
            elif f.name == "hires" and v is not None:
                v = {
                    "scale": v.scale,
                    "steps": v.steps,
                    "strength": v.strength,
                    "upscaler": getattr(v.upscaler, "key", v.upscaler),
                }
            elif f.name == "image_prompt" and v is not None:
                v = _prompt_summary(v)
            elif f.name == "image_prompts":
                v = [_prompt_summary(p) for p in v]
            elif f.name == "freeu" and isinstance(v, FreeU):
                v = {"b1": v.b1, "b2": v.b2, "s1": v.s1, "s2": v.s2}
            out[f.name] = v
        return out


def _unit_summary(u: ControlUnit) -> dict:
    out = {"model": u.label, "scale": u.scale, "start": u.start, "end": u.end}
    return out if u.mask is None else out | {"mask": f"array{tuple(u.mask.shape)}"}


def _prompt_summary(p: ImagePrompt) -> dict:
    out = {"adapter": p.label, "images": len(p.images), "scale": p.scale}
    return out if p.mask is None else out | {"mask": f"array{p.mask.shape}"}


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
    if r.base is not None and not isinstance(r.base, str | os.PathLike):
        out.append(f"base must be a file, folder or hub id (got {type(r.base).__name__})")
    return out


def _choice_problems(obj, choices: dict[str, type[Choice]]) -> list[str]:
    """Fields that name no member of their enum (`__post_init__` turned every name it could read into one)."""
    out = []
    for name, enum in choices.items():
        if not isinstance(getattr(obj, name), enum):
            out.append(f"{name} must be one of {', '.join(enum.keys())} (got {getattr(obj, name)!r})")
    return out
