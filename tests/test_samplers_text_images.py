"""Schedules against diffusers, the offline SD1.5 tokenizer, reading awkward images, the model manager."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.errors import InputError
from cldm.io.images import load_rgb
from cldm.sampling.ddim import DDIM
from cldm.sampling.euler import EulerAncestral
from cldm.sampling.samplers import make_sampler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_schedules_match_diffusers(steps):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    ddim = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(steps)
    assert torch.equal(DDIM(steps).timesteps, ddim.timesteps)
    dpm = DPMSolverMultistepScheduler(**SD15, use_karras_sigmas=True)
    dpm.set_timesteps(steps)
    ours = make_sampler("dpmpp_2m_karras", steps)
    assert torch.equal(ours.timesteps, dpm.timesteps)
    assert torch.allclose(ours.sigmas, dpm.sigmas, rtol=1e-5)
    ea = EulerAncestralDiscreteScheduler(**SD15, timestep_spacing="leading")  # SD1.5's config spacing
    ea.set_timesteps(steps)
    assert torch.allclose(EulerAncestral(steps).sigmas, ea.sigmas, rtol=1e-5)
    assert abs(float(EulerAncestral(steps).init_noise(torch.ones(1))) - float(ea.init_noise_sigma)) < 1e-4


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_lms_karras_schedule_matches_diffusers(steps):
    """LMS Karras: Karras sigmas between those of the leading timesteps, fractional timesteps (diffusers' rule)."""
    from diffusers import LMSDiscreteScheduler

    ref = LMSDiscreteScheduler(**SD15, use_karras_sigmas=True, timestep_spacing="leading")
    ref.set_timesteps(steps)
    ours = make_sampler("lms_karras", steps)
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-5)
    assert torch.allclose(ours.timesteps, ref.timesteps, atol=1e-3)
    assert abs(float(ours.init_noise(torch.ones(1))) - float(ref.init_noise_sigma)) < 1e-4
    if steps >= 4:  # the multistep coefficients: exact integrals against diffusers' numerical ones
        for i in range(4):
            ref._step_index = i
            order = min(i + 1, 4)
            want = [ref.get_lms_coefficient(order, i, j) for j in range(order)]
            assert [ours.coefficient(order, i, j) for j in range(order)] == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_unipc_schedule_matches_diffusers(steps):
    """UniPC spaces its leading timesteps over steps + 1 intervals (diffusers' rule), ending at sigma 0."""
    from diffusers import UniPCMultistepScheduler

    from cldm.sampling.unipc import UniPC

    ref = UniPCMultistepScheduler(**SD15, timestep_spacing="leading")
    ref.set_timesteps(steps)
    ours = UniPC(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)


