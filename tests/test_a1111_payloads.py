"""A1111 payloads as the app's records (issue 30, `studio/a1111/payloads.py`, `units.py`, `extension.py`): each field
becomes what the app's own tab would build for the same settings, a bad value is refused naming its field, and the
answers carry the very PNG files the app wrote."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cldm.errors import Stopped
from cldm.hints.conditions import BY_KEY
from cldm.io.images import read_parameters
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode, Upscaler
from studio.a1111.extension import detect, model_list, module_list
from studio.a1111.fields import load, mask, png_base64
from studio.a1111.payloads import PayloadError, img2img_job, run_job, txt2img_job
from studio.a1111.units import model_stem
from studio.control_models import control_model_names
from studio.settings import Defaults, PassSettings, UnitSettings

SIZE = 64
UNITS = "alwayson_scripts.controlnet.args"


def _picture(side: int = SIZE) -> np.ndarray:
    img = np.full((side, side, 3), 255, np.uint8)
    img[side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = (200, 30, 30)
    return img


def _b64(img: np.ndarray, prefix: str = "") -> str:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")
    return prefix + base64.b64encode(out.getvalue()).decode()


def _stub(tmp_path: Path, files: tuple[str, ...] = ("canny-tiny",)) -> SimpleNamespace:
    """What the payload readers ask of a Studio, without a model: its defaults, bases and models folder."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    for name in files:  # weight files, or diffusers folders (a name without a suffix)
        path = models / name if Path(name).suffix else models / name / "diffusion_pytorch_model.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
    bases = {"base.safetensors": str(tmp_path / "base.safetensors"), "other.ckpt": str(tmp_path / "other.ckpt")}
    return SimpleNamespace(size=SIZE, defaults=Defaults(size=SIZE, steps=4, cfg=5.0, sampler="euler"), bases=bases,
                           models_dir=str(models), control_models=lambda: control_model_names(models, []),
                           base_for=lambda name: bases.get(name or "base.safetensors"),
                           family_of=lambda path=None: "SD1.5")  # fmt: skip


def _unit(**values) -> dict:
    return {"enabled": True, "image": _b64(_picture()), "module": "canny", **values}


def _txt2img(*units, **values) -> dict:
    return {"prompt": "a red square", "width": SIZE, "height": SIZE, "steps": 2,
            "alwayson_scripts": {"controlnet": {"args": list(units)}}, **values}  # fmt: skip


def _same(got: UnitSettings, want: UnitSettings) -> None:
    """Field by field (pictures by their pixels)."""
    for f in fields(UnitSettings):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, dict) and "background" in b:
            assert set(a) == set(b) and np.array_equal(a["background"], b["background"])
            assert all(np.array_equal(x, y) for x, y in zip(a["layers"], b["layers"], strict=True))
        elif isinstance(b, np.ndarray):
            assert np.array_equal(a, b), f.name
        else:
            assert a == b, f"{f.name}: {a!r} != {b!r}"


def _field(excinfo) -> str:
    return excinfo.value.field


