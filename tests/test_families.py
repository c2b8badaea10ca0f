"""SDXL and SD2.x against diffusers, on tiny random weights written by diffusers in the published layouts
(tests/tiny_families.py): diffusers folders, the original single files (SGM, LDM + OpenCLIP) and ControlNets.

Bound: pictures within 2/255 per pixel in fp32 (what we see is 0 or 1: the same operations, a few summed in
another order); text states and model outputs within 1e-4.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.errors import CheckpointError, InputError
from cldm.io import checkpoints, files, identify
from cldm.pipeline.conditioning import encode_prompts
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from tests import tiny_families as tf
from tests.test_pipeline import MORE_SAMPLERS, _ref

SIZE = 64
PIXEL_TOL = 2
SAMPLERS = ["ddim", "euler_a", "dpmpp_2m_karras"]


def _hint(seed=0):
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 8:40] = 255
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def sdxl_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    pipe = tf.make_sdxl_pipeline(root)
    cn = tf.make_sdxl_controlnet(root, pipe, seed=1)
    mid = tf.make_sdxl_controlnet(root, pipe, seed=2, transformer_layers_per_block=tf.SDXL_CN_MID)
    return pipe, cn, mid


@pytest.fixture(scope="module")
def sdxl(sdxl_dirs):
    pipe, cn, mid = sdxl_dirs
    sd = checkpoints.load_sd(pipe)
    return (
        sd,
        checkpoints.load_controlnet(cn, base=sd.config.unet),
        checkpoints.load_controlnet(mid, base=sd.config.unet),
    )


@pytest.fixture(scope="module")
def sdxl_ref(sdxl_dirs):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    pipe_dir, cn_dir, mid_dir = sdxl_dirs
    cns = [ControlNetModel.from_pretrained(cn_dir), ControlNetModel.from_pretrained(mid_dir)]
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(pipe_dir, controlnet=cns[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe, cns


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd2(request, tmp_path_factory):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    root = tmp_path_factory.mktemp("sd2")
    pipe_dir = tf.make_sd2_pipeline(root, prediction=request.param)
    cn_dir = tf.make_sd2_controlnet(root, pipe_dir)
    ours = checkpoints.load_sd(pipe_dir)
    cn = checkpoints.load_controlnet(cn_dir, base=ours.config.unet)
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        pipe_dir, controlnet=ControlNetModel.from_pretrained(cn_dir), safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ours, cn, ref, pipe_dir, cn_dir


# ------------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_is_told_from_its_weights(sdxl):
    sd, cn, mid = sdxl
    assert sd.family.name == "SDXL" and sd.text_2 is not None and sd.config.vae.scale_factor == 0.13025
    assert sd.config.unet.adm_in_channels == 88 and sd.config.unet.size_embed_dim == 8
    assert cn.cfg.adm_in_channels == 88 and mid.cfg.depth(2) == 1
    # a request that leaves the size out gets the family's native size, as diffusers' pipelines do
    from cldm.pipeline.infotext import parameters

    assert sd.native_size == 1024 and "Size: 1024x1024" in parameters(sd, GenerationRequest("a cat"))


def test_sdxl_text_context_and_pooled_match_diffusers(sdxl, sdxl_ref):
    sd, _, _ = sdxl
    pipe, _ = sdxl_ref
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt("a red circle", do_classifier_free_guidance=True)
    ctx = encode_prompts(sd, GenerationRequest("a red circle", width=SIZE, height=SIZE))
    assert (ctx.cond - pe).abs().max() < 1e-4 and (ctx.uncond - ne).abs().max() == 0  # zeros for an empty negative
    assert (ctx.pooled[1] - pp[0]).abs().max() < 1e-4 and ctx.pooled[0].abs().max() == 0 == npool.abs().max()
    # a negative prompt is encoded (not zeros), as diffusers does when one is given
    with torch.no_grad():
        _, ne2, _, np2 = pipe.encode_prompt("a red circle", negative_prompt="blue", do_classifier_free_guidance=True)
    ctx2 = encode_prompts(sd, GenerationRequest("a red circle", "blue", width=SIZE, height=SIZE))
    assert (ctx2.uncond - ne2).abs().max() < 1e-4 and (ctx2.pooled[0] - np2[0]).abs().max() < 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sdxl_controlnet_txt2img_matches_diffusers(sdxl, sdxl_ref, sampler):
    sd, cn, _ = sdxl
    pipe, cns = sdxl_ref
    pipe.controlnet = cns[0]
    ref = _ref(pipe, sampler, prompt="a red circle", image=Image.fromarray(_hint()), num_inference_steps=6,
               guidance_scale=5.0, seed=3, controlnet_conditioning_scale=0.8)  # fmt: skip
    out = generate(sd, GenerationRequest("a red circle", "", (ControlUnit(cn, _hint(), scale=0.8),), steps=6,
                                         cfg_scale=5.0, seed=3, width=SIZE, height=SIZE, sampler=sampler))  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    assert "SDXL" not in out.parameters or "Model" in out.parameters  # the parameters text is written


def test_sdxl_two_controlnets_match_diffusers(sdxl, sdxl_ref):
    from diffusers.models.controlnets import MultiControlNetModel

    sd, cn, mid = sdxl
    pipe, cns = sdxl_ref
    pipe.controlnet = MultiControlNetModel(cns)
    try:
        ref = _ref(pipe, "euler_a", prompt="a star", image=[Image.fromarray(_hint()), Image.fromarray(_hint(5))],
                   num_inference_steps=5, guidance_scale=4.0, seed=4, controlnet_conditioning_scale=[0.7, 1.2],
                   control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.8])  # fmt: skip
    finally:
        pipe.controlnet = cns[0]
    units = (ControlUnit(cn, _hint(), scale=0.7), ControlUnit(mid, _hint(5), scale=1.2, start=0.2, end=0.8))
    out = generate(sd, GenerationRequest("a star", "", units, steps=5, cfg_scale=4.0, seed=4, width=SIZE,
                                         height=SIZE, sampler="euler_a"))  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL


def test_sdxl_guess_mode_matches_diffusers_and_soft_injection_follows_a1111(sdxl, sdxl_ref):
    from cldm.models.controlnet import guess_mode_scales, soft_injection_scales

    sd, cn, _ = sdxl
    pipe, cns = sdxl_ref
    pipe.controlnet = cns[0]
    ref = _ref(pipe, "euler_a", prompt="a red circle", image=Image.fromarray(_hint()), num_inference_steps=5,
               guidance_scale=5.0, seed=9, guess_mode=True)  # fmt: skip
    out = generate(sd, GenerationRequest("a red circle", "", (ControlUnit(cn, _hint()),), steps=5, cfg_scale=5.0,
                                         seed=9, width=SIZE, height=SIZE, sampler="euler_a", guess_mode=True,
                                         guess_style="diffusers"))  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    # SDXL's 10 residuals: diffusers spaces 10 scales to 1 at the middle; A1111 keeps the first 10 of its 13
    assert guess_mode_scales(1.0, 10, "diffusers")[-1] == 1.0
    soft = soft_injection_scales(1.0, 10, sdxl=True)
    assert soft == guess_mode_scales(1.0, 13)[:10] and soft[-1] < 0.57
    assert soft_injection_scales(1.0, 13, sdxl=False) == guess_mode_scales(1.0, 13)  # SD1.5: the 13 scales


def test_sdxl_img2img_and_inpaint_match_diffusers(sdxl, sdxl_ref):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline

    sd, cn, _ = sdxl
    pipe, cns = sdxl_ref
    pipe.controlnet = cns[0]
    init = _hint(7)[:, ::-1].copy()
    i2i = StableDiffusionXLControlNetImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    i2i._first_scheduler_config = dict(pipe.scheduler.config)
    ref = _ref(
        i2i,
        "ddim",
        prompt="a cat",
        image=Image.fromarray(init),
        control_image=Image.fromarray(_hint()),
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        seed=5,
        controlnet_conditioning_scale=1.0,
    )  # fmt: skip (the img2img pipeline's default is 0.8)
    out = generate(sd, GenerationRequest("a cat", "", (ControlUnit(cn, _hint()),), steps=10, cfg_scale=5.0, seed=5,
                                         width=SIZE, height=SIZE, init_image=init, strength=0.6, sampler="ddim"))  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL

    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 24:56] = 255
    inp = StableDiffusionXLControlNetInpaintPipeline(**pipe.components)
    inp.set_progress_bar_config(disable=True)
    inp._first_scheduler_config = dict(pipe.scheduler.config)
    # DDIM: diffusers' inpaint pipeline draws a second VAE sample (of the masked picture, which a 4-channel UNet never
    # reads) from the generator after the noise, so an ancestral sampler's noise stream differs from there on
    ref = _ref(inp, "ddim", prompt="a cat", image=Image.fromarray(init), mask_image=Image.fromarray(mask),
               control_image=Image.fromarray(_hint()), strength=0.9, num_inference_steps=10, guidance_scale=5.0,
               seed=6, controlnet_conditioning_scale=1.0)  # fmt: skip
    out = generate(sd, GenerationRequest("a cat", "", (ControlUnit(cn, _hint()),), steps=10, cfg_scale=5.0, seed=6,
                                         width=SIZE, height=SIZE, init_image=init, mask=mask, strength=0.9,
                                         sampler="ddim"))  # fmt: skip
    inside = mask > 0  # outside the mask we put the init picture's own pixels back; diffusers decodes them
    assert _diff(out.images[0][inside], ref[0][inside]) <= PIXEL_TOL
    assert (out.images[0][~inside] == init[~inside]).all()


def test_sdxl_from_the_command_line_matches_diffusers(sdxl_dirs, sdxl_ref, tmp_path, capsys):
    from cldm.__main__ import main

    pipe_dir, cn_dir, _ = sdxl_dirs
    pipe, cns = sdxl_ref
    pipe.controlnet = cns[0]
    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    args = ["generate", "--dtype", "fp32", "--device", "cpu", "--base", str(pipe_dir), "--controlnet", str(cn_dir),
            "--hint", str(tmp_path / "hint.png"), "--prompt", "a red circle", "--steps", "6", "--cfg", "5",
            "--seed", "3", "--sampler", "dpmpp_2m_karras", "--width", str(SIZE), "--height", str(SIZE),
            "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    ref = _ref(pipe, "dpmpp_2m_karras", prompt="a red circle", image=Image.fromarray(_hint()), num_inference_steps=6,
               guidance_scale=5.0, seed=3)  # fmt: skip
    png = Image.open(tmp_path / "out.png")
    assert _diff(np.asarray(png), ref[0]) <= PIXEL_TOL and "Sampler: DPM++ 2M Karras" in png.text["parameters"]
    # without --width/--height the picture takes the family's native size (read from the folder, not loaded)
    from cldm.cli import native_size

    assert native_size(str(pipe_dir)) == 1024


def test_sdxl_batch_row_takes_the_family_s_controlnet(sdxl_dirs, tmp_path, capsys):
    """A batch row naming the condition (`canny`) on an SDXL base runs the SDXL canny ControlNet of the models
    folder, and gives the generate command's picture."""
    from cldm.__main__ import main

    pipe_dir, cn_dir, _ = sdxl_dirs
    models = tmp_path / "models"
    shutil.copytree(cn_dir, models / "controlnet-canny-sdxl-1.0")
    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    (tmp_path / "jobs.csv").write_text(f"hint,prompt,seed,width,height\nhint.png,a red circle,5,{SIZE},{SIZE}\n")
    common = ["--dtype", "fp32", "--device", "cpu", "--base", str(pipe_dir), "--steps", "4", "--cfg", "5"]
    assert main(["batch", *common, "--jobs", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "out"),
                 "--controlnet", "canny", "--models-dir", str(models)]) == 0  # fmt: skip
    assert main(["generate", *common, "--controlnet", str(models / "controlnet-canny-sdxl-1.0"), "--hint",
                 str(tmp_path / "hint.png"), "--prompt", "a red circle", "--seed", "5", "--width", str(SIZE),
                 "--height", str(SIZE), "--out", str(tmp_path / "cli.png")]) == 0  # fmt: skip
    row, cli = Image.open(tmp_path / "out" / "00000.png"), Image.open(tmp_path / "cli.png")
    assert np.array_equal(np.asarray(row), np.asarray(cli)) and "controlnet-canny-sdxl-1.0" in row.info["parameters"]


