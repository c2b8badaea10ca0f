"""cldm.pipeline.infotext: our own parameters text read back, and A1111's as its webui and ControlNet extension write it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cldm.errors import InputError
from cldm.pipeline.infotext import NO_PARAMETERS, Infotext, UnitInfo, parse_parameters
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import parameters
from cldm.pipeline.vocabulary import ControlMode, ResizeMode

MODEL = SimpleNamespace(
    source="models/stable-diffusion-v1-5/", latent_factor=8, native_size=512
)  # all parameters() reads of a model
HINT = np.zeros((8, 8, 3), np.uint8)
CANNY = "models/controlnet/control_v11p_sd15_canny.safetensors"
DEPTH = "models/controlnet/control_v11f1p_sd15_depth.safetensors"

# A1111 1.10 with sd-webui-controlnet 1.1.45x: the schedule apart from the sampler, two units, hashes, hires fix.
A1111_110 = """\
masterpiece, best quality, 1girl, standing in a flower field, <lora:add_detail:0.6>
Negative prompt: easynegative, (worst quality:1.4), lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3405691582, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, \
Hires upscaler: R-ESRGAN 4x+ Anime6B, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], \
Weight: 0.85, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, \
Guidance Start: 0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both", \
ControlNet 1: "Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], Weight: 0.5, \
Resize Mode: Just Resize, Processor Res: 384, Guidance Start: 0.1, Guidance End: 1, Pixel Perfect: True, \
Control Mode: ControlNet is more important, Hr Option: Both", Lora hashes: "add_detail: 7c6bad76eb54", \
TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1"""

# A1111 1.6 with ADetailer (a quoted value with escaped quotes) and two LoRAs in one quoted "Lora hashes".
A1111_16 = """\
photo of a woman dancing, city street, golden hour,
film grain
Negative prompt: cartoon, painting,
bad hands
Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 12345, Size: 768x512, Model hash: c0d1994c73, \
Model: realisticVisionV51_v51VAE, ControlNet 0: "Module: openpose_full, Model: control_v11p_sd15_openpose [cab727d4], \
Weight: 1, Resize Mode: Resize and Fill, Low Vram: False, Processor Res: 512, Guidance Start: 0, Guidance End: 1, \
Pixel Perfect: True, Control Mode: My prompt is more important, Save Detected Map: True", \
ADetailer model: face_yolov8n.pt, ADetailer prompt: "a \\"smiling\\" face, detailed eyes", ADetailer confidence: 0.3, \
ADetailer version: 23.11.1, Lora hashes: "epiNoiseoffset_v2: d1131f7207d6, add_detail: 7c6bad76eb54", Version: v1.6.0"""

# A1111 1.3 with sd-webui-controlnet 1.1.2xx: one unit under "ControlNet", lower-case keys, tuples.
A1111_13 = """\
a cozy cabin in the woods, snow
Negative prompt: blurry
Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: e1441589a6, \
Model: v1-5-pruned, Denoising strength: 0.75, ControlNet: "preprocessor: canny, \
model: control_v11p_sd15_canny [d14c016b], weight: 1, starting/ending: (0.2, 0.9), resize mode: Crop and Resize, \
pixel perfect: False, control mode: Balanced, preprocessor params: (512, 100, 200)", Version: v1.3.2"""

# Still older: "ControlNet-i" keys, the old resize-mode names and modes as numbers.
A1111_OLD_MULTI = """\
a castle on a hill
Steps: 30, Sampler: DDIM, CFG scale: 9, Seed: 7, Size: 640x448, Model hash: 81761151, \
ControlNet-1: "preprocessor: none, model: control_sd15_depth [fef5e48e], weight: 0.6, starting/ending: (0, 0.5), \
resize mode: Envelope (Outer Fit), pixel perfect: True, control mode: 2, preprocessor params: (-1, -1, -1)", \
ControlNet-0: "preprocessor: mlsd, model: control_sd15_mlsd [fef5e48e], weight: 1.2, starting/ending: (0, 1), \
resize mode: Scale to Fit (Inner Fit), control mode: ControlNet is more important, \
preprocessor params: (384, 0.1, 0.1)\""""


