"""A1111's txt2img and img2img payloads as the records the app's tabs build (`Job`), and the results as A1111
returns them: base64 PNGs (the very files the app wrote, parameters included), the request echoed, and `info`.

Read as A1111 reads them: `prompt`, `negative_prompt`, `seed` (-1: random), `steps`, `cfg_scale`, `sampler_name` (+
`scheduler`, A1111 1.9's "Schedule type"), `width`, `height`, `batch_size`, `eta` (DDIM and TCD), the `hr_*` hires
fix, `override_settings` (sd_model_checkpoint, CLIP_stop_at_last_layers, sd_vae), `send_images`, the ControlNet
units (`units.py`); img2img's `init_images`, `denoising_strength`, `resize_mode`, `mask`, `mask_blur`,
`inpainting_mask_invert`. A field left out takes the page's default (the model card's size, steps, guidance and
sampler for the demo model). Values the page refuses are refused here, naming the field; so are features this server
does not have (styles, scripts, variation seeds, face restoration, tiling, several batches: `n_iter` > 1, one init
picture only). `inpainting_fill` (any of 0..3) and `inpaint_full_res` are accepted and not used: the masked area
starts from the init picture ("original"), and the whole picture is inpainted at the request's size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cldm.hints.conditions import BY_KEY, PREPROCESSOR_NONE
from cldm.io import locate
from cldm.io.images import read_parameters
from cldm.pipeline.fit import fit_rgb
from cldm.pipeline.infotext import parse_parameters
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode, Sampler, Upscaler
from cldm.sampling.samplers import SAMPLER_LABELS
from studio.a1111.extension import detect, model_list, module_list
from studio.a1111.fields import Fields, PayloadError, base64_text
from studio.a1111.units import ControlParts, Sources, read_units, resize_mode
from studio.panels import MAX_UI_SIZE
from studio.service import Progress, Studio
from studio.settings import (
    MAX_SEED_INPUT,
    MAX_UI_STEPS,
    GuidanceSettings,
    ImagePromptSettings,
    PassSettings,
    ReferenceSettings,
    Settings,
    UnitSettings,
)  # fmt: skip

__all__ = ["Job", "PayloadError", "detect", "img2img_job", "model_list", "module_list", "run_job", "txt2img_job"]

RANDOM_SEED = -1  # A1111's "a new seed each time"
SIZE_STEP = 8  # the latents' factor: the page's sliders move by it and the library refuses other sizes
MAX_IMAGES = 4  # the page's "Images" slider
MIN_CFG, MAX_CFG = 0.1, 30.0  # the page's guidance slider
MIN_DENOISE = 0.05  # the page's denoising sliders start here
HIRES_SCALES = (1.0, 4.0)  # the page's "Upscale by"
MAX_MASK_BLUR = 64.0  # the page's mask blur slider
MAX_CLIP_SKIP = 12
A1111_HIRES_STRENGTH = 0.7  # the page's hires denoising default (A1111's API clients send theirs)
A1111_IMG2IMG_STRENGTH = 0.75  # A1111's img2img default
A1111_MASK_BLUR = 4.0  # A1111's img2img default
ETA_SAMPLERS = ("ddim", "tcd")  # where A1111's `eta` means what ours does (DDIM's eta; TCD's gamma)
SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint")  # A1111's hires "as the first pass"


@dataclass
class Job:
    """One API request as the app's records: what a tab's Generate hands `studio.generate`."""

    units: list[UnitSettings]
    settings: Settings
    extras: PassSettings
    guidance: GuidanceSettings
    image_prompts: list[ImagePromptSettings]
    reference: ReferenceSettings | None
    base: str | None  # a name of studio.bases (override_settings.sd_model_checkpoint); None: the current one
    echo: dict  # the request's parameters, as A1111 returns them under "parameters"
    send_images: bool = True  # False: the answer holds no pictures (A1111's send_images)
    maps: list[bool] = field(default_factory=list)  # per unit: its hint follows the pictures (save_detected_map)


def txt2img_job(studio: Studio, payload: dict) -> Job:
    """/sdapi/v1/txt2img: the settings, the hires fix, the overrides and the ControlNet units."""
    f = Fields(payload)
    base, extras = _overrides(studio, f)
    s = _settings(studio, f, denoise=1.0)  # a Tile unit's picture starts from full noise: text to image
    hires = _hires(f, s)
    parts = read_units(studio, f, studio.family_of(studio.base_for(base)))
    if parts.inpaint_mode:  # an inpaint unit's module (inpaint_only, inpaint_global_harmonious, ...)
        extras["inpaint_mode"] = parts.inpaint_mode
    return _job(f, s, PassSettings(**extras, **hires), parts, base)


def img2img_job(studio: Studio, payload: dict) -> Job:
    """/sdapi/v1/img2img: init_images[0] with denoising_strength; with a mask, inpainting through the Inpaint
    condition's ControlNet, as the Inpaint tab runs it (or through the request's own inpaint unit)."""
    f = Fields(payload)
    base, extras = _overrides(studio, f)
    s = _settings(studio, f, denoise=f.number("denoising_strength", A1111_IMG2IMG_STRENGTH, MIN_DENOISE, 1.0))
    images = f.values.get("init_images")
    if not isinstance(images, list) or not images:
        raise f.error("init_images", "give the init picture: a list holding one base64 picture")
    if len(images) > 1:
        raise f.error("init_images", f"one init picture per request here (got {len(images)})")
    init = f.picture("init_images", images[0])
    mode = resize_mode(f, "resize_mode", ResizeMode.JUST)
    mask = _mask(f, mode) if f.given("mask") else None
    f.number("inpainting_fill", 0, 0, 3, whole=True)  # read for its range; the masked area starts as the picture
    sources = Sources(init, mask, mode)
    parts = read_units(studio, f, studio.family_of(studio.base_for(base)), sources)
    inpainting = [u for u in parts.units if u.cond.inpaint]
    if mask is not None and inpainting and all(u.image["layers"][0] is not mask for u in inpainting):
        raise f.error("mask", "the inpaint unit brings its own picture and mask: send the mask to one of them")
    if mask is not None and not inpainting:  # the Inpaint tab's unit, with its defaults
        image = {"background": init, "layers": [mask], "composite": init}
        parts.units.append(UnitSettings(BY_KEY["inpaint"], image, PREPROCESSOR_NONE, studio.size, {}, 1.0, 0.0, 1.0,
                                        ControlMode.BALANCED, mode, True))  # fmt: skip
        parts.maps.append(True)
    own_init = any(u.cond.img2img or u.cond.inpaint for u in parts.units)
    extras = PassSettings(
        init_image=None if own_init else fit_rgb(init, s.width, s.height, mode, fill="edge"),  # fitted A1111's way
        mask_blur=f.number("mask_blur", A1111_MASK_BLUR, 0.0, MAX_MASK_BLUR),
        inpaint_mode=parts.inpaint_mode or InpaintMode.ONLY, **extras,
    )  # fmt: skip
    job = _job(f, s, extras, parts, base)
    if not f.flag("include_init_images", False):  # A1111 leaves the pictures out of the echo
        job.echo.update(init_images=None, mask=None)
    return job


def _mask(f: Fields, mode: ResizeMode) -> np.ndarray:
    """img2img's mask (white = repaint; inverted with inpainting_mask_invert), refused when empty."""
    painted = f.mask("mask")
    if f.flag("inpainting_mask_invert", False):
        painted = 255 - painted
    if not painted.any() and mode is not ResizeMode.FILL:
        raise f.error("mask", "is empty: paint white where to repaint (or send no mask for plain img2img)")
    return painted