def test_units_become_the_records_the_multi_tab_builds(tmp_path):
    studio = _stub(tmp_path)
    job = txt2img_job(studio, _txt2img(
        _unit(module="canny", model="control_v11p_sd15_canny [d14c016b]", weight=0.8, guidance_start=0.1,
              guidance_end=0.9, threshold_a=50, threshold_b=150, processor_res=256, control_mode=2,
              resize_mode="Just Resize"),
        {"input_image": _b64(_picture()), "module": "none", "model": "canny-tiny", "guidance": 0.5,
         "control_mode": "My prompt is more important", "resize_mode": 2, "processor_res": -1, "threshold_a": -1},
        _unit(enabled=False, module="no such module"),  # switched off: not even read
        _unit(module="depth", model="None", threshold_a=64, threshold_b=64, pixel_perfect=True, save_detected_map=False),
    ))  # fmt: skip
    img = _picture()
    # as the Multi tab's job builds them: UnitSettings from the panel, then the options and the Model list
    want = [
        UnitSettings(BY_KEY["canny"], img, "canny", 256, {"low_threshold": 50, "high_threshold": 150}, 0.8, 0.1, 0.9,
                     ControlMode.CONTROL, ResizeMode.JUST, False, None, None),
        UnitSettings(BY_KEY["canny"], img, "none", SIZE, {}, 1.0, 0.0, 0.5, ControlMode.PROMPT, ResizeMode.FILL, True,
                     "canny-tiny"),
        UnitSettings(BY_KEY["depth"], img, "depth_midas", SIZE, {}, pixel_perfect=True),
    ]  # fmt: skip
    assert len(job.units) == 3
    for got, expected in zip(job.units, want):
        _same(got, expected)
    assert job.maps == [True, True, False]
    assert job.base is None and job.image_prompts == [] and job.reference is None
    # thresholds out of a slider's range take its default, as the extension resets them
    low = txt2img_job(studio, _txt2img(_unit(module="canny", threshold_a=-1, threshold_b=999)))
    assert low.units[0].params == {"low_threshold": 100, "high_threshold": 200}


def test_modules_and_models_by_the_extensions_names(tmp_path):
    studio = _stub(tmp_path, ("control_v11p_sd15_canny.safetensors", "t2iadapter_sketch_sd15v2.safetensors"))
    assert model_stem("control_v11p_sd15_canny [d14c016b]") == "control_v11p_sd15_canny"
    assert model_stem("sub/t2iadapter_sketch_sd15v2.safetensors [0123abcd]") == "t2iadapter_sketch_sd15v2"
    cases = {  # module, model -> (condition, our preprocessor, model file)
        ("depth_midas", "None"): ("depth", "depth_midas", None),
        ("lineart_realistic", ""): ("lineart", "lineart", None),
        ("hed", "None"): ("softedge", "softedge_hed", None),
        ("seg_ufade20k", "None"): ("seg", "seg_ade20k", None),
        ("invert (from white bg & black line)", "control_v11p_sd15s2_lineart_anime [aa]"): ("lineart_anime", "invert", None),
        ("tile_resample", "None"): ("tile", "none", None),
        ("none", "t2iadapter_sketch_sd15v2 [0123abcd]"): ("scribble", "none", "t2iadapter_sketch_sd15v2.safetensors"),
    }  # fmt: skip
    for (module, model), (cond, pre, file) in cases.items():
        unit = txt2img_job(studio, _txt2img(_unit(module=module, model=model))).units[0]
        assert (unit.cond.key, unit.preprocessor, unit.model) == (cond, pre, file), module
    bad = {  # unit values -> the field named
        (("module", "no_such_module"),): "module",
        (("module", "canny"), ("model", "control_v99_unknown [12345678]")): "model",
        (("module", "none"), ("model", "None")): "model",  # no condition can be told
        (("module", "depth_midas"), ("model", "control_v11p_sd15_canny")): "module",  # not canny's preprocessor
        (("module", "canny"), ("weight", 3)): "weight",
        (("module", "canny"), ("guidance_start", 0.6), ("guidance_end", 0.4)): "guidance_end",
        (("module", "canny"), ("control_mode", 7)): "control_mode",
        (("module", "canny"), ("image", "not base64!")): "image",
        (("module", "canny"), ("hr_option", "Low res only")): "hr_option",
    }
    for values, name in bad.items():
        with pytest.raises(PayloadError) as e:
            txt2img_job(studio, _txt2img(_unit(**dict(values))))
        assert _field(e) == f"{UNITS}[0].{name}", values
    with pytest.raises(PayloadError) as e:
        txt2img_job(studio, _txt2img(_unit(module="canny"), _unit(module="canny", image="")))
    assert _field(e) == f"{UNITS}[1].image"  # txt2img has no init picture to take


