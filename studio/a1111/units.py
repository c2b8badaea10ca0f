"""The ControlNet extension's units (`alwayson_scripts.controlnet.args`) as the app's records: each unit's module
(the extension's preprocessor names) and model ("control_v11p_sd15_canny [d14c016b]") read as a condition, one of
our preprocessors and a control model; IP-Adapter and reference units as the page's image prompt and reference.

The extension's rules kept: a unit with `enabled` false is skipped; processor_res, threshold_a and threshold_b out
of their slider's range take its default (clients send -1 for "default"); a unit without a picture in img2img
takes the init picture (and, for an inpaint module, the mask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import annotators
from annotators.images import MAX_RESOLUTION, MIN_RESOLUTION
from cldm.hints.conditions import BY_KEY, CONDITIONS, PREPROCESSOR_NONE, Condition
from cldm.io import locate
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode
from studio.a1111.fields import Fields
from studio.service import Studio
from studio.settings import REFERENCE_PREPROCESSORS, ImagePromptSettings, ReferenceSettings, UnitSettings

# Our preprocessors under the extension's names: (its module name, its label); the others it names as we do.
EXTENSION_NAMES = {
    "depth_midas": ("depth", "depth_midas"),
    "lineart": ("lineart", "lineart_realistic"),
    "invert": ("invert", "invert (from white bg & black line)"),
    "softedge_hed": ("hed", "softedge_hed"),
    "softedge_hedsafe": ("hed_safe", "softedge_hedsafe"),
    "softedge_pidinet": ("pidinet", "softedge_pidinet"),
    "softedge_pidisafe": ("pidinet_safe", "softedge_pidisafe"),
    "scribble_pidinet": ("pidinet_scribble", "scribble_pidinet"),
    "seg_ade20k": ("segmentation", "seg_ufade20k"),
}
# the extension's name or label -> ours; its OneFormer ADE20K segmenter too (ours paints the same classes alike)
ALIASES = {
    **{n: ours for ours, names in EXTENSION_NAMES.items() for n in names},
    "oneformer_ade20k": "seg_ade20k",
    "seg_ofade20k": "seg_ade20k",
}
SLIDERLESS = {"shuffle"}  # the extension's shuffle has no sliders: threshold_a/b are not its seed
INPAINT_MODULES = {"inpaint_only": InpaintMode.ONLY, "inpaint": InpaintMode.GLOBAL,
                   "inpaint_global_harmonious": InpaintMode.GLOBAL}  # fmt: skip
TILE_MODULE = "tile_resample"  # the Tile condition's picture as it is (down sampling rate 1)
# IP-Adapter modules: name or label -> the image encoder folder they run (None: the adapter's own, "auto")
IP_ADAPTER_MODULES = {
    "ip-adapter_clip_sd15": locate.VIT_H_FOLDER, "ip-adapter_clip_h": locate.VIT_H_FOLDER,
    "ip-adapter_clip_sdxl_plus_vith": locate.VIT_H_FOLDER,
    "ip-adapter_clip_sdxl": locate.VIT_BIGG_FOLDER, "ip-adapter_clip_g": locate.VIT_BIGG_FOLDER,
    "ip-adapter-auto": None,
}  # fmt: skip
# Words in a model's file name that say its condition, beside the condition's key (the extension's type filters)
NAME_WORDS = {"scribble": ("sketch",), "softedge": ("hed", "pidi"), "seg": ("ade20k",), "normalbae": ("normal",),
              "openpose": ("pose",), "depth": ("zoe",), "ip2p": ("pix2pix",)}  # fmt: skip
_HASH = re.compile(r"\s*\[[0-9A-Za-z]+\]\s*$")  # the " [d14c016b]" after a model's name
NO_MODEL = ("", "none")  # the extension's "None": the condition's own ControlNet here
LEGACY_NAMES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}


@dataclass(frozen=True)
class Module:
    """What an extension module names here: one of our preprocessors (on the condition it fixes, if any)."""

    preprocessor: str
    condition: str | None = None  # tile_resample and the inpaint modules name their condition
    inpaint_mode: InpaintMode | None = None


@dataclass(frozen=True)
class Sources:
    """img2img's pictures, for units sent without one (the extension's rule): the init picture, its mask, and
    img2img's resize mode."""

    init: np.ndarray | None = None
    mask: np.ndarray | None = None
    resize_mode: ResizeMode = ResizeMode.JUST