def _diffusers_scheduler(key: str, steps: int):
    """diffusers' scheduler for one of our sampler keys, SD1.5 config, timesteps set."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        DPMSolverSDEScheduler,
        EulerDiscreteScheduler,
        LMSDiscreteScheduler,
    )  # fmt: skip

    kind, _, schedule = key.rpartition("_") if key.endswith(("_karras", "_exponential")) else (key, "", "")
    classes = {"euler": EulerDiscreteScheduler, "lms": LMSDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
               "dpmpp_2m_sde": DPMSolverMultistepScheduler, "dpmpp_sde": DPMSolverSDEScheduler}  # fmt: skip
    extra = {"use_karras_sigmas": schedule == "karras", "use_exponential_sigmas": schedule == "exponential"}
    if kind == "dpmpp_2m_sde":
        extra["algorithm_type"] = "sde-dpmsolver++"
    ref = classes[kind](**SD15, timestep_spacing="leading", **extra)
    ref.set_timesteps(steps)
    return ref


SCHEDULED = [f"{kind}{sched}" for kind in ("euler", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde")
             for sched in ("", "_karras", "_exponential")]  # fmt: skip


@pytest.mark.parametrize("key", SCHEDULED)
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_every_schedule_matches_diffusers(key, steps):
    """Each sampler on its uniform, Karras and exponential schedules: the same sigmas, the same timesteps the model
    sees (DPM++ SDE's interleaved midpoints included) and the same starting noise scale as diffusers."""
    ref, ours = _diffusers_scheduler(key, steps), make_sampler(key, steps)
    assert ours.sigmas.shape == ref.sigmas.shape
    assert torch.allclose(ours.sigmas, ref.sigmas.float(), rtol=1e-5), (ours.sigmas, ref.sigmas)
    assert torch.allclose(ours.timesteps.double(), ref.timesteps.double(), atol=1e-3), (ours.timesteps, ref.timesteps)
    if not key.startswith("dpmpp_2m"):  # DPM-Solver keeps x in the VP scale (noise scale 1)
        assert abs(float(ours.init_noise(torch.ones(1))) - float(ref.init_noise_sigma)) < 1e-4
    assert len(ours.timesteps) == ours.model_calls(steps)


def test_sampler_labels_are_a1111s():
    from cldm.sampling.samplers import SAMPLER_LABELS

    assert SAMPLER_LABELS["dpmpp_sde_karras"] == "DPM++ SDE Karras"
    assert SAMPLER_LABELS["dpmpp_2m_sde_exponential"] == "DPM++ 2M SDE Exponential"
    assert SAMPLER_LABELS["euler"] == "Euler" and SAMPLER_LABELS["lms_karras"] == "LMS Karras"
    assert len(set(SAMPLER_LABELS.values())) == len(SAMPLER_LABELS)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("plms", 10)


def test_offline_clip_tokenizer(tmp_path):
    from cldm.io.tokenizer import clip_tokenizer

    tok = clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    # built once, then read from the cache folder
    assert (tmp_path / "tok" / "vocab.json").exists()
    assert clip_tokenizer(tmp_path / "tok")("a dog")["input_ids"] == tok("a dog")["input_ids"]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_awkward_images_become_rgb():
    rgb = Image.new("RGB", (8, 6), (10, 200, 30))
    cases = {
        "16-bit": Image.fromarray((np.ones((6, 8)) * 40000).astype(np.uint16)),
        "cmyk": rgb.convert("CMYK"),
        "rgba": Image.new("RGBA", (8, 6), (255, 0, 0, 0)),
        "palette": rgb.convert("P"),
        "gray": rgb.convert("L"),
    }
    for name, img in cases.items():
        fmt = "TIFF" if name in ("16-bit", "cmyk") else "PNG"
        out = load_rgb(_encode(img, fmt))
        assert out.shape == (6, 8, 3) and out.dtype == np.uint8, name
    assert (load_rgb(_encode(cases["rgba"], "PNG")) == 255).all()  # transparent -> white
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert load_rgb(gif.getvalue())[0, 0, 0] > 200  # the first frame


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_broken_images(data):
    if data is None:  # a real PNG cut in half
        data = _encode(Image.new("RGB", (64, 64)), "PNG")[:40]
    with pytest.raises(InputError, match="Cannot read the image"):
        load_rgb(data)


def test_huge_image_refused_before_decoding():
    big = Image.new("L", (8000, 6000))
    with pytest.raises(InputError, match="too large"):
        load_rgb(_encode(big, "PNG", optimize=False, compress_level=1))


def test_manager_loads_base_once_and_swaps(tiny_dirs, ours, other_controlnet, tmp_path):
    from cldm.io import writers
    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.runtime.manager import ModelManager

    sd_dir, cn_dir = tiny_dirs
    _, cn = ours
    writers.save_controlnet(cn, tmp_path / "a.safetensors")
    writers.save_controlnet(other_controlnet, tmp_path / "b.safetensors", fmt="bare")  # other weights
    m = ModelManager(str(sd_dir), device="cpu", dtype="fp32", cache_bytes=1)  # room for one cached ControlNet
    hint = np.full((64, 64, 3), 40, np.uint8)
    hint[16:48, 16:48] = 255

    def run(name):
        return m.run(GenerationRequest("x", units=(ControlUnit(str(tmp_path / name), hint),), steps=2, width=64,
                                       height=64, seed=1))  # fmt: skip

    first, other, again = run("a.safetensors"), run("b.safetensors"), run("a.safetensors")
    assert m.base_loads == 1
    assert m.controlnet_loads == 3  # the cache holds one: "a" was dropped for "b" and loaded again
    assert np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)  # a mix-up of the two would show
    assert 'ControlNet 0: "Model: b,' in other.parameters
    assert {"swap", "sampling", "decode"} <= set(first.timings)
    with pytest.raises(InputError, match="no CUDA"):
        if not torch.cuda.is_available():
            ModelManager(str(sd_dir), device="cuda")
        else:
            raise InputError("no CUDA (skipped: this machine has one)")
