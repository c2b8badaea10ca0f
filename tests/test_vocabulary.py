"""The vocabulary: every choice is one enum whose value is A1111's label; keys and older spellings parse to it."""

from __future__ import annotations

import numpy as np
import pytest

from cldm.errors import InputError
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode, Sampler, Upscaler
from cldm.sampling.samplers import SAMPLERS

ENUMS = (ControlMode, ResizeMode, InpaintMode, Upscaler, Sampler)


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_every_label_and_key_round_trips(enum):
    for m in enum:
        assert enum(m.value) is m and enum.parse(m.value) is m
        assert enum.parse(m.key) is m and enum.parse(m.value.upper()) is m
        assert str(m) == m.value and f"{m}" == m.value  # written as the label
    assert len({m.key for m in enum}) == len({m.value.lower() for m in enum}) == len(enum)


def test_the_labels_are_a1111s():
    assert [m.value for m in ControlMode] == ["Balanced", "My prompt is more important", "ControlNet is more important"]
    assert [m.value for m in ResizeMode] == ["Just Resize", "Crop and Resize", "Resize and Fill"]
    assert ResizeMode.keys() == ["just", "crop", "fill"] and ControlMode.keys() == ["balanced", "prompt", "control"]
    assert InpaintMode.keys() == ["only", "global"] and Upscaler.keys() == ["latent", "lanczos"]


@pytest.mark.parametrize(
    "enum, written, key",
    [(ResizeMode, "Just Resize", "just"), (ResizeMode, "resize", "just"), (ResizeMode, "0", "just"),
     (ResizeMode, "Scale to Fit (Inner Fit)", "crop"), (ResizeMode, "ResizeMode.INNER_FIT", "crop"),
     (ResizeMode, "inner_fit", "crop"), (ResizeMode, "1", "crop"), (ResizeMode, "Envelope (Outer Fit)", "fill"),
     (ResizeMode, "outer_fit", "fill"), (ResizeMode, "2", "fill"), (ResizeMode, " crop ", "crop"),
     (ControlMode, "0", "balanced"), (ControlMode, "1", "prompt"), (ControlMode, "2", "control"),
     (ControlMode, "ControlMode.BALANCED", "balanced"), (ControlMode, "my prompt is more important", "prompt"),
     (InpaintMode, "inpaint_only", "only"), (InpaintMode, "inpaint_global_harmonious", "global"),
     (Upscaler, "Latent", "latent"), (Sampler, "DPM++ 2M Karras", "dpmpp_2m_karras"), (Sampler, "Euler a", "euler_a")],
)  # fmt: skip
def test_old_keys_and_aliases_parse(enum, written, key):
    assert enum.parse(written).key == key


def test_an_unknown_name_says_what_is_allowed():
    with pytest.raises(InputError, match="not a resize mode; choose one of just, crop, fill"):
        ResizeMode.parse("stretch")
    with pytest.raises(ValueError):
        ControlMode("3")
    assert ControlMode.coerce("nonsense") == "nonsense" and ControlMode.coerce("prompt") is ControlMode.PROMPT


def test_the_samplers_are_the_sampler_table():
    assert Sampler.keys() == list(SAMPLERS)
    assert Sampler("dpmpp_2m_karras").value == "DPM++ 2M Karras"
    assert Sampler.from_a1111("DPM++ 2M", "Karras") is Sampler.DPMPP_2M_KARRAS
    assert Sampler.from_a1111("DPM++ 2M", "Automatic") is Sampler.DPMPP_2M_KARRAS  # A1111's default for it
    assert Sampler.from_a1111("Euler a", "Automatic") is Sampler.EULER_A
    assert Sampler.from_a1111("DPM++ 2M Karras", "Karras") is Sampler.DPMPP_2M_KARRAS


def test_requests_take_keys_labels_and_members():
    from cldm.pipeline.request import ControlUnit, GenerationRequest, HiresFix

    hint = np.zeros((8, 8, 3), np.uint8)
    for mode in ("prompt", "My prompt is more important", ControlMode.PROMPT):
        assert ControlUnit("cn.safetensors", hint, mode=mode).mode is ControlMode.PROMPT
    r = GenerationRequest("x", resize_mode="fill", inpaint_mode="global", hires=HiresFix(upscaler="lanczos"))
    assert (r.resize_mode, r.inpaint_mode, r.hires.upscaler) == (ResizeMode.FILL, InpaintMode.GLOBAL, Upscaler.LANCZOS)
    assert r.summary()["resize_mode"] == "fill" and r.summary()["hires"]["upscaler"] == "lanczos"  # manifests: keys
    bad = GenerationRequest("x", units=(ControlUnit("cn.safetensors", hint, mode="loud", resize_mode="wide"),))
    with pytest.raises(InputError) as e:
        bad.validate()
    assert "mode must be one of balanced, prompt, control (got 'loud')" in str(e.value)
    assert "resize_mode must be one of just, crop, fill (got 'wide')" in str(e.value)


def test_the_parameters_text_writes_the_labels():
    from types import SimpleNamespace

    from cldm.pipeline.infotext import parameters, parse_parameters
    from cldm.pipeline.request import ControlUnit, GenerationRequest, HiresFix

    hint = np.zeros((8, 8, 3), np.uint8)
    unit = ControlUnit("canny.safetensors", hint, mode="control", resize_mode="just")
    r = GenerationRequest("a cat", units=(unit,), sampler="dpmpp_2m_karras", init_image=hint, mask=hint[..., 0],
                          resize_mode="fill", inpaint_mode="global", hires=HiresFix(upscaler="lanczos"))  # fmt: skip
    text = parameters(SimpleNamespace(source="base.safetensors", hash="", native_size=512), r)
    assert "Sampler: DPM++ 2M Karras," in text and "Resize mode: Resize and Fill," in text
    assert "Inpaint mode: global," in text and "Hires upscaler: Lanczos" in text
    assert "Resize Mode: Just Resize" in text and "Control Mode: ControlNet is more important" in text
    info = parse_parameters(text)
    assert (info.sampler, info.resize_mode) == ("dpmpp_2m_karras", ResizeMode.FILL)
    assert (info.units[0].control_mode, info.units[0].resize_mode) == (ControlMode.CONTROL, ResizeMode.JUST)


def test_a_request_takes_the_sampler_as_member_label_or_key():
    """The library takes a Sampler as it takes the other choices; the request keeps our key, so the text and the
    sampler it runs are the same whichever spelling came in; a name that is none of them is refused by name."""
    from cldm.pipeline.request import GenerationRequest

    spellings = (Sampler.DPMPP_2M_KARRAS, "DPM++ 2M Karras", "dpmpp_2m_karras")
    assert {GenerationRequest("a", sampler=s).sampler for s in spellings} == {"dpmpp_2m_karras"}
    assert GenerationRequest("a", sampler="Euler a").sampler == "euler_a"
    with pytest.raises(InputError, match=r"sampler must be one of .*\(got 'DPM\+\+ 9M'\)"):
        GenerationRequest("a", sampler="DPM++ 9M").validate()