@dataclass
class ControlParts:
    """What the units give: the ControlNet units, the image prompts, the reference, the inpaint mode an inpaint
    module names, and per ControlNet unit whether its hint comes back after the pictures (`save_detected_map`)."""

    units: list[UnitSettings] = field(default_factory=list)
    image_prompts: list[ImagePromptSettings] = field(default_factory=list)
    reference: ReferenceSettings | None = None
    inpaint_mode: InpaintMode | None = None
    maps: list[bool] = field(default_factory=list)


def model_stem(name: str) -> str:
    """A model as the extension names it ("control_v11p_sd15_canny [d14c016b]", or a file name) -> its stem."""
    name = Path(_HASH.sub("", name).strip()).name
    return name[: -len(Path(name).suffix)] if Path(name).suffix in locate.LOCAL_SUFFIXES else name


def module(name: str, f: Fields, key: str = "module") -> Module:
    """The module a unit (or /controlnet/detect) names, as the extension takes it: its name or its label."""
    if name in INPAINT_MODULES:
        return Module(PREPROCESSOR_NONE, "inpaint", INPAINT_MODULES[name])
    if name == TILE_MODULE:
        return Module(PREPROCESSOR_NONE, "tile")
    ours = ALIASES.get(name, name)
    if ours not in annotators.ANNOTATORS or not any(ours in c.preprocessors for c in CONDITIONS):
        raise f.error(key, f"{name!r} is not a module this server runs; GET /controlnet/module_list lists them")
    return Module(ours)


def condition(studio: Studio, mod: Module, model: str, family: str, f: Fields) -> tuple[Condition, str | None]:
    """(the unit's condition, its control model file or None for the condition's own ControlNet of `family`)."""
    stem = model_stem(model)
    named = stem.lower() not in NO_MODEL
    # a condition's own ControlNet, named by its stem in any family
    owner = next((c for c in CONDITIONS for fam in ("SD1.5", "SD2.x", "SDXL")
                  if named and (w := c.weights(fam)) is not None and w.stem.lower() == stem.lower()), None)  # fmt: skip
    if mod.condition is not None:
        cond = BY_KEY[mod.condition]
    elif owner is not None:
        cond = owner
    else:
        fits = [c for c in CONDITIONS if mod.preprocessor in c.preprocessors and not c.inpaint]
        said = [(len(w), c) for c in fits for w in (c.key, *NAME_WORDS.get(c.key, ())) if w in stem.lower()]
        if said:
            cond = max(said, key=lambda found: found[0])[1]
        elif mod.preprocessor in (PREPROCESSOR_NONE, "invert") and len(fits) > 1:
            raise f.error("model", f"module {mod.preprocessor!r} fits every condition: name the model (e.g. "
                                   "control_v11p_sd15_canny), or a module that says the condition")  # fmt: skip
        else:
            cond = fits[0]
    if mod.preprocessor not in cond.preprocessors:
        raise f.error("module", f"{mod.preprocessor!r} is not a preprocessor for {cond.label} (model {stem}); "
                                f"choose one of {', '.join(cond.preprocessors)}")  # fmt: skip
    own = cond.weights(family)
    if not named or (own is not None and own.stem.lower() == stem.lower()):
        return cond, None
    return cond, control_file(studio, stem, f)


def control_file(studio: Studio, stem: str, f: Fields) -> str:
    """The models folder's control model whose name (less its suffix) is `stem`, as the extension matches names."""
    for name in studio.control_models():
        if stem.lower() in (name.lower(), model_stem(name).lower()):
            return name
    raise f.error("model", f"{stem!r} is not in the models folder; GET /controlnet/model_list lists the control "
                           "models here (or send \"None\" for the condition's own ControlNet)")  # fmt: skip


def _choice(f: Fields, key: str, enum, default, numbers: dict[int, str]):
    """A label, key or the extension's number of a choice (ControlMode, ResizeMode)."""
    value = f.values.get(key)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        value = numbers.get(value, str(value))
    try:
        return enum.parse(value)
    except Exception as e:  # InputError saying what is allowed; a non-string value says the same
        raise f.error(key, f"{value!r} is not one of {', '.join(m.value for m in enum)} (or 0..{len(numbers) - 1})"
                      ) from e  # fmt: skip


def resize_mode(f: Fields, key: str, default: ResizeMode) -> ResizeMode:
    """0 Just Resize, 1 Crop and Resize, 2 Resize and Fill (3, A1111's latent resize: Just Resize), or a label."""
    return _choice(f, key, ResizeMode, default, {0: "just", 1: "crop", 2: "fill", 3: "just"})