def test_sdxl_hires_pass_conditions_on_its_own_size(sdxl, monkeypatch):
    """The hires pass runs on SDXL (ControlNet hint fitted again) and its size embeddings are the new size's, as
    A1111 conditions its second pass."""
    from cldm.pipeline import conditioning
    from cldm.pipeline.extras import HiresFix

    sd, cn, _ = sdxl
    sizes = []
    real = conditioning.size_embedding
    monkeypatch.setattr(conditioning, "size_embedding", lambda w, h, *a: sizes.append((w, h)) or real(w, h, *a))
    out = generate(sd, GenerationRequest("a red circle", "", (ControlUnit(cn, _hint()),), steps=3, seed=2, width=SIZE,
                                         height=SIZE, hires=HiresFix(2.0, 2, 0.6, "lanczos")))  # fmt: skip
    assert out.images.shape == (1, 2 * SIZE, 2 * SIZE, 3) and sizes == [(SIZE, SIZE), (2 * SIZE, 2 * SIZE)]
    assert "Hires upscale: 2" in out.parameters


def test_sdxl_single_file_equals_the_folder(sdxl_dirs, sdxl, tmp_path):
    pipe_dir, cn_dir, _ = sdxl_dirs
    sd, cn, _ = sdxl
    path = tmp_path / "sdxl.safetensors"
    tf.sdxl_single_file(pipe_dir, path)
    for tok in ("tokenizer", "tokenizer_2"):  # a tiny vocabulary: its tokenizers beside the file, as the demo's
        shutil.copytree(pipe_dir / tok, tmp_path / tok)
    assert identify.single_file_family(files.read_file(path)) == "SDXL"
    one = checkpoints.load_sd(path, config=sd.config)  # shapes cannot tell head counts: the folder's config says
    for ours, theirs in zip(sd.modules(), one.modules()):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for prefix in ("control_model.", ""):
        f = tmp_path / f"cn{prefix or '_bare'}.safetensors"
        tf.controlnet_single_file(cn_dir, f, prefix=prefix)
        got = checkpoints.load_controlnet(f, base=sd.config.unet).state_dict()
        want = cn.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_sdxl_controlnet_does_not_fit_an_sd15_base(sdxl, ours):
    _, cn, _ = sdxl
    sd15, _ = ours
    with pytest.raises(InputError, match="SDXL"):
        generate(sd15, GenerationRequest("a", "", (ControlUnit(cn, _hint()),), steps=1, width=SIZE, height=SIZE))