def _request(**kw) -> GenerationRequest:
    units = (
        ControlUnit(CANNY, HINT, scale=0.8, start=0.1, end=0.9),
        ControlUnit(DEPTH, HINT, scale=1.25, start=0.0, end=0.6, mode="prompt"),
    )
    base = dict(
        prompt="a red car\non a wet street, night", negative_prompt="blurry, lowres", units=units, steps=30,
        cfg_scale=6.5, sampler="dpmpp_2m_karras", seed=1234567890123, width=512, height=768, clip_skip=2,
        init_image=np.zeros((64, 64, 3), np.uint8), strength=0.6,
    )  # fmt: skip
    return GenerationRequest(**{**base, **kw})


def test_round_trip_of_our_own_parameters():
    text = parameters(MODEL, _request())
    info = parse_parameters(text)
    assert isinstance(info, Infotext)
    assert info.prompt == "a red car\non a wet street, night"
    assert info.negative_prompt == "blurry, lowres"
    assert (info.steps, info.cfg_scale, info.seed) == (30, 6.5, 1234567890123)
    assert (info.sampler, info.sampler_label) == ("dpmpp_2m_karras", "DPM++ 2M Karras")
    assert (info.width, info.height) == (512, 768)
    assert info.model == "stable-diffusion-v1-5"
    assert info.denoising_strength == 0.6
    assert info.clip_skip == 2
    assert info.fields["Size"] == "512x768"
    assert len(info.units) == 2
    u0, u1 = info.units
    assert (u0.index, u0.model, u0.scale, u0.start, u0.end) == (0, "control_v11p_sd15_canny", 0.8, 0.1, 0.9)
    assert (u0.control_mode, u0.resize_mode, u0.pixel_perfect) == (ControlMode.BALANCED, ResizeMode.CROP, False)
    assert (u1.index, u1.model, u1.scale, u1.start, u1.end) == (1, "control_v11f1p_sd15_depth", 1.25, 0.0, 0.6)
    assert u1.control_mode == ControlMode.PROMPT
    assert u1.raw["Control Mode"] == "My prompt is more important"
    assert info.fields["ControlNet 1"].startswith("Model: control_v11f1p_sd15_depth, Weight: 1.25")


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_round_trip_of_every_sampler_and_the_defaults(sampler):
    r = GenerationRequest(prompt="a cat", sampler=sampler, units=(ControlUnit(CANNY, HINT),))
    info = parse_parameters(parameters(MODEL, r))
    assert (info.prompt, info.negative_prompt) == ("a cat", "")
    assert info.sampler == sampler
    assert (info.steps, info.cfg_scale, info.seed, info.width, info.height) == (20, 7.5, 0, 512, 512)
    assert info.denoising_strength is None  # txt2img writes none
    assert info.clip_skip == 1  # left out at its default, read back as 1
    assert info.units == (UnitInfo(0, model="control_v11p_sd15_canny", raw=info.units[0].raw),)
    assert info.units[0].raw == {
        "Model": "control_v11p_sd15_canny", "Weight": "1.0", "Guidance Start": "0.0", "Guidance End": "1.0",
    }  # fmt: skip


def test_round_trip_of_the_unit_settings_a1111_writes():
    unit = ControlUnit(
        CANNY, HINT, scale=0.7, start=0.05, end=0.95, mode="control", resize_mode="just", preprocessor="canny",
        processor_res=768, pixel_perfect=True,
    )  # fmt: skip
    info = parse_parameters(parameters(MODEL, _request(units=(unit,), resize_mode="fill")))
    (u,) = info.units
    assert (u.module, u.model, u.scale, u.start, u.end) == ("canny", "control_v11p_sd15_canny", 0.7, 0.05, 0.95)
    assert (u.resize_mode, u.processor_res, u.pixel_perfect, u.control_mode) == (
        ResizeMode.JUST,
        768,
        True,
        ControlMode.CONTROL,
    )
    assert (u.threshold_a, u.threshold_b) == (None, None)
    assert info.resize_mode == ResizeMode.FILL