def _settings(studio: Studio, f: Fields, denoise: float) -> Settings:
    """The fields every tab's Settings hold, within the page's ranges; the page's defaults where left out."""
    d = studio.defaults
    width, height = (f.number(k, d.size, 64, MAX_UI_SIZE, whole=True) for k in ("width", "height"))
    for key, value in (("width", width), ("height", height)):
        if value % SIZE_STEP:
            raise f.error(key, f"must be a multiple of {SIZE_STEP} (got {value})")
    seed = f.number("seed", RANDOM_SEED, RANDOM_SEED, MAX_SEED_INPUT, whole=True)
    f.only("n_iter", (1,), f"one batch per request here: send n_iter 1 and batch_size up to {MAX_IMAGES}")
    f.only("styles", ([],), "this server keeps no styles: put their words in the prompt")
    f.only("script_name", ("",), "this server runs no scripts")
    f.only("subseed_strength", (0, 0.0), "variation seeds are not offered here: send 0")
    f.only("restore_faces", (False,), "face restoration is not offered here")
    f.only("tiling", (False,), "tiling is not offered here")
    return Settings(
        prompt=f.text("prompt"), added_prompt="", negative_prompt=f.text("negative_prompt"),
        batch=f.number("batch_size", 1, 1, MAX_IMAGES, whole=True), width=width, height=height,
        steps=f.number("steps", d.steps, 1, MAX_UI_STEPS, whole=True), cfg=f.number("cfg_scale", d.cfg, MIN_CFG, MAX_CFG),
        sampler=sampler(f, d.sampler), seed=max(seed, 0), randomize=seed == RANDOM_SEED, denoise=denoise,
    )  # fmt: skip