def test_settings_sampler_seed_and_what_is_refused(tmp_path):
    studio = _stub(tmp_path)
    job = txt2img_job(studio, _txt2img(_unit(module="canny"), negative_prompt="blurry", cfg_scale=6.5,
                                        sampler_name="DPM++ 2M", scheduler="Karras", seed=-1, batch_size=2))  # fmt: skip
    s = job.settings
    assert (s.prompt, s.added_prompt, s.negative_prompt, s.cfg, s.sampler, s.batch, s.randomize) == (
        "a red square", "", "blurry", 6.5, "dpmpp_2m_karras", 2, True)  # fmt: skip
    assert job.extras == PassSettings(seed_per_picture=True) and job.echo["sampler_name"] == "DPM++ 2M"  # as sent
    left_out = txt2img_job(studio, {"alwayson_scripts": {"controlnet": {"args": [_unit(module="canny")]}}}).settings
    assert (left_out.width, left_out.steps, left_out.cfg, left_out.sampler) == (SIZE, 4, 5.0, "euler")  # the page's
    samplers = {("Euler a", "Automatic"): "euler_a", ("DPM++ 2M SDE", "Automatic"): "dpmpp_2m_sde_exponential",
                ("Euler", "sgm_uniform"): "euler_sgm_uniform", ("DDIM", "Uniform"): "ddim",
                ("DPM++ 2M Karras", ""): "dpmpp_2m_karras", ("dpmpp_2m_karras", ""): "dpmpp_2m_karras"}  # fmt: skip
    for (name, schedule), key in samplers.items():
        assert txt2img_job(studio, _txt2img(_unit(), sampler_name=name, scheduler=schedule)).settings.sampler == key
    fixed = txt2img_job(studio, _txt2img(_unit(), seed=7, sampler_name="DDIM", eta=0.4))
    assert (fixed.settings.seed, fixed.settings.randomize, fixed.guidance.eta) == (7, False, 0.4)
    assert txt2img_job(studio, _txt2img(_unit(), sampler_name="Euler a", eta=1.0)).guidance.eta == 0.0  # ancestral
    refused = {
        "prompt": {"prompt": 5},
        "width": {"width": 5000},
        "height": {"height": 100},  # not a multiple of 8
        "steps": {"steps": 0},
        "cfg_scale": {"cfg_scale": "high"},
        "batch_size": {"batch_size": 5},
        "seed": {"seed": -2},
        "sampler_name": {"sampler_name": "Heun"},
        "scheduler": {"sampler_name": "UniPC", "scheduler": "Karras"},
        "n_iter": {"n_iter": 2},
        "styles": {"styles": ["photo"]},
        "restore_faces": {"restore_faces": True},
        "subseed_strength": {"subseed_strength": 0.3},
        "override_settings.sd_model_checkpoint": {"override_settings": {"sd_model_checkpoint": "missing.ckpt"}},
        "override_settings.sd_vae": {"override_settings": {"sd_vae": "missing.vae.pt"}},
        "alwayson_scripts.ADetailer": {"alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face"}]}}},
    }
    for name, values in refused.items():
        with pytest.raises(PayloadError) as e:
            txt2img_job(studio, {**_txt2img(_unit(module="canny")), **values})
        assert _field(e) == name, values
        assert name in str(e.value)
    plain = txt2img_job(studio, _txt2img())  # plain text to image, as A1111's clients mostly ask
    assert plain.units == [] and plain.image_prompts == [] and plain.reference is None