def slider_params(pre: str, threshold_a: float | None, threshold_b: float | None) -> dict[str, float]:
    """The preprocessor's sliders: threshold_a and threshold_b are its first two (canny: low, high), a value out of
    a slider's range its default, as the extension resets it."""
    given = (None, None) if pre in SLIDERLESS else (threshold_a, threshold_b)
    out = {}
    for i, p in enumerate(annotators.ANNOTATORS[pre].params):
        value = given[i] if i < len(given) else None
        out[p.name] = value if value is not None and p.minimum <= value <= p.maximum else p.default
    return out


def resolution(studio: Studio, processor_res: float | None, pixel_perfect: bool) -> tuple[int, bool]:
    """(the preprocessor resolution, pixel perfect): -1 (or any value out of 64..2048) sets it from the picture and
    the size, as the page's pixel perfect (on by default there) does."""
    perfect = pixel_perfect or processor_res is None or not MIN_RESOLUTION <= processor_res <= MAX_RESOLUTION
    return (studio.size if perfect else int(processor_res)), perfect


def _pictures(f: Fields, sources: Sources | None) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """(picture, mask, whether the unit sent them) of a unit: `image` as a base64 string, {"image", "mask"}, or
    [image, mask], with `mask` beside it; none sent: img2img's init picture and mask. A unit's own mask is read as
    the extension reads it: the first channel, white = painted."""
    value, mask = f.values.get("image"), f.values.get("mask")
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and isinstance(value[0], dict):
            value = value[0]
        elif len(value) == 2 and not isinstance(value[0], dict):
            value, mask = value
        else:
            raise f.error("image", 'give one picture (a base64 string, or {"image": ..., "mask": ...})')
    if isinstance(value, dict):
        value, mask = value.get("image"), value.get("mask") or mask
    if value in (None, ""):
        return (None, None, False) if sources is None else (sources.init, sources.mask, False)
    picture = f.picture("image", value)
    return picture, None if mask in (None, "") else f.picture("mask", mask)[..., 0], True


def _current_names(f: Fields) -> dict:
    """The unit's fields under the extension's current names (it still takes its older ones)."""
    values = dict(f.values)
    for old, new in LEGACY_NAMES.items():
        if old in values:
            if values.get(new) is not None:
                raise f.error(old, f"give {new!r} or its older name {old!r}, not both")
            values[new] = values.pop(old)
    return values


