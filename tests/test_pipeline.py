"""generate() and the CLI against diffusers' ControlNet pipelines with the same weights and seed."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.__main__ import main
from cldm.io import checkpoints
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.sampling.samplers import SAMPLER_LABELS

SIZE = 64
PIXEL_TOL = 2  # out of 255, per pixel


def _hint(seed=0):
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255  # a square, plus texture so the ControlNet has something to read
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


def _ref(pipe, scheduler_name, **kw):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSDEScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LMSDiscreteScheduler,
        UniPCMultistepScheduler,
    )  # fmt: skip

    classes = {
        "ddim": (DDIMScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "lms": (LMSDiscreteScheduler, {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": kw["seed"]}),  # the Brownian tree's seed
        "unipc": (UniPCMultistepScheduler, {}),
    }  # fmt: skip
    kind, schedule = scheduler_name, ""
    for suffix in ("_karras", "_exponential"):
        if scheduler_name.endswith(suffix):
            kind, schedule = scheduler_name.removesuffix(suffix), suffix[1:]
    cls, extra = classes[kind]
    if schedule:
        extra = {**extra, f"use_{schedule}_sigmas": True}
    # always from the pipeline's own scheduler config: a config left by another test would carry its options
    # (use_karras_sigmas, algorithm_type ...) into this scheduler
    if not hasattr(pipe, "_first_scheduler_config"):
        pipe._first_scheduler_config = dict(pipe.scheduler.config)
    original = pipe.scheduler
    pipe.scheduler = cls.from_config(pipe._first_scheduler_config, **extra)
    seed = kw.pop("seed")
    try:
        out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", width=SIZE, height=SIZE, **kw)
    finally:  # the shared pipeline goes back as it was: other test files use its scheduler as they find it
        pipe.scheduler = original
    return (out.images * 255).round().astype(np.uint8)


def _gen(sd, prompt, negative="", units=(), **kw):
    return generate(sd, GenerationRequest(prompt, negative, tuple(units), **kw))


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_cli_matches_diffusers(tiny_dirs, ref_pipe, tmp_path, sampler):
    sd_dir, cn_dir = tiny_dirs
    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    args = [
        "generate", "--dtype", "fp32", "--base", str(sd_dir), "--controlnet", str(cn_dir), "--hint", str(tmp_path / "hint.png"),
        "--prompt", "a red square", "--negative-prompt", "blurry", "--steps", "10", "--cfg", "7.5", "--seed", "42",
        "--sampler", sampler, "--control-scale", "0.8", "--width", str(SIZE), "--height", str(SIZE),
        "--batch", "2", "--out", str(tmp_path / "out.png"), "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    ref = _ref(
        ref_pipe, sampler, prompt="a red square", negative_prompt="blurry", image=Image.fromarray(_hint()),
        num_inference_steps=10, guidance_scale=7.5, seed=42, controlnet_conditioning_scale=0.8, num_images_per_prompt=2,
    )  # fmt: skip
    for i in range(2):
        png = Image.open(tmp_path / f"out-{i}.png")
        assert _diff(np.asarray(png), ref[i]) <= PIXEL_TOL
        assert png.text["parameters"].startswith("a red square\nNegative prompt: blurry\nSteps: 10")
        assert "Seed: 42" in png.text["parameters"] and "ControlNet 0:" in png.text["parameters"]
    assert ref.std() > 10  # a real picture, not a flat one


MORE_SAMPLERS = [
    "euler", "euler_karras", "euler_exponential", "lms", "lms_karras", "lms_exponential", "dpmpp_2m",
    "dpmpp_2m_exponential", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential", "dpmpp_sde",
    "dpmpp_sde_karras", "dpmpp_sde_exponential", "unipc",
]  # fmt: skip


@pytest.mark.parametrize("sampler", MORE_SAMPLERS)
# the 20-step sweep (about 85 s) runs in the integration tier (.ci/run), the 6-step one in the fast tier
@pytest.mark.parametrize("steps", [6, pytest.param(20, marks=pytest.mark.integration)])
def test_more_samplers_match_diffusers(ours, ref_pipe, sampler, steps):
    """Every sampler and schedule A1111 names against diffusers' scheduler of the same name: whole pictures with a
    ControlNet, CFG and a batch of 2 (DPM++ 2M SDE draws fresh noise each step from the generator, DPM++ SDE from a
    Brownian tree seeded with the picture's seed)."""
    sd, cn = ours
    ref = _ref(ref_pipe, sampler, prompt="a red square", negative_prompt="blurry", image=Image.fromarray(_hint()),
               num_inference_steps=steps, guidance_scale=6.0, seed=5, num_images_per_prompt=2)  # fmt: skip
    got = _gen(sd, "a red square", "blurry", [ControlUnit(cn, _hint())], steps=steps, cfg_scale=6.0, sampler=sampler,
               seed=5, width=SIZE, height=SIZE, batch=2, emphasis=False)  # fmt: skip
    print(f"{sampler} {steps} steps: max difference {_diff(got.images, ref)}/255")  # the README's figures (-s)
    assert _diff(got.images, ref) <= PIXEL_TOL, _diff(got.images, ref)
    assert ref.std() > 10
    assert f"Sampler: {SAMPLER_LABELS[sampler]}," in got.parameters


@pytest.mark.parametrize("guess_mode", [False, True])
def test_guess_mode_and_start_end_match_diffusers(ours, ref_pipe, guess_mode):
    sd, cn = ours
    kw = dict(prompt="a red square", negative_prompt="", num_inference_steps=8, guidance_scale=6.0, seed=1)
    ref = _ref(ref_pipe, "euler_a", image=Image.fromarray(_hint()), guess_mode=guess_mode,
               control_guidance_start=0.2, control_guidance_end=0.7, **kw)  # fmt: skip
    ours_ = _gen(sd, "a red square", "", [ControlUnit(cn, _hint(), 1.0, 0.2, 0.7)], steps=8, cfg_scale=6.0,
                     sampler="euler_a", seed=1, width=SIZE, height=SIZE, guess_mode=guess_mode, guess_style="diffusers")  # fmt: skip
    assert _diff(ours_.images[0], ref[0]) <= PIXEL_TOL
    # and start/end really matter: always-on control gives another picture
    always = _gen(sd, "a red square", "", [ControlUnit(cn, _hint(), 1.0)], steps=8, cfg_scale=6.0, sampler="euler_a",
                      seed=1, width=SIZE, height=SIZE, guess_mode=guess_mode, guess_style="diffusers")  # fmt: skip
    assert _diff(always.images[0], ours_.images[0]) > 5


def test_multi_controlnet_matches_diffusers(ours, tiny_dirs, ref_pipe):
    import tiny
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    sd, cn = ours
    sd_dir, cn_dir = tiny_dirs
    cn_b_ref = ControlNetModel.from_pretrained(cn_dir)
    tiny.wake_zero_convs(cn_b_ref, seed=7)  # a second, different ControlNet
    cn_b_ref.save_pretrained(str(cn_dir.parent / "cn_b"))
    cn_b = checkpoints.load_controlnet(cn_dir.parent / "cn_b")
    pipe = StableDiffusionControlNetPipeline(**{**ref_pipe.components, "controlnet": [ref_pipe.controlnet, cn_b_ref]})
    pipe.set_progress_bar_config(disable=True)
    ref = _ref(pipe, "ddim", prompt="a cat", image=[Image.fromarray(_hint(0)), Image.fromarray(_hint(1))],
               num_inference_steps=6, guidance_scale=5.0, seed=3, controlnet_conditioning_scale=[1.0, 0.5],
               control_guidance_start=[0.0, 0.3], control_guidance_end=[0.8, 1.0])  # fmt: skip
    controls = [ControlUnit(cn, _hint(0), 1.0, 0.0, 0.8), ControlUnit(cn_b, _hint(1), 0.5, 0.3, 1.0)]
    out = _gen(sd, "a cat", "", controls, steps=6, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE)
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    one = _gen(sd, "a cat", "", controls[:1], steps=6, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE)
    assert _diff(one.images[0], out.images[0]) > 5


def test_global_average_pooling_runs_on_the_conditional_half(ours, tiny_dirs, ref_pipe):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    sd, _ = ours
    _, cn_dir = tiny_dirs
    shuffle = checkpoints.load_controlnet(cn_dir, global_average_pooling=True)
    cn_ref = ControlNetModel.from_pretrained(cn_dir, global_pool_conditions=True)
    pipe = StableDiffusionControlNetPipeline(**{**ref_pipe.components, "controlnet": cn_ref})
    pipe.set_progress_bar_config(disable=True)
    ref = _ref(
        pipe, "ddim", prompt="a cat", image=Image.fromarray(_hint()), num_inference_steps=6, guidance_scale=5.0, seed=4
    )
    out = _gen(
        sd, "a cat", "", [ControlUnit(shuffle, _hint())], steps=6, cfg_scale=5.0, seed=4, width=SIZE, height=SIZE
    )
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_sde_karras", "dpmpp_2m_exponential"])
def test_img2img_batch_matches_diffusers(ours, tiny_dirs, ref_pipe, sampler):
    """img2img starts at the strength's step: for the two-call DPM++ SDE that is entry 2 * step of its loop."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    sd, cn = ours
    init = np.asarray(Image.fromarray(_hint(3)).convert("L").convert("RGB"))
    pipe = StableDiffusionControlNetImg2ImgPipeline(**ref_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    # the shared pipeline's scheduler may carry an earlier test's options: start from its first config, as _ref does
    if not hasattr(ref_pipe, "_first_scheduler_config"):
        ref_pipe._first_scheduler_config = dict(ref_pipe.scheduler.config)
    pipe._first_scheduler_config = ref_pipe._first_scheduler_config
    ref = _ref(
        pipe,
        sampler,
        prompt="a cat",
        image=Image.fromarray(init),
        control_image=Image.fromarray(_hint()),
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        seed=5,
        controlnet_conditioning_scale=1.0,
        num_images_per_prompt=2,
    )  # fmt: skip (the img2img pipeline's default is 0.8)
    out = _gen(sd, "a cat", "", [ControlUnit(cn, _hint())], steps=10, cfg_scale=5.0, seed=5, width=SIZE, height=SIZE,
                   init_image=init, strength=0.6, batch=2, sampler=sampler)  # fmt: skip
    # a batch encodes the init picture once (one posterior sample), as diffusers does
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL and _diff(out.images[1], ref[1]) <= PIXEL_TOL
    assert "Denoising strength: 0.6" in out.parameters


def test_inpaint_keeps_the_unmasked_pixels(ours):
    sd, cn = ours
    init = _hint(4)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 8:40] = 255
    hint = init.astype(np.float32) / 255
    hint[mask > 127] = -1.0  # the inpaint ControlNet's convention: holes are -1
    hint_t = torch.from_numpy(hint).permute(2, 0, 1)[None]
    out = _gen(sd, "a cat", "", [ControlUnit(cn, hint_t)], steps=6, cfg_scale=5.0, seed=6, width=SIZE, height=SIZE,
                   init_image=init, strength=1.0, mask=mask).images[0]  # fmt: skip
    assert np.array_equal(out[mask == 0], init[mask == 0])
    assert _diff(out[mask > 0], init[mask > 0]) > 20


def test_zero_controlnet_changes_nothing_until_trained(ours):
    """The paper's argument: zero convs start at zero so the UNet is untouched, yet their gradient is not zero."""
    from cldm.models.controlnet import ControlNet

    sd, _ = ours
    torch.manual_seed(0)
    cn = ControlNet.from_unet(sd.unet, dataclasses.replace(sd.config.unet, hint_block_channels=(16, 32)))
    assert torch.equal(cn.input_blocks[1][0].in_layers[2].weight, sd.unet.input_blocks[1][0].in_layers[2].weight)
    assert cn.zero_convs[0][0].weight.abs().max() == 0 and cn.input_hint_block[-1].weight.abs().max() == 0
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        base = sd.unet(x, t, ctx)
        assert torch.equal(sd.unet(x, t, ctx, control=cn(x, t, ctx, cn.embed_hint(hint))), base)
    opt = torch.optim.SGD(cn.parameters(), lr=0.1)
    target = torch.randn(base.shape, generator=g)
    loss = (sd.unet(x, t, ctx, control=cn(x, t, ctx, cn.embed_hint(hint))) - target).pow(2).mean()
    loss.backward()
    opt.step()
    assert cn.zero_convs[0][0].weight.abs().max() > 0
    assert cn.middle_block_out[0].weight.abs().max() > 0
    with torch.no_grad():
        assert not torch.equal(sd.unet(x, t, ctx, control=cn(x, t, ctx, cn.embed_hint(hint))), base)


def test_bf16_on_cpu(ours):
    import copy

    sd, cn = ours
    sd16 = copy.deepcopy(sd).to(dtype=torch.bfloat16)
    cn16 = copy.deepcopy(cn).to(dtype=torch.bfloat16)
    kw = dict(steps=6, cfg_scale=5.0, seed=2, width=SIZE, height=SIZE)
    a = _gen(sd16, "a cat", "", [ControlUnit(cn16, _hint())], **kw).images[0]
    b = _gen(sd, "a cat", "", [ControlUnit(cn, _hint())], **kw).images[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 8  # bf16 keeps 8 bits of mantissa


def test_bad_arguments_are_clear(ours):
    from cldm.errors import InputError

    sd, cn = ours
    with pytest.raises(InputError, match="steps"):
        _gen(sd, "x", steps=0, width=SIZE, height=SIZE)
    with pytest.raises(InputError, match="start < end"):
        _gen(sd, "x", units=[ControlUnit(cn, _hint(), start=0.9, end=0.1)], width=SIZE, height=SIZE)
    with pytest.raises(InputError, match="multiples"):
        _gen(sd, "x", width=SIZE + 1, height=SIZE)
    with pytest.raises(InputError, match="init_image"):
        _gen(sd, "x", width=SIZE, height=SIZE, mask=np.ones((SIZE, SIZE)))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"junk" * 10)
    code = main(["generate", "--base", str(tmp_path / "bad.safetensors"), "--prompt", "x", "--device", "cpu"])
    assert code == 2
    assert "not a weight file" in capsys.readouterr().err


class _Ones:
    """A stand-in ControlNet whose 13 residuals are all ones: the scales and halves applied to them show."""

    def __init__(self, pooled=False):
        self.cfg = type("Cfg", (), {"global_average_pooling": pooled, "adm_in_channels": 0})()
        self.zero_convs = [None] * 12

    def __call__(self, x, t, ctx, emb, y=None):
        return [torch.ones_like(x) for _ in range(13)]


@pytest.mark.parametrize("mode", ["balanced", "prompt", "control"])
def test_control_modes_follow_a1111(mode):
    """The extension's rules (soft_injection = mode != Balanced, cfg_injection = mode == ControlNet is more important):
    Balanced: the scale on both halves. My prompt is more important: 0.825 ** (12 - i) on both halves. ControlNet is
    more important: the same decay, on the conditional half only (the CFG scale then multiplies its effect)."""
    from cldm.pipeline.conditioning import Conditioning
    from cldm.pipeline.stages import control_residuals

    x = torch.zeros(1, 4, 2, 2)
    ctx = Conditioning(
        torch.zeros(1, 3, 8), torch.ones(1, 3, 8), torch.cat([torch.zeros(1, 3, 8), torch.ones(1, 3, 8)])
    )
    unit = ControlUnit(_Ones(), np.zeros((8, 8, 3), np.uint8), scale=0.5, mode=mode)
    r = GenerationRequest("a", units=[unit], cfg_scale=7.0)
    res = control_residuals(r, [torch.zeros(1, 4, 2, 2)], x, torch.cat([x, x]), torch.tensor(1), ctx, 0, 10)
    uncond = [float(a[0].mean()) for a in res]
    cond = [float(a[1].mean()) for a in res]
    decay = [0.5 * 0.825 ** (12 - i) for i in range(13)]
    expected = {"balanced": ([0.5] * 13, [0.5] * 13), "prompt": (decay, decay), "control": ([0.0] * 13, decay)}
    assert uncond == pytest.approx(expected[mode][0]) and cond == pytest.approx(expected[mode][1])
    from cldm.errors import InputError

    with pytest.raises(InputError, match="mode must be one of balanced, prompt, control"):
        GenerationRequest("a", units=[replace(unit, model="x.safetensors", mode="guess")]).validate()


def test_control_mode_in_pictures_and_cli(ours, tiny_dirs, tmp_path):
    """Without guidance the halves are one: "control" is "prompt", both guess mode's decay."""
    from PIL import Image

    sd, cn = ours
    kw = dict(steps=2, cfg_scale=1.0, seed=4, width=SIZE, height=SIZE)
    pic = {
        m: _gen(sd, "a", "", [ControlUnit(cn, _hint(), mode=m)], **kw).images for m in ("balanced", "prompt", "control")
    }
    guess = _gen(sd, "a", "", [ControlUnit(cn, _hint())], guess_mode=True, **kw).images
    assert np.array_equal(pic["control"], pic["prompt"]) and np.array_equal(pic["prompt"], guess)
    assert not np.array_equal(pic["prompt"], pic["balanced"])
    with_cfg = _gen(sd, "a", "", [ControlUnit(cn, _hint(), mode="control")], **dict(kw, cfg_scale=5.0))
    # with guidance, "control" is the original guess mode (conditional half only, decaying scales)
    guess_cfg = _gen(sd, "a", "", [ControlUnit(cn, _hint())], guess_mode=True, **dict(kw, cfg_scale=5.0))
    assert np.array_equal(with_cfg.images, guess_cfg.images)
    assert 'Control Mode: ControlNet is more important"' in with_cfg.parameters
    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    args = ["generate", "--dtype", "fp32", "--base", str(tiny_dirs[0]), "--controlnet", str(tiny_dirs[1]),
            "--hint", str(tmp_path / "hint.png"), "--control-mode", "control", "--prompt", "a", "--steps", "2", "--cfg", "5", "--seed", "4",
            "--width", str(SIZE), "--height", str(SIZE), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), with_cfg.images[0])