def test_hires_fix_and_override_settings(tmp_path):
    studio = _stub(tmp_path)
    job = txt2img_job(studio, _txt2img(_unit(module="canny"), enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                                        hr_second_pass_steps=3, denoising_strength=0.5,
                                        override_settings={"sd_model_checkpoint": "other [0123456789]",
                                                           "CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}))  # fmt: skip
    e = job.extras
    assert (e.hires, e.hires_scale, e.hires_upscaler, e.hires_steps, e.hires_strength) == (
        True, 1.5, Upscaler.LANCZOS, 3, 0.5)  # fmt: skip
    assert (job.base, e.clip_skip, job.settings.denoise) == ("other.ckpt", 2, 1.0)
    assert txt2img_job(studio, _txt2img(_unit(), enable_hr=True, hr_resize_y=128)).extras.hires_scale == 2.0
    assert not txt2img_job(studio, _txt2img(_unit(), enable_hr=False, hr_upscaler="SwinIR 4x")).extras.hires
    for values, name in (({"hr_upscaler": "Latent (bicubic)"}, "hr_upscaler"), ({"hr_scale": 8}, "hr_scale"),
                         ({"hr_resize_x": 128, "hr_resize_y": 192}, "hr_resize_y"),
                         ({"hr_prompt": "another prompt"}, "hr_prompt")):  # fmt: skip
        with pytest.raises(PayloadError) as exc:
            txt2img_job(studio, _txt2img(_unit(), enable_hr=True, **values))
        assert _field(exc) == name


def test_img2img_inpaint_gives_the_inpaint_tabs_records(tmp_path):
    studio = _stub(tmp_path)
    init = _picture()
    painted = np.zeros((SIZE, SIZE), np.uint8)
    painted[8:24, 8:40] = 255
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)  # a mask with transparency: its alpha says where to repaint
    rgba[..., 3] = painted
    payload = {"prompt": "a car", "init_images": [_b64(init, "data:image/png;base64,")], "width": SIZE,
               "height": SIZE, "denoising_strength": 0.9, "mask": _b64(rgba), "mask_blur": 4, "inpainting_fill": 1,
               "inpaint_full_res": True, "resize_mode": 1, "seed": 3}  # fmt: skip
    job = img2img_job(studio, payload)
    # what the Inpaint tab sends: its editor (background + painted layer), its unit and pass defaults
    editor = {"background": init, "layers": [painted], "composite": init}
    _same(job.units[0], UnitSettings(BY_KEY["inpaint"], editor, "none", SIZE, {}, 1.0, 0.0, 1.0, ControlMode.BALANCED,
                                     ResizeMode.CROP, True))  # fmt: skip
    assert len(job.units) == 1 and job.maps == [True]
    assert job.extras == PassSettings(None, 4.0, InpaintMode.ONLY, seed_per_picture=True)
    assert (job.settings.denoise, job.settings.seed, job.echo["init_images"]) == (0.9, 3, None)
    grey = np.stack([255 - painted] * 3, axis=-1)  # white-on-black inverted: inpainting_mask_invert turns it back
    inverted = img2img_job(studio, {**payload, "mask": _b64(grey), "inpainting_mask_invert": 1})
    assert np.array_equal(inverted.units[0].image["layers"][0], painted)
    # an inpaint unit without a picture takes img2img's picture and mask, and says the inpaint mode
    harmonious = img2img_job(studio, {**payload, "alwayson_scripts": {"controlnet": {"args": [
        {"module": "inpaint_global_harmonious", "model": "control_v11p_sd15_inpaint [ebff9138]", "weight": 0.7}]}}})  # fmt: skip
    assert len(harmonious.units) == 1 and harmonious.units[0].scale == 0.7
    assert harmonious.extras.inpaint_mode is InpaintMode.GLOBAL
    # the same unit in txt2img (its own picture and mask) says the inpaint mode too
    unit = {
        "module": "inpaint_global_harmonious",
        "model": "control_v11p_sd15_inpaint [ebff9138]",
        "image": {"image": _b64(init), "mask": _b64(np.stack([painted] * 3, axis=-1))},
    }
    text = txt2img_job(studio, {"prompt": "a car", "width": SIZE, "height": SIZE,
                                "alwayson_scripts": {"controlnet": {"args": [unit]}}})  # fmt: skip
    assert text.units[0].cond.key == "inpaint" and text.extras.inpaint_mode is InpaintMode.GLOBAL
    assert np.array_equal(harmonious.units[0].image["layers"][0], painted)
    # plain img2img beside a ControlNet: the init picture fitted by resize_mode (0: Just Resize) to the size
    plain = img2img_job(studio, {**payload, "mask": None, "resize_mode": 0, "init_images": [_b64(_picture(96))],
                                 "alwayson_scripts": {"controlnet": {"args": [_unit(module="canny")]}}})  # fmt: skip
    assert plain.extras.init_image.shape == (SIZE, SIZE, 3) and plain.units[0].cond.key == "canny"
    for values, name in (({"init_images": []}, "init_images"), ({"mask": _b64(np.zeros((SIZE, SIZE, 3), np.uint8))},
                         "mask"), ({"denoising_strength": 0}, "denoising_strength"),
                         ({"inpainting_fill": 4}, "inpainting_fill"), ({"mask_blur": 100}, "mask_blur")):  # fmt: skip
        with pytest.raises(PayloadError) as exc:
            img2img_job(studio, {**payload, **values})
        assert _field(exc) == name


def test_ip_adapter_and_reference_units(tmp_path):
    studio = _stub(tmp_path)
    region = np.zeros((SIZE, SIZE, 3), np.uint8)
    region[:, : SIZE // 2] = 255
    job = txt2img_job(studio, _txt2img(
        _unit(module="ip-adapter_clip_sd15", model="ip-adapter_sd15 [6a3f4d1e]", weight=0.6,
              effective_region_mask=_b64(region)),
        _unit(module="reference_adain+attn", weight=0.9, threshold_a=0.3),
    ))  # fmt: skip
    (ip,) = job.image_prompts
    assert (ip.adapter, ip.scale) == ("ip-adapter_sd15", 0.6) and np.array_equal(ip.mask, region)
    ref = job.reference
    assert (ref.preprocessor, ref.style_fidelity, ref.weight, job.units) == ("reference_adain+attn", 0.3, 0.9, [])
    for unit, name in ((_unit(module="ip-adapter_clip_sd15", model="None"), "model"),
                       (_unit(module="ip-adapter_clip_g", model="ip-adapter_sd15"), "module"),
                       (_unit(module="reference_only", guidance_end=0.5), "guidance_start")):  # fmt: skip
        with pytest.raises(PayloadError) as exc:
            txt2img_job(studio, _txt2img(unit))
        assert _field(exc) == f"{UNITS}[0].{name}"


def test_pictures_in_and_out_of_base64():
    img = _picture(40)
    for text in (_b64(img), _b64(img, "data:image/png;base64,"), _b64(img)[:30] + "\n" + _b64(img)[30:]):
        assert np.array_equal(load("image", text), img)
    assert np.array_equal(load("image", png_base64(img)), img)  # what detect answers reads back as it was
    grey = np.zeros((8, 8), np.uint8)
    grey[:, 4:] = 200
    assert np.array_equal(mask("mask", _b64(grey)), np.where(grey > 127, 255, 0))
    for bad in ("", "!!!", base64.b64encode(b"not a picture").decode(), 12, "https://example.com/a.png"):
        with pytest.raises(PayloadError) as e:
            load("init_images[0]", bad)
        assert e.value.field == "init_images[0]"


def test_model_and_module_lists(tmp_path):
    studio = _stub(tmp_path, ("control_v11p_sd15_canny.safetensors", "ip-adapter_sd15.safetensors"))
    names = model_list(studio)["model_list"]
    # the extension's names: the stem, then A1111's short hash (64 KiB from 1 MiB in: none here, so sha256 of b"")
    assert names == ["control_v11p_sd15_canny [e3b0c442]", "ip-adapter_sd15 [e3b0c442]"]
    plain, labels = module_list(studio)["module_list"], module_list(studio, alias_names=True)["module_list"]
    assert plain[0] == "none" and {"canny", "depth", "hed", "inpaint", "ip-adapter_clip_sd15"} <= set(plain)
    assert {"depth_midas", "softedge_hed", "inpaint_global_harmonious", "ip-adapter_clip_h"} <= set(labels)
    canny = module_list(studio)["module_detail"]["canny"]
    assert [s["name"] for s in canny["sliders"]] == ["Resolution", "Canny low threshold", "Canny high threshold"]
    assert canny["model_free"] is True


@pytest.fixture(scope="module")
def tiny_studio(tiny_dirs, tmp_path_factory):
    """A Studio on the tiny test models, the ControlNet in the models folder as canny's and inpaint's own."""
    from cldm.runtime.manager import ModelManager
    from studio.service import Studio

    sd_dir, cn_dir = tiny_dirs
    root = tmp_path_factory.mktemp("a1111")
    for own in ("control_v11p_sd15_canny", "control_v11p_sd15_inpaint"):
        shutil.copytree(cn_dir, root / "models" / own)
    return Studio(ModelManager(str(sd_dir), device="cpu", dtype="fp32"), str(root / "models"), str(root / "out"))


def test_detect_gives_the_pages_preview_hint(tiny_studio):
    img = _picture()
    img[4:14, 4:30] = 230  # a faint box: its edges pass Canny at 50 / 120, not at the default 100 / 200
    answer = detect(tiny_studio, {"controlnet_module": "canny", "controlnet_input_images": [_b64(img)],
                                  "controlnet_threshold_a": 50, "controlnet_threshold_b": 120})  # fmt: skip
    assert answer["info"] == "Success" and len(answer["images"]) == 1
    unit = UnitSettings(BY_KEY["canny"], img, "canny", SIZE, {"low_threshold": 50, "high_threshold": 120},
                        pixel_perfect=True)  # fmt: skip
    want = tiny_studio.hint(unit, (SIZE, SIZE))
    assert want.any() and np.array_equal(load("images[0]", answer["images"][0]), want)
    default = tiny_studio.hint(UnitSettings(BY_KEY["canny"], img, "canny", SIZE, {}, pixel_perfect=True), (SIZE, SIZE))
    assert not np.array_equal(default, want)  # the thresholds sent are the ones used
    # the webuiapi client's payload: the older "controlnet_images", a data: URL, processor_res 512, thresholds 64
    client = detect(tiny_studio, {"controlnet_module": "canny", "controlnet_images": [_b64(img, "data:image/png;base64,")],
                                  "controlnet_processor_res": 512, "controlnet_threshold_a": 64,
                                  "controlnet_threshold_b": 64})  # fmt: skip
    unit = UnitSettings(BY_KEY["canny"], img, "canny", 512, {"low_threshold": 64, "high_threshold": 64})
    assert np.array_equal(load("images[0]", client["images"][0]), tiny_studio.hint(unit, (SIZE, SIZE)))
    for values, name in (({"controlnet_module": "reference_only"}, "controlnet_module"),
                         ({"controlnet_input_images": []}, "controlnet_input_images")):  # fmt: skip
        with pytest.raises(PayloadError) as e:
            detect(tiny_studio, {"controlnet_module": "canny", "controlnet_input_images": [_b64(img)], **values})
        assert _field(e) == name


def test_run_job_answers_with_the_files_the_app_wrote(tiny_studio):
    quiet = lambda *a, **k: None  # noqa: E731
    payload = _txt2img(_unit(module="none", model="control_v11p_sd15_canny [e3b0c442]", weight=0.9), seed=11,
                       batch_size=2, sampler_name="Euler")  # fmt: skip
    job = txt2img_job(tiny_studio, payload)
    answer = run_job(tiny_studio, job, quiet, None, "a1111-test")
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 3  # two pictures, then the unit's hint
    files = sorted(tiny_studio.out_dir.glob("*.png"), key=lambda p: p.stat().st_mtime)[-2:]
    sent = [base64.b64decode(b) for b in answer["images"][:2]]
    assert sorted(sent) == sorted(p.read_bytes() for p in files)  # the very files, parameters text included
    assert info["infotexts"] == [read_parameters(b) for b in sent] and info["all_seeds"] == [11, 12]
    assert info["seed"] == 11 and "Seed: 11" in info["infotexts"][0] and answer["parameters"]["seed"] == 11
    hint = load("hint", answer["images"][2])
    assert np.array_equal(hint, _picture())  # module none: the picture is the hint
    # the same records through studio.generate, as the Multi tab runs them: the same pictures
    unit = UnitSettings(BY_KEY["canny"], _picture(), "none", SIZE, {}, 0.9, pixel_perfect=True)
    _, _, pngs = tiny_studio.generate([unit], job.settings, quiet, extras=PassSettings(seed_per_picture=True))
    assert [np.asarray(Image.open(p)).tobytes() for p in pngs] == [
        np.asarray(Image.open(io.BytesIO(b))).tobytes() for b in sent
    ]
    no_maps = run_job(tiny_studio, txt2img_job(tiny_studio, {**payload, "batch_size": 1, "alwayson_scripts": {
        "controlnet": {"args": [{**payload["alwayson_scripts"]["controlnet"]["args"][0], "save_detected_map": False}]}},
        "steps": 1}), quiet, None, "a1111-test")  # fmt: skip
    assert len(no_maps["images"]) == 1
    # plain text to image (no unit): the library's picture of the same request
    plain = txt2img_job(tiny_studio, {"prompt": "a red square", "seed": 4, "steps": 2, "width": SIZE, "height": SIZE,
                                      "sampler_name": "Euler", "cfg_scale": 5})  # fmt: skip
    picture = load("images[0]", run_job(tiny_studio, plain, quiet, None, "a1111-test")["images"][0])
    from cldm.pipeline.request import GenerationRequest

    same = GenerationRequest("a red square", steps=2, width=SIZE, height=SIZE, sampler="euler", cfg_scale=5.0, seed=4,
                             seed_per_picture=True)  # fmt: skip
    assert np.array_equal(picture, tiny_studio.manager.run(same).images[0])
    # an /interrupt that came after the request was admitted but before it started (while its payload was read)
    admitted = time.monotonic()
    tiny_studio.stops.stop("a1111-early")
    with pytest.raises(Stopped):
        run_job(tiny_studio, plain, quiet, None, "a1111-early", admitted)
    assert run_job(tiny_studio, plain, quiet, None, "a1111-early", time.monotonic())["images"]  # a later one runs


def test_img2img_inpaint_runs_as_the_inpaint_tab(tiny_studio):
    """The picture of an img2img inpaint request is the one the Inpaint tab's records give, pixel for pixel."""
    quiet = lambda *a, **k: None  # noqa: E731
    init, painted = _picture(), np.zeros((SIZE, SIZE), np.uint8)
    painted[8:40, 8:40] = 255
    payload = {"prompt": "a car", "init_images": [_b64(init)], "mask": _b64(painted), "width": SIZE, "height": SIZE,
               "steps": 2, "seed": 5, "denoising_strength": 1.0, "sampler_name": "Euler", "mask_blur": 2}  # fmt: skip
    answer = run_job(tiny_studio, img2img_job(tiny_studio, payload), quiet, None, "a1111-test")
    assert len(answer["images"]) == 2  # the picture, then the inpaint unit's hint (the masked picture)
    editor = {"background": init, "layers": [painted], "composite": init}
    unit = UnitSettings(BY_KEY["inpaint"], editor, "none", SIZE, pixel_perfect=True)
    s = img2img_job(tiny_studio, payload).settings
    _, _, pngs = tiny_studio.generate([unit], s, quiet, extras=PassSettings(mask_blur=2.0, seed_per_picture=True))
    picture = load("images[0]", answer["images"][0])
    assert np.array_equal(picture, np.asarray(Image.open(pngs[0]).convert("RGB")))
    assert np.array_equal(picture[48:], init[48:])  # inpaint_only: away from the (blurred) mask, the picture kept
    assert not np.array_equal(picture[8:40, 8:40], init[8:40, 8:40])