def read_unit(studio: Studio, index: int, value: object, family: str, sources: Sources | None, parts: ControlParts,
              where: str = "alwayson_scripts.controlnet.args") -> None:  # fmt: skip
    """One unit of the extension's JSON into `parts` (nothing when it is switched off)."""
    f = Fields(value, f"{where}[{index}].", "a ControlNet unit")
    f = Fields(_current_names(f), f.prefix)
    if not f.flag("enabled", True):
        return
    f.only("advanced_weighting", (), "per-layer weights are not offered here; leave it null and use weight")
    f.only("ipadapter_input", (), "send the picture in image; precomputed IP-Adapter inputs are not read here")
    f.only("hr_option", ("Both", "HiResFixOption.BOTH"), 'units act in both hires passes here: send "Both"')
    f.only("input_mode", ("simple", "InputMode.SIMPLE"), 'one picture per unit here: send "simple"')
    name = f.text("module", PREPROCESSOR_NONE)
    weight = f.number("weight", 1.0, 0.0, 2.0)
    start, end = f.number("guidance_start", 0.0, 0.0, 1.0), f.number("guidance_end", 1.0, 0.0, 1.0)
    if start >= end:
        raise f.error("guidance_end", f"must be more than guidance_start (got {start:g} and {end:g})")
    picture, mask, own = _pictures(f, sources)
    if picture is None:
        where_else = "" if sources else " (in img2img, a unit without one takes the init picture)"
        raise f.error("image", f"give the unit's picture, base64-encoded{where_else}")
    region = f.picture("effective_region_mask") if f.given("effective_region_mask") else None
    if name in IP_ADAPTER_MODULES:
        clip_mask = mask if own else None  # the extension's attention mask for the adapter
        parts.image_prompts.append(_image_prompt(f, name, picture, weight, region if region is not None else clip_mask,
                                                 (start, end)))  # fmt: skip
        return
    if name in REFERENCE_PREPROCESSORS:
        if parts.reference is not None:
            raise f.error("module", "one reference unit per request here")
        _whole_run(f, start, end, "reference")
        fidelity = f.loose_number("threshold_a")
        fidelity = fidelity if fidelity is not None and 0 <= fidelity <= 1 else 0.5  # the extension's default
        parts.reference = ReferenceSettings(picture, name, fidelity, weight)
        return
    mod = module(name, f)
    cond, model = condition(studio, mod, f.text("model", "None"), family, f)
    if mod.condition == "tile" and (rate := f.loose_number("threshold_a")) is not None and 1 < rate <= 8:
        raise f.error("threshold_a", f"tile_resample's down sampling rate: only 1 here (got {rate:g})")
    if cond.inpaint:
        if mask is None:
            raise f.error("mask", "an inpaint unit needs a mask (white where to repaint): the unit's, or img2img's")
        if parts.inpaint_mode is not None and parts.inpaint_mode is not (mod.inpaint_mode or InpaintMode.ONLY):
            raise f.error("module", "inpaint_only and inpaint_global_harmonious cannot mix in one request")
        parts.inpaint_mode = mod.inpaint_mode or InpaintMode.ONLY
        image = {"background": picture, "layers": [mask], "composite": picture}  # as the Inpaint tab's editor
    elif own and mask is not None:
        raise f.error("mask", "a mask is read for inpaint and IP-Adapter units only (effective_region_mask says "
                              "where a unit acts)")  # fmt: skip
    else:
        image = picture
    res, perfect = resolution(studio, f.loose_number("processor_res"), f.flag("pixel_perfect", False))
    params = slider_params(mod.preprocessor, f.loose_number("threshold_a"), f.loose_number("threshold_b"))
    mode = _choice(f, "control_mode", ControlMode, ControlMode.BALANCED, {0: "balanced", 1: "prompt", 2: "control"})
    fit = resize_mode(f, "resize_mode", ResizeMode.CROP) if own else sources.resize_mode  # img2img's, as its picture
    parts.units.append(UnitSettings(cond, image, mod.preprocessor, res, params, weight, start, end, mode, fit, perfect,
                                    model, region))  # fmt: skip
    parts.maps.append(f.flag("save_detected_map", True))


def _whole_run(f: Fields, start: float, end: float, what: str) -> None:
    """IP-Adapter and reference units act on every step here."""
    if (start, end) != (0.0, 1.0):
        raise f.error("guidance_start", f"a {what} unit acts on every step here: send 0 and 1 (got {start:g}, {end:g})")


def _image_prompt(f: Fields, name: str, picture: np.ndarray, weight: float, mask: np.ndarray | None,
                  run: tuple[float, float]) -> ImagePromptSettings:  # fmt: skip
    """An IP-Adapter unit: the model names a published IP-Adapter ("ip-adapter_sd15 [6a3f4d1e]"), whose image
    encoder the module must be."""
    _whole_run(f, *run, "IP-Adapter")
    adapter = model_stem(f.text("model", ""))
    if adapter not in locate.IP_ADAPTERS:
        raise f.error("model", f"{adapter or 'None'!r} is not an IP-Adapter this server runs; choose one of "
                               f"{', '.join(locate.IP_ADAPTERS)}")  # fmt: skip
    encoder = IP_ADAPTER_MODULES[name]
    if encoder is not None and encoder != locate.image_encoder_folder(adapter):
        raise f.error("module", f"{adapter} reads the other image encoder than {name}; send ip-adapter-auto")
    return ImagePromptSettings(picture, adapter, weight, mask)


def read_units(studio: Studio, f: Fields, family: str, sources: Sources | None = None) -> ControlParts:
    """Every unit of `alwayson_scripts.controlnet.args`; other always-on scripts with arguments are refused (this
    server has none of them)."""
    scripts = f.values.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise f.error("alwayson_scripts", 'must be a JSON object: {"controlnet": {"args": [unit, ...]}}')
    parts = ControlParts()
    for name, script in scripts.items():
        args = script.get("args") if isinstance(script, dict) else script
        if str(name).lower() != "controlnet":
            if args:
                raise f.error(f"alwayson_scripts.{name}", "this server runs the ControlNet extension's units only")
            continue
        if not isinstance(args, (list, type(None))):
            raise f.error(f"alwayson_scripts.{name}.args", "must be a list of ControlNet units")
        for i, unit in enumerate(args or []):
            read_unit(studio, i, unit, family, sources, parts, f"alwayson_scripts.{name}.args")
    return parts