def test_dpmpp_sde_progress_counts_model_calls(ours):
    """DPM++ SDE calls the model twice per step but once on the last: the progress counts calls, through both
    passes of a hires fix, and ends exactly at its total."""
    from cldm.pipeline.extras import HiresFix

    sd, cn = ours
    seen = []
    r = GenerationRequest("a cat", "", (ControlUnit(cn, _hint()),), steps=5, cfg_scale=5.0, seed=3, width=SIZE,
                          height=SIZE, sampler="dpmpp_sde_karras", hires=HiresFix(scale=1.5, steps=3, strength=0.5))  # fmt: skip
    out = generate(sd, r, callback=lambda k, n: seen.append((k, n)))
    assert seen[-1] == (9 + 5, 9 + 5)  # 2 * 5 - 1 calls, then 2 * 3 - 1 of the hires pass
    assert [k for k, _ in seen] == list(range(1, 15))
    assert out.images.shape[1:3] == (96, 96)


def test_a_unit_at_scale_zero_or_outside_its_window_is_not_run(ours):
    """No work for nothing: a ControlNet at scale 0 is never called and the picture is the one without it; one whose
    window holds the last 3 of 6 steps is called on those 3 only."""
    sd, cn = ours
    calls = []
    handle = cn.register_forward_hook(lambda *a: calls.append(1))
    try:
        kw = dict(steps=6, cfg_scale=5.0, seed=2, width=SIZE, height=SIZE)
        without = _gen(sd, "a red square", **kw).images
        zero = _gen(sd, "a red square", units=[ControlUnit(cn, _hint(), 0.0)], **kw).images
        assert calls == [] and np.array_equal(zero, without)
        _gen(sd, "a red square", units=[ControlUnit(cn, _hint(), 1.0, 0.5, 1.0)], **kw)
        assert len(calls) == 3
    finally:
        handle.remove()