# ------------------------------------------------------------------------------------------------------ SD2.x
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sd2_controlnet_matches_diffusers(sd2, sampler):
    ours, cn, ref_pipe, _, _ = sd2
    ref = _ref(ref_pipe, sampler, prompt="a blue square", image=Image.fromarray(_hint(2)), num_inference_steps=6,
               guidance_scale=6.0, seed=8)  # fmt: skip
    out = generate(ours, GenerationRequest("a blue square", "", (ControlUnit(cn, _hint(2)),), steps=6, cfg_scale=6.0,
                                           seed=8, width=SIZE, height=SIZE, sampler=sampler))  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL


@pytest.mark.parametrize("sd2", ["v_prediction"], indirect=True)  # epsilon: the SD1.5 samplers' own sweep
@pytest.mark.parametrize("sampler", MORE_SAMPLERS)
def test_every_sampler_handles_v_prediction(sd2, sampler):
    """Every sampler and schedule on the v model."""
    ours, cn, ref_pipe, _, _ = sd2
    assert ours.config.prediction == "v"
    ref = _ref(ref_pipe, sampler, prompt="a blue square", image=Image.fromarray(_hint(2)), num_inference_steps=6,
               guidance_scale=6.0, seed=8)  # fmt: skip
    out = generate(ours, GenerationRequest("a blue square", "", (ControlUnit(cn, _hint(2)),), steps=6, cfg_scale=6.0,
                                           seed=8, width=SIZE, height=SIZE, sampler=sampler))  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL


def test_sd2_single_file_and_its_prediction(sd2, tmp_path):
    ours, cn, ref_pipe, pipe_dir, cn_dir = sd2
    path = tmp_path / "sd2.safetensors"
    tf.sd2_single_file(pipe_dir, path)
    shutil.copytree(pipe_dir / "tokenizer", tmp_path / "tokenizer")
    state = files.read_file(path)
    assert identify.single_file_family(state) == "SD2.x"
    one = checkpoints.load_sd(path, config=ours.config)
    # OpenCLIP's last layer is dropped: the penultimate layer + final norm is the folder's last layer + final norm
    for a_mod, b_mod in zip(ours.modules(), one.modules()):
        a, b = a_mod.state_dict(), b_mod.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # what it predicts: from A1111's .yaml beside the file when the caller does not say
    v = ours.config.prediction == "v"
    path.with_suffix(".yaml").write_text(f'model:\n  params:\n    parameterization: "{"v" if v else "eps"}"\n')
    from dataclasses import replace

    said = checkpoints.load_sd(path, config=replace(ours.config, prediction="epsilon" if v else "v"))
    assert said.config.prediction == ("v" if v else "epsilon") or said.config.prediction == ours.config.prediction
    for prefix in ("control_model.", ""):
        f = tmp_path / f"cn{prefix or '_bare'}.safetensors"
        tf.controlnet_single_file(cn_dir, f, prefix=prefix)
        got = checkpoints.load_controlnet(f, base=ours.config.unet).state_dict()
        want = cn.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_probe_tells_v_from_epsilon():
    """The probe reads behaviour, not weights: a UNet stand-in that returns its input predicts noise, one that
    returns minus a picture predicts v."""

    class Stub(torch.nn.Module):
        def __init__(self, v: bool):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.v = v
            self.cfg = type("C", (), {"in_channels": 4, "context_dim": 8})()

        def forward(self, x, t, ctx):
            return -2 * torch.ones_like(x) if self.v else x

    assert identify.probe_v_prediction(Stub(True)) and not identify.probe_v_prediction(Stub(False))