def test_a1111_110_with_schedule_type_and_two_units():
    info = parse_parameters(A1111_110)
    assert info.prompt == "masterpiece, best quality, 1girl, standing in a flower field, <lora:add_detail:0.6>"
    assert info.negative_prompt == "easynegative, (worst quality:1.4), lowres"
    assert (info.sampler_label, info.fields["Schedule type"], info.sampler) == ("DPM++ 2M", "Karras", "dpmpp_2m_karras")
    assert (info.steps, info.cfg_scale, info.seed, info.width, info.height) == (28, 7.0, 3405691582, 512, 768)
    assert (info.model, info.denoising_strength, info.clip_skip) == ("v1-5-pruned-emaonly", 0.45, 2)
    assert info.fields["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert info.fields["TI hashes"] == "easynegative: c74b4e810b03"
    assert info.fields["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert info.fields["Version"] == "v1.10.1"
    assert info.units[0] == UnitInfo(
        index=0, module="canny", model="control_v11p_sd15_canny", scale=0.85, start=0.0, end=0.8,
        resize_mode=ResizeMode.CROP, pixel_perfect=False, control_mode=ControlMode.BALANCED, processor_res=512,
        threshold_a=100.0, threshold_b=200.0, raw=info.units[0].raw,
    )  # fmt: skip
    assert info.units[0].raw["Model"] == "control_v11p_sd15_canny [d14c016b]"
    assert info.units[0].raw["Hr Option"] == "Both"
    u1 = info.units[1]
    assert (u1.index, u1.module, u1.model, u1.scale, u1.start, u1.end) == (
        1, "depth_midas", "control_v11f1p_sd15_depth", 0.5, 0.1, 1.0,
    )  # fmt: skip
    assert (u1.resize_mode, u1.pixel_perfect, u1.control_mode, u1.processor_res) == (
        ResizeMode.JUST,
        True,
        ControlMode.CONTROL,
        384,
    )
    assert (u1.threshold_a, u1.threshold_b) == (None, None)


def test_a1111_16_with_multi_line_prompts_and_escaped_quotes():
    info = parse_parameters(A1111_16)
    assert info.prompt == "photo of a woman dancing, city street, golden hour,\nfilm grain"
    assert info.negative_prompt == "cartoon, painting,\nbad hands"
    assert (info.sampler, info.sampler_label) == ("euler_a", "Euler a")
    assert (info.cfg_scale, info.seed, info.width, info.height) == (7.5, 12345, 768, 512)
    assert info.model == "realisticVisionV51_v51VAE"
    assert info.clip_skip == 1
    assert info.denoising_strength is None
    assert info.fields["ADetailer prompt"] == 'a "smiling" face, detailed eyes'
    assert info.fields["ADetailer confidence"] == "0.3"
    assert info.fields["Lora hashes"] == "epiNoiseoffset_v2: d1131f7207d6, add_detail: 7c6bad76eb54"
    (u,) = info.units
    assert (u.module, u.model, u.scale, u.start, u.end) == ("openpose_full", "control_v11p_sd15_openpose", 1.0, 0, 1)
    assert (u.resize_mode, u.pixel_perfect, u.control_mode, u.processor_res) == (
        ResizeMode.FILL,
        True,
        ControlMode.PROMPT,
        512,
    )
    assert u.raw["Save Detected Map"] == "True" and u.raw["Low Vram"] == "False"


def test_old_lower_case_extension_format():
    info = parse_parameters(A1111_13)
    assert (info.prompt, info.negative_prompt) == ("a cozy cabin in the woods, snow", "blurry")
    assert (info.sampler, info.steps, info.seed, info.denoising_strength) == ("dpmpp_2m_karras", 20, 42, 0.75)
    (u,) = info.units
    assert u == UnitInfo(
        index=0, module="canny", model="control_v11p_sd15_canny", scale=1.0, start=0.2, end=0.9, resize_mode=ResizeMode.CROP,
        pixel_perfect=False, control_mode=ControlMode.BALANCED, processor_res=512, threshold_a=100.0, threshold_b=200.0,
        raw=u.raw,
    )  # fmt: skip
    assert u.raw["starting/ending"] == "(0.2, 0.9)"
    assert u.raw["preprocessor params"] == "(512, 100, 200)"


def test_old_numbered_units_are_sorted_and_old_names_mapped():
    info = parse_parameters(A1111_OLD_MULTI)
    assert (info.prompt, info.negative_prompt, info.sampler) == ("a castle on a hill", "", "ddim")
    assert info.model is None and (info.width, info.height) == (640, 448)
    u0, u1 = info.units
    assert (u0.index, u0.module, u0.model, u0.scale, u0.start, u0.end) == (0, "mlsd", "control_sd15_mlsd", 1.2, 0, 1)
    assert (u0.resize_mode, u0.control_mode, u0.pixel_perfect) == (ResizeMode.CROP, ControlMode.CONTROL, False)
    assert (u0.processor_res, u0.threshold_a, u0.threshold_b) == (384, 0.1, 0.1)
    assert (u1.index, u1.module, u1.model, u1.scale) == (1, "none", "control_sd15_depth", 0.6)
    assert (u1.start, u1.end) == (0.0, 0.5)
    assert (u1.resize_mode, u1.control_mode, u1.pixel_perfect) == (ResizeMode.FILL, ControlMode.CONTROL, True)
    assert (u1.processor_res, u1.threshold_a, u1.threshold_b) == (None, None, None)  # -1: the slider was not used


@pytest.mark.parametrize(
    "sampler, schedule, key",
    [
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("dpm++ 2m karras", None, "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", "Karras", "dpmpp_2m_karras"),
        ("Euler a", "Automatic", "euler_a"),
        ("EULER A", "Uniform", "euler_a"),
        ("DDIM", None, "ddim"),
        ("DPM++ 2M", None, "dpmpp_2m"),  # before 1.9, plain DPM++ 2M had no Karras sigmas
        ("DPM++ 2M", "Exponential", "dpmpp_2m_exponential"),
        ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),  # 1.9's default schedule for it
        ("DPM++ 2M SDE", "Automatic", "dpmpp_2m_sde_exponential"),
        ("DPM++ SDE Karras", None, "dpmpp_sde_karras"),
        ("DPM++ SDE", "Automatic", "dpmpp_sde_karras"),
        ("Euler a", "Karras", None),  # Euler a runs on its own schedule only (as diffusers)
        ("Euler", "Automatic", "euler"),
        ("Euler", "Karras", "euler_karras"),
        ("DPM++ 2M SDE", "Karras", "dpmpp_2m_sde_karras"),
        ("LMS", "Karras", "lms_karras"),
        ("LMS", None, "lms"),
        ("DPM++ 2M SDE", None, "dpmpp_2m_sde"),
        ("DPM++ 3M SDE", "Karras", None),  # not one of ours
    ],
)
def test_sampler_labels_map_to_our_keys(sampler, schedule, key):
    line = f"Steps: 20, Sampler: {sampler}, " + (f"Schedule type: {schedule}, " if schedule else "") + "Seed: 1"
    info = parse_parameters(f"a cat\n{line}")
    assert info.sampler == key
    assert info.sampler_label == sampler


@pytest.mark.parametrize(
    "written, key",
    [("Just Resize", "just"), ("0", "just"), ("ResizeMode.INNER_FIT", "crop"), ("1", "crop"), ("2", "fill"),
     ("resize and fill", "fill"), ("something else", "crop")],
)  # fmt: skip
def test_resize_mode_names(written, key):
    info = parse_parameters(f'x\nSteps: 1, Seed: 2, ControlNet 0: "Model: m, Resize Mode: {written}"')
    assert info.units[0].resize_mode is ResizeMode(key)


def test_unreadable_numbers_are_skipped_and_kept_as_text():
    text = 'a cat\r\nSteps: many, CFG scale: high, Seed: 12, Size: big, Clip skip: two, ControlNet 0: "Weight: heavy, \
Guidance Start: soon, Processor Res: 51x, Model: m [abc]"'
    info = parse_parameters(text)
    assert (info.steps, info.cfg_scale, info.seed, info.width, info.height, info.clip_skip) == (
        None, None, 12, None, None, None,
    )  # fmt: skip
    assert (info.fields["Steps"], info.fields["Size"], info.fields["Clip skip"]) == ("many", "big", "two")
    (u,) = info.units
    assert (u.model, u.scale, u.start, u.end, u.processor_res) == ("m", 1.0, 0.0, 1.0, None)
    assert u.raw == {"Weight": "heavy", "Guidance Start": "soon", "Processor Res": "51x", "Model": "m [abc]"}


def test_a_unit_without_pairs_is_left_out():
    info = parse_parameters('p\nSteps: 20, Seed: 3, ControlNet 0: "", ControlNet 2: "Model: tile"')
    assert [(u.index, u.model) for u in info.units] == [(2, "tile")]
    assert info.fields["ControlNet 0"] == ""


def test_prompt_with_colons_and_a_negative_prompt_only():
    info = parse_parameters("Negative prompt: ugly, text: watermark\nSteps: 10, Sampler: DDIM, Seed: 5")
    assert (info.prompt, info.negative_prompt) == ("", "ugly, text: watermark")
    assert (info.steps, info.sampler, info.seed) == (10, "ddim", 5)


@pytest.mark.parametrize("text", ["", "   \n  "])
def test_text_without_parameters_is_an_input_error(text):
    with pytest.raises(InputError) as e:
        parse_parameters(text)
    assert str(e.value) == NO_PARAMETERS
    assert str(e.value).startswith("This picture carries no generation parameters")


@pytest.mark.parametrize(
    "text, prompt",
    [("just a prompt", "just a prompt"), ("a cat\nSteps: 20, Seed: 1", "a cat\nSteps: 20, Seed: 1"),
     ("a, b\nc, d, e", "a, b\nc, d, e")],
)  # fmt: skip
def test_text_with_fewer_than_three_fields_is_all_prompt(text, prompt):
    """A1111's rule: a last line with under three "Key: value" fields is part of the prompt."""
    info = parse_parameters(text)
    assert info.prompt == prompt and info.fields == {} and info.steps is None


def test_long_texts_and_the_first_extension_format():
    with pytest.raises(InputError, match="at most 30000"):
        parse_parameters("a\nSteps: 1, Seed: 2, Size: 64x64, " + "x" * 40_000)
    info = parse_parameters(
        "a cat\nSteps: 20, Sampler: Euler a, Seed: 1, ControlNet-0 Enabled: True, ControlNet-0 Module: canny, "
        "ControlNet-0 Model: control_sd15_canny [fef5e48e], ControlNet-0 Weight: 0.7, ControlNet-0 Guidance Start: 0, "
        "ControlNet-0 Guidance End: 0.8"
    )
    (u,) = info.units
    assert (u.module, u.model, u.scale, u.start, u.end) == ("canny", "control_sd15_canny", 0.7, 0.0, 0.8)


@pytest.mark.parametrize("value", [None, b"Steps: 20, Seed: 1, Size: 8x8", 42])
def test_a_non_text_is_an_input_error(value):
    with pytest.raises(InputError, match="must be text"):
        parse_parameters(value)