def sampler(f: Fields, default: str) -> str:
    """Our sampler key for `sampler_name` (or the older `sampler_index`) and A1111 1.9's `scheduler`."""
    name = f.text("sampler_name") or f.text("sampler_index")
    schedule = f.text("scheduler").replace("_", " ")  # "sgm_uniform", A1111's key, is its label "SGM Uniform"
    if not name:
        return default
    try:
        return Sampler.from_a1111(name, schedule).key
    except ValueError:
        pass
    try:
        Sampler.from_a1111(name)
    except ValueError:
        raise f.error("sampler_name", f"{name!r} is not a sampler here; choose one of "
                                      f"{', '.join(SAMPLER_LABELS.values())}") from None  # fmt: skip
    raise f.error("scheduler", f"{name} has no {schedule!r} schedule here (GET /sdapi/v1/samplers lists them)")


def _hires(f: Fields, s: Settings) -> dict:
    """The PassSettings fields of A1111's hires fix (enable_hr, hr_scale or hr_resize_x/y, hr_upscaler,
    hr_second_pass_steps, denoising_strength); nothing when it is off."""
    if not f.flag("enable_hr", False):
        return {}
    scale = f.number("hr_scale", 2.0, *HIRES_SCALES)
    wanted = {k: f.number(k, 0, 0, MAX_UI_SIZE * HIRES_SCALES[1], whole=True) for k in ("hr_resize_x", "hr_resize_y")}
    ratios = {k: v / side for (k, v), side in zip(wanted.items(), (s.width, s.height)) if v}
    for key, value in wanted.items():
        if value % SIZE_STEP:
            raise f.error(key, f"must be a multiple of {SIZE_STEP} (got {value})")
    if len(set(ratios.values())) > 1:
        raise f.error("hr_resize_y", "the hires pass keeps the picture's proportions here: send hr_resize_x or "
                                     "hr_resize_y alone, or both at one scale")  # fmt: skip
    if ratios:
        scale = next(iter(ratios.values()))
        key = next(iter(ratios))
        if not HIRES_SCALES[0] <= scale <= HIRES_SCALES[1]:
            raise f.error(key, f"is {scale:g} times the picture's size; the hires pass allows {HIRES_SCALES[0]:g}.."
                               f"{HIRES_SCALES[1]:g}")  # fmt: skip
    upscaler = f.text("hr_upscaler", Upscaler.LATENT.value)
    try:
        upscaler = Upscaler(upscaler or Upscaler.LATENT.value)
    except ValueError:
        raise f.error("hr_upscaler", f"{upscaler!r} is not an upscaler here; choose "
                                     f"{' or '.join(u.value for u in Upscaler)}") from None  # fmt: skip
    for key in ("hr_sampler_name", "hr_scheduler", "hr_checkpoint_name"):
        f.only(key, (*SAME, SAMPLER_LABELS.get(s.sampler)), "the hires pass runs the first pass's here: leave it out")
    f.only("hr_prompt", ("", s.prompt), "the hires pass takes the prompt here: leave it out")
    f.only("hr_negative_prompt", ("", s.negative_prompt), "the hires pass takes the negative prompt: leave it out")
    return dict(hires=True, hires_scale=scale, hires_steps=f.number("hr_second_pass_steps", 0, 0, MAX_UI_STEPS, whole=True),
                hires_strength=f.number("denoising_strength", A1111_HIRES_STRENGTH, MIN_DENOISE, 1.0),
                hires_upscaler=upscaler)  # fmt: skip


def _overrides(studio: Studio, f: Fields) -> tuple[str | None, dict]:
    """(the base, the PassSettings fields) that override_settings names, and A1111's seeds; its other settings are
    not used here."""
    o = Fields(f.values.get("override_settings") or {}, "override_settings.", "override_settings")
    base = base_name(studio, o.values["sd_model_checkpoint"], o) if o.given("sd_model_checkpoint") else None
    extras = {"clip_skip": o.number("CLIP_stop_at_last_layers", 0, 1, MAX_CLIP_SKIP, whole=True),
              "seed_per_picture": True}  # A1111: picture i of a batch is made by seed + i alone  # fmt: skip
    vae = o.text("sd_vae", "Automatic")
    if vae not in ("Automatic", "None", locate.VAE_FROM_CHECKPOINT):
        vaes = locate.list_vaes(studio.models_dir)
        found = next((v for v in vaes if vae in (v, Path(v).stem)), None)
        if found is None:
            raise o.error("sd_vae", f"{vae!r} is not in the models folder's vae/; choose Automatic"
                                    f"{''.join(', ' + v for v in vaes)}")  # fmt: skip
        extras["vae"] = found
    return base, extras


