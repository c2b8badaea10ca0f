"""The ControlNet extension's own routes' answers: /controlnet/model_list (the models folder's control models and
IP-Adapters, named as the extension names them), /controlnet/module_list (the modules this server runs, by the
extension's names or labels) and /controlnet/detect (a preprocessor's hint, as the page's "Preview hint" makes it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import annotators
from annotators.images import MAX_RESOLUTION, MIN_RESOLUTION
from cldm.hints.conditions import BY_KEY, CONDITIONS, PREPROCESSOR_NONE
from cldm.io import locate
from studio.a1111.fields import Fields, load, png_base64
from studio.a1111.units import (
    EXTENSION_NAMES,
    INPAINT_MODULES,
    IP_ADAPTER_MODULES,
    SLIDERLESS,
    TILE_MODULE,
    model_stem,
    module,
    resolution,
    slider_params,
)  # fmt: skip
from studio.service import Studio
from studio.settings import REFERENCE_PREPROCESSORS, UnitSettings

# The modules that are not hint preprocessors: (the extension's name, its label)
OTHER_MODULES = (
    ("inpaint", "inpaint_global_harmonious"), ("inpaint_only", "inpaint_only"), (TILE_MODULE, TILE_MODULE),
    *((name, name) for name in REFERENCE_PREPROCESSORS),
    ("ip-adapter_clip_sd15", "ip-adapter_clip_h"), ("ip-adapter_clip_sdxl", "ip-adapter_clip_g"),
    ("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith"), ("ip-adapter-auto", "ip-adapter-auto"),
)  # fmt: skip
NO_RESOLUTION = (PREPROCESSOR_NONE, "invert")  # the extension shows no resolution slider for these
RESOLUTION_SLIDER = {"name": "Resolution", "value": 512, "min": MIN_RESOLUTION, "max": MAX_RESOLUTION, "step": 8}
FIDELITY_SLIDER = {"name": "Style Fidelity (only for Balanced mode)", "value": 0.5, "min": 0.0, "max": 1.0,
                   "step": 0.01}  # fmt: skip
HASH_OFFSET, HASH_BYTES = 0x100000, 0x10000  # A1111's short model hash: 64 KiB read 1 MiB into the file


def model_hash(path: Path) -> str:
    """The 8 hex digits the extension puts after a model's name (A1111's old model hash); a diffusers folder is
    hashed by its weights file."""
    if path.is_dir():
        path = next((path / w for w in locate.DIFFUSERS_WEIGHTS if (path / w).is_file()), path)
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            f.seek(HASH_OFFSET)
            digest.update(f.read(HASH_BYTES))
    return digest.hexdigest()[:8]


def model_list(studio: Studio) -> dict:
    """{"model_list": ["control_v11p_sd15_canny [d14c016b]", ...]}: the control models a unit's `model` may name
    (the models folder's, as the page's Model list has them) and the IP-Adapters there."""
    folder = Path(studio.models_dir or "models")
    names = [f"{model_stem(n)} [{model_hash(locate.locate_control_model(n, studio.models_dir))}]"
             for n in studio.control_models()]  # fmt: skip
    for stem in locate.IP_ADAPTERS:
        path = next(
            (folder / f"{stem}{s}" for s in (".safetensors", ".bin") if (folder / f"{stem}{s}").is_file()), None
        )
        if path is not None:
            names.append(f"{stem} [{model_hash(path)}]")
    return {"model_list": names}


def _sliders(name: str) -> list[dict]:
    """A preprocessor's sliders as the extension describes them (resolution, threshold_a, threshold_b)."""
    shown = [] if name in NO_RESOLUTION else [RESOLUTION_SLIDER]
    params = () if name in SLIDERLESS else annotators.ANNOTATORS[name].params[:2]
    return shown + [{"name": p.label, "value": p.default, "min": p.minimum, "max": p.maximum, "step": p.step}
                    for p in params]  # fmt: skip


def module_list(studio: Studio, alias_names: bool = False) -> dict:
    """{"module_list": [...], "module_detail": {...}}: the modules this server runs, by the extension's names (or,
    with `alias_names`, its labels), "none" first; each one's sliders and whether it needs weights."""
    side = 1 if alias_names else 0
    ours = [n for n in annotators.ANNOTATORS if any(n in c.preprocessors for c in CONDITIONS)]
    detail = {}
    for name in ours:
        shown = EXTENSION_NAMES.get(name, (name, name))[side]
        detail[shown] = {"model_free": not annotators.ANNOTATORS[name].needs_weights, "sliders": _sliders(name)}
    for names in OTHER_MODULES:
        shown = names[side]
        sliders = [FIDELITY_SLIDER] if shown in REFERENCE_PREPROCESSORS else []
        detail[shown] = {"model_free": shown in REFERENCE_PREPROCESSORS, "sliders": sliders}
    listed = [PREPROCESSOR_NONE, *sorted(n for n in detail if n != PREPROCESSOR_NONE)]
    return {"module_list": listed, "module_detail": {n: detail[n] for n in listed}}


def detect(studio: Studio, payload: dict) -> dict:
    """/controlnet/detect: each picture's hint by `controlnet_module`, at the picture's own size, as the page's
    Preview hint makes it (`studio.hint`); controlnet_processor_res -1 (or out of range): pixel perfect."""
    f = Fields(payload)
    name = f.text("controlnet_module", PREPROCESSOR_NONE)
    if name in IP_ADAPTER_MODULES or name in REFERENCE_PREPROCESSORS or name in INPAINT_MODULES:
        raise f.error("controlnet_module", f"{name!r} makes no hint to show; give a hint preprocessor "
                                           "(GET /controlnet/module_list)")  # fmt: skip
    mod = module(name, f, "controlnet_module")
    cond = (
        BY_KEY[mod.condition] if mod.condition else next(c for c in CONDITIONS if mod.preprocessor in c.preprocessors)
    )
    key = next((k for k in ("controlnet_input_images", "controlnet_images") if f.given(k)), "controlnet_input_images")
    pictures = f.values.get(key)  # controlnet_images: the older name, which the webuiapi client still sends
    if not isinstance(pictures, list) or not pictures:
        raise f.error(key, "give at least one picture (a list of base64 pictures)")
    res, perfect = resolution(studio, f.loose_number("controlnet_processor_res"), False)
    params = slider_params(mod.preprocessor, f.loose_number("controlnet_threshold_a"),
                           f.loose_number("controlnet_threshold_b"))  # fmt: skip
    hints = []
    for i, value in enumerate(pictures):
        picture = load(f"{key}[{i}]", value)
        unit = UnitSettings(cond, picture, mod.preprocessor, res, params, pixel_perfect=perfect)
        hints.append(png_base64(studio.hint(unit, (picture.shape[1], picture.shape[0]))))
    return {"images": hints, "info": "Success"}