def test_bad_prediction_name_is_refused():
    with pytest.raises(CheckpointError, match="prediction"):
        identify.prediction_name("x0")


def test_sdxl_low_vram_moves_both_text_encoders_and_gives_the_same_picture(sdxl_dirs, monkeypatch):
    """Low VRAM covers SDXL's modules: both text encoders are one group, the UNet and its ControlNet another, the VAE
    the last (the compute device is the CPU here: every move goes through `_move`, which is recorded)."""
    from cldm.runtime.manager import ModelManager
    from cldm.runtime.offload import Offloader

    pipe_dir, cn_dir, _ = sdxl_dirs
    seen = []
    original = Offloader._move
    monkeypatch.setattr(Offloader, "_move", lambda self, g, onto: (seen.append((g.name, onto, [type(m).__name__ for m
                                                                                                 in g.modules])),
                                                                   original(self, g, onto))[1])  # fmt: skip
    request = GenerationRequest("a red circle", units=(ControlUnit(str(cn_dir), _hint()),), steps=2, width=SIZE,
                                height=SIZE, seed=1)  # fmt: skip
    plain = ModelManager(str(pipe_dir), device="cpu", dtype="fp32").run(request).images
    low = ModelManager(str(pipe_dir), device="cpu", dtype="fp32")
    low.offloader = Offloader("cpu")
    assert np.array_equal(low.run(request).images, plain)
    assert [(n, onto) for n, onto, _ in seen] == [("text", True), ("text", False), ("unet", True), ("unet", False),
                                                  ("vae", True), ("vae", False)]  # fmt: skip
    assert seen[0][2] == ["TextEncoder", "TextEncoder"] and seen[2][2] == ["UNet", "ControlNet"]