def base_name(studio: Studio, value: object, f: Fields) -> str:
    """A base as A1111 names a checkpoint: its title ("name.safetensors [hash]"), file name or name -> a key of
    studio.bases."""
    if not isinstance(value, str):
        raise f.error("sd_model_checkpoint", f"must be text (got {type(value).__name__})")
    wanted = Path(value.rsplit(" [", 1)[0].strip()).name
    for name in studio.bases:
        if wanted in (name, Path(name).stem):
            return name
    raise f.error("sd_model_checkpoint", f"unknown model {value!r}; choose one of {', '.join(studio.bases)} "
                                         "(GET /sdapi/v1/sd-models lists them)")  # fmt: skip


def _job(f: Fields, s: Settings, extras: PassSettings, parts: ControlParts, base: str | None) -> Job:
    """The Job: ControlNet units, image prompts and a reference when the request has them; none is plain text to
    image (which the page's tabs do not offer, but A1111's clients mostly ask for)."""
    sampler_eta = f.number("eta", 0.0, 0.0, 1.0) if s.sampler in ETA_SAMPLERS else 0.0  # else A1111's ancestral eta
    echo = {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": RANDOM_SEED if s.randomize else s.seed,
            "steps": s.steps, "cfg_scale": s.cfg, "width": s.width, "height": s.height, "batch_size": s.batch,
            "n_iter": 1, "sampler_name": SAMPLER_LABELS[s.sampler], **f.values}  # fmt: skip
    return Job(parts.units, s, extras, GuidanceSettings(eta=sampler_eta), parts.image_prompts, parts.reference, base,
               echo, f.flag("send_images", True), parts.maps)  # fmt: skip


def run_job(studio: Studio, job: Job, progress: Progress, preview, session: str, sent_at: float | None = None) -> dict:
    """Run `job` as a tab's Generate runs it (`studio.generate`: the work budget, the model lock, the session's
    Stop, the output folder), and answer as A1111 does: the pictures (the PNG files written, with their parameters
    text), then each unit's hint (the extension's detected maps, unless save_detected_map is false), the echo and
    `info`, a JSON text holding each picture's parameters text (`infotexts`) and seed. A Stop of `session` from
    `sent_at` (time.monotonic()) on ends it, even one that came while the payload was still being read."""
    gallery, _, files = studio.generate(job.units, job.settings, progress, job.image_prompts, job.reference,
                                        session=session, extras=job.extras, preview=preview, base=job.base,
                                        guidance=job.guidance, plain=True, sent_at=sent_at)  # fmt: skip
    pictures = [Path(p).read_bytes() for p in files]
    hints = [Path(item[0]) for item in gallery[: len(gallery) - len(files)]]  # one per ControlNet unit, in order
    texts = [read_parameters(data) or "" for data in pictures]
    images = [base64_text(data) for data in pictures]
    images += [base64_text(h.read_bytes()) for h, keep in zip(hints, job.maps) if keep]
    return {"images": images if job.send_images else [], "parameters": job.echo, "info": json.dumps(_info(job, texts))}


def _info(job: Job, texts: list[str]) -> dict:
    """A1111's `info` fields, read from the parameters each picture carries (what ran: the seed drawn, the prompt
    with the added words, the sampler's label)."""
    parsed = [parse_parameters(t) for t in texts if t]
    first = parsed[0] if parsed else None
    s = job.settings
    seeds = [p.seed for p in parsed]
    return {
        "prompt": first.prompt if first else s.prompt, "all_prompts": [p.prompt for p in parsed],
        "negative_prompt": first.negative_prompt if first else s.negative_prompt,
        "all_negative_prompts": [p.negative_prompt for p in parsed], "seed": seeds[0] if seeds else None,
        "all_seeds": seeds, "subseed_strength": 0, "width": s.width, "height": s.height,
        "sampler_name": first.sampler_label if first else SAMPLER_LABELS[s.sampler], "cfg_scale": s.cfg,
        "steps": s.steps, "batch_size": s.batch, "restore_faces": False,
        "sd_model_name": first.model if first else None,
        "sd_model_hash": first.fields.get("Model hash") if first else None,
        "sd_vae_name": first.fields.get("VAE") if first else None,
        "denoising_strength": first.denoising_strength if first else None,
        "clip_skip": first.clip_skip if first else None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "is_using_inpainting_conditioning": False,
    }  # fmt: skip
