"""CFG rescale, FreeU and perturbed-attention guidance against diffusers (guidance_rescale, enable_freeu and the
ControlNet PAG pipelines), on tiny random weights at fp32: pictures within 2/255 per pixel. Each extra also has to
change the picture (so a test that compared two plain runs would fail), and with every extra off a request gives the
very bytes it gave before they existed (the plain ControlNet pipeline's picture)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cldm.errors import InputError
from cldm.io import checkpoints
from cldm.models.family import FAMILIES, SD15, SDXL
from cldm.models.freeu import FreeU
from cldm.pipeline.guidance import self_attention_names
from cldm.pipeline.infotext import parameters, parse_parameters
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from tests import tiny_families as tf
from tests.test_pipeline import _hint, _ref

SIZE = 64
PIXEL_TOL = 2  # out of 255, per pixel
CHANGED = 4  # an extra that is on moves some pixel by more than this


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _request(cn, **kw) -> GenerationRequest:
    units = (ControlUnit(cn, _hint(), scale=0.8),) if cn is not None else ()
    base = dict(steps=4, cfg_scale=6.0, seed=3, width=SIZE, height=SIZE)
    return GenerationRequest("a red square", "", units, **(base | kw))


def _ref_kw(**kw) -> dict:
    return dict(prompt="a red square", num_inference_steps=4, guidance_scale=6.0, seed=3) | kw


# ------------------------------------------------------------------------------------------------ CFG rescale
def test_cfg_rescale_matches_diffusers_guidance_rescale(ours, ref_pipe, one_thread):
    """diffusers' ControlNet pipelines take no guidance_rescale: its plain pipeline with the same weights does."""
    from diffusers import StableDiffusionPipeline

    sd, _ = ours
    c = ref_pipe.components
    plain = StableDiffusionPipeline(c["vae"], c["text_encoder"], c["tokenizer"], c["unet"], c["scheduler"],
                                    None, None, requires_safety_checker=False)  # fmt: skip
    plain.set_progress_bar_config(disable=True)
    ref = _ref(plain, "ddim", **_ref_kw(guidance_rescale=0.7))
    out = generate(sd, _request(None, cfg_rescale=0.7)).images
    assert _diff(out[0], ref[0]) <= PIXEL_TOL
    assert _diff(out[0], generate(sd, _request(None)).images[0]) > CHANGED


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pipe_dir = tf.make_sd2_pipeline(tmp_path_factory.mktemp("sd2v"), prediction="v_prediction")
    ref = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return checkpoints.load_sd(pipe_dir), ref


def test_cfg_rescale_acts_on_the_v_prediction_of_a_v_model(sd2_v, one_thread):
    sd, ref_pipe = sd2_v
    assert sd.config.prediction == "v"
    ref = _ref(ref_pipe, "ddim", **_ref_kw(guidance_rescale=0.7))
    assert _diff(generate(sd, _request(None, cfg_rescale=0.7)).images[0], ref[0]) <= PIXEL_TOL


# ------------------------------------------------------------------------------------------------------ FreeU
def test_freeu_matches_diffusers_enable_freeu(ours, ref_pipe, one_thread):
    sd, cn = ours
    f = sd.family.freeu
    assert sd.family is SD15 and f == FreeU(b1=1.5, b2=1.6, s1=0.9, s2=0.2)  # FreeU's README, for SD1.5
    ref_pipe.enable_freeu(s1=f.s1, s2=f.s2, b1=f.b1, b2=f.b2)
    try:
        ref = _ref(ref_pipe, "ddim", **_ref_kw(image=Image.fromarray(_hint()), controlnet_conditioning_scale=0.8))
    finally:
        ref_pipe.disable_freeu()
    out = generate(sd, _request(cn, freeu=f)).images
    assert _diff(out[0], ref[0]) <= PIXEL_TOL
    assert _diff(out[0], generate(sd, _request(cn)).images[0]) > CHANGED


def test_every_family_has_its_published_freeu_factors():
    assert {name: f.freeu for name, f in FAMILIES.items()} == {
        "SD1.5": FreeU(1.5, 1.6, 0.9, 0.2), "SD2.x": FreeU(1.4, 1.6, 0.9, 0.2), "SDXL": FreeU(1.3, 1.4, 0.9, 0.2)}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- PAG
def _pag_pipe(ref_pipe, layers):
    from diffusers import StableDiffusionControlNetPAGPipeline

    c = ref_pipe.components
    pipe = StableDiffusionControlNetPAGPipeline(
        c["vae"], c["text_encoder"], c["tokenizer"], c["unet"], c["controlnet"], c["scheduler"], None, None,
        requires_safety_checker=False, pag_applied_layers=layers,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("ours_layers", "theirs", "extra"),
    [
        (("mid",), ["mid"], {"pag_scale": 25.0}),  # the tiny middle block moves the picture little: a large scale
        (("down.block_1", "up_blocks.1.attentions.0"), ["down_blocks.1", "up_blocks.1.attentions.0"], {}),
        # these two run in the integration tier (the fast tier's 5 minutes): without guidance (cond + pag * (cond -
        # perturbed)), and the adaptive scale (it falls to 0 over the later steps)
        pytest.param(("up",), ["up"], {"cfg_scale": 1.0}, marks=pytest.mark.integration),
        pytest.param(("down",), ["down"], {"pag_adaptive_scale": 0.004}, marks=pytest.mark.integration),
    ],
)
def test_pag_matches_diffusers_controlnet_pag_pipeline(ours, ref_pipe, ours_layers, theirs, extra, one_thread):
    sd, cn = ours
    extra = {"pag_scale": 3.0} | extra
    kw = {"guidance_scale": extra.get("cfg_scale", 6.0), "pag_adaptive_scale": extra.get("pag_adaptive_scale", 0.0)}
    ref = _ref(_pag_pipe(ref_pipe, theirs), "ddim", **_ref_kw(image=Image.fromarray(_hint()), pag_scale=extra["pag_scale"],
                                                              controlnet_conditioning_scale=0.8, **kw))  # fmt: skip
    out = generate(sd, _request(cn, pag_layers=ours_layers, **extra)).images
    assert _diff(out[0], ref[0]) <= PIXEL_TOL
    plain = generate(sd, _request(cn, cfg_scale=extra.get("cfg_scale", 6.0))).images
    assert _diff(out[0], plain[0]) > CHANGED


def test_pag_layers_are_named_as_diffusers_names_them(ours):
    names = list(self_attention_names(ours[0].unet))
    # the tiny UNet: attention at the two upper levels, so up_blocks.0 (the deepest) has none
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in names
    assert "up_blocks.1.attentions.2.transformer_blocks.0.attn1" in names
    assert not any(n.startswith("up_blocks.0") for n in names) and len(names) == 11


def test_pag_in_a_batch_perturbs_each_picture_s_own_rows(ours, one_thread):
    """Guess mode too: the ControlNet's conditional-only residuals reach the perturbed rows as the conditional ones."""
    sd, cn = ours
    kw = dict(pag_scale=3.0, pag_layers=("down",), guess_mode=True)
    pair = generate(sd, _request(cn, batch=2, seed_per_picture=True, **kw)).images
    alone = generate(sd, _request(cn, seed=4, **kw)).images  # picture 1 of the pair has seed 3 + 1
    assert _diff(pair[1], alone[0]) <= PIXEL_TOL
    assert _diff(alone[0], generate(sd, _request(cn, seed=4, guess_mode=True)).images[0]) > CHANGED


def test_pag_with_an_image_prompt_matches_diffusers(ours, ref_pipe, tmp_path, one_thread):
    """The perturbed rows take the conditional image-prompt tokens, as diffusers' [negative, image, image] embeds."""
    import copy

    import torch
    from diffusers import StableDiffusionControlNetPAGPipeline
    from tiny import ENC, adapter_state, nested_adapter, write_image_encoder
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from tests.test_ip_adapter import _ours, _picture

    sd, cn = ours
    path, encoder_dir = tmp_path / "ip-adapter_sd15.bin", write_image_encoder(tmp_path / "image_encoder")
    torch.save(nested_adapter(adapter_state(sd.unet, "plain")), path)
    c = ref_pipe.components
    side = ENC["image_size"]
    pipe = StableDiffusionControlNetPAGPipeline(
        c["vae"], c["text_encoder"], c["tokenizer"], copy.deepcopy(c["unet"]), c["controlnet"], c["scheduler"], None,
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir)), requires_safety_checker=False,
        pag_applied_layers=["down"],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    ref = _ref(pipe, "ddim", **_ref_kw(image=Image.fromarray(_hint()), controlnet_conditioning_scale=0.8, pag_scale=3.0,
                                       ip_adapter_image=Image.fromarray(_picture(1))))  # fmt: skip
    prompt = _ours(path, encoder_dir, [_picture(1)], 0.6)
    out = generate(sd, _request(cn, pag_scale=3.0, pag_layers=("down",), image_prompt=prompt)).images
    assert _diff(out[0], ref[0]) <= PIXEL_TOL


# ------------------------------------------------------------------------------------------------------ SDXL
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return tf.sdxl_with_reference(root, "StableDiffusionXLControlNetPAGPipeline", pag_applied_layers=["mid"])


def test_sdxl_freeu_and_pag_match_diffusers(sdxl, one_thread):
    sd, cn, ref_pipe = sdxl
    f = sd.family.freeu
    assert sd.family is SDXL
    common = _ref_kw(image=Image.fromarray(_hint()), controlnet_conditioning_scale=0.8, num_inference_steps=3)
    ref_pipe.enable_freeu(s1=f.s1, s2=f.s2, b1=f.b1, b2=f.b2)
    try:
        ref = _ref(ref_pipe, "ddim", **common, pag_scale=0.0)
    finally:
        ref_pipe.disable_freeu()
    out = generate(sd, _request(cn, freeu=f, steps=3)).images
    assert _diff(out[0], ref[0]) <= PIXEL_TOL
    plain = generate(sd, _request(cn, steps=3)).images
    assert _diff(out[0], plain[0]) > CHANGED
    ref_pipe.set_pag_applied_layers(["mid", "up_blocks.0"])  # SDXL's deepest decoder level has attention
    ref = _ref(ref_pipe, "ddim", **common, pag_scale=3.0)
    out = generate(sd, _request(cn, pag_scale=3.0, pag_layers=("mid", "up.block_0"), steps=3)).images
    assert _diff(out[0], ref[0]) <= PIXEL_TOL and _diff(out[0], plain[0]) > CHANGED


# ------------------------------------------------------------------------------------------ defaults, refusals
def test_extras_off_give_the_plain_pictures_byte_for_byte(ours, ref_pipe, one_thread):
    sd, cn = ours
    plain = generate(sd, _request(cn)).images
    off = generate(sd, _request(cn, cfg_rescale=0.0, freeu=None, pag_scale=0.0, pag_layers=("down", "up"))).images
    assert np.array_equal(plain, off)
    ref = _ref(ref_pipe, "ddim", **_ref_kw(image=Image.fromarray(_hint()), controlnet_conditioning_scale=0.8))
    assert _diff(plain[0], ref[0]) <= PIXEL_TOL
    r = GenerationRequest("x")
    assert (r.cfg_rescale, r.freeu, r.pag_scale, r.pag_layers, r.pag_adaptive_scale) == (0.0, None, 0.0, ("mid",), 0.0)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"cfg_rescale": 1.5}, "cfg_rescale must be 0..1"),
        ({"cfg_rescale": "a lot"}, "cfg_rescale must be a number"),
        ({"pag_scale": -1.0}, "pag_scale must be 0..100"),
        ({"pag_adaptive_scale": -0.1}, "pag_adaptive_scale must be 0 or more"),
        ({"pag_layers": (), "pag_scale": 3.0}, "pag_layers: give at least one layer"),
        ({"pag_layers": 5}, "pag_layers must be a list"),
        ({"pag_layers": ("mid", "[")}, "pag_layers: '[' is not a valid pattern"),
        ({"freeu": FreeU(1.5, -1.0, 0.9, 0.2)}, "freeu: b2 must be a number 0..10"),
        ({"freeu": (1.5, 1.6, 0.9, 0.2)}, "freeu must be a FreeU"),
    ],
)
def test_bad_guidance_values_are_refused_naming_the_field(fields, named):
    with pytest.raises(InputError, match=named.replace("[", r"\[").replace("(", r"\(")):
        GenerationRequest("x", width=SIZE, height=SIZE, **fields).validate()


def test_pag_layers_that_name_nothing_are_refused_before_sampling(ours):
    sd, cn = ours
    with pytest.raises(InputError, match=r"pag_layers: 'up_blocks.0' names no self-attention layer.*mid_block"):
        generate(sd, _request(cn, pag_scale=3.0, pag_layers=("mid", "up_blocks.0")))
    from cldm.pipeline.request import ReferenceUnit

    with pytest.raises(InputError, match="pag_scale: perturbed-attention guidance does not combine with reference"):
        _request(cn, pag_scale=3.0, reference=ReferenceUnit(_hint())).validate()


# -------------------------------------------------------------------------------------------- text, command line
def test_parameters_text_writes_and_reads_back_the_extras(ours):
    sd, cn = ours
    r = _request(cn, cfg_rescale=0.7, freeu=SD15.freeu, pag_scale=3.0, pag_layers=("mid", "up_blocks.1"),
                 pag_adaptive_scale=0.01)  # fmt: skip
    text = parameters(sd, r)
    assert "Rescale CFG: 0.7" in text and "freeu_enabled: True, freeu_b1: 1.5, freeu_b2: 1.6" in text
    assert 'pag_enabled: True, pag_scale: 3.0, pag_adaptive_scale: 0.01, pag_layers: "mid, up_blocks.1"' in text
    info = parse_parameters(text)
    assert info.guidance == {"eta": 0.0, "cfg_rescale": 0.7, "freeu": SD15.freeu, "pag_scale": 3.0,
                             "pag_layers": ("mid", "up_blocks.1"), "pag_adaptive_scale": 0.01}  # fmt: skip
    assert replace(r, **info.guidance) == r
    plain = parameters(sd, _request(cn))  # off: nothing written, and read back as off
    assert "freeu" not in plain and "pag" not in plain and "Rescale" not in plain
    assert parse_parameters(plain).guidance == {"eta": 0.0, "cfg_rescale": 0.0, "freeu": None, "pag_scale": 0.0,
                                                "pag_layers": ("mid",), "pag_adaptive_scale": 0.0}  # fmt: skip


@pytest.mark.parametrize(("sampler", "key"), [("ddim", "Eta DDIM"), ("tcd", "Eta")])
def test_eta_and_tcd_gamma_are_written_and_read_back(ours, sampler, key):
    sd, cn = ours
    r = _request(cn, sampler=sampler, eta=0.3)
    text = parameters(sd, r)
    assert f"{key}: 0.3" in text
    assert replace(r, **parse_parameters(text).guidance) == r
    assert "Eta" not in parameters(sd, _request(cn, sampler="euler", eta=0.3))  # a sampler that has no eta


def test_command_line_flags_make_the_request_fields(tiny_dirs, tmp_path):
    from cldm import cli

    sd_dir, _ = tiny_dirs
    parser = argparse.ArgumentParser()
    cli.add_generate_args(parser)
    common = ["--base", str(sd_dir), "--prompt", "x", "--width", "64", "--height", "64"]
    r = cli.request_from_args(parser.parse_args(
        [*common, "--cfg-rescale", "0.5", "--freeu", "--pag-scale", "2", "--pag-layers", "mid", "up_blocks.1"]))  # fmt: skip
    assert (r.cfg_rescale, r.freeu, r.pag_scale, r.pag_layers) == (0.5, SD15.freeu, 2.0, ("mid", "up_blocks.1"))
    r = cli.request_from_args(parser.parse_args([*common, "--freeu", "1.1", "1.2", "0.8", "0.3"]))
    assert r.freeu == FreeU(1.1, 1.2, 0.8, 0.3) and r.pag_scale == 0 and r.cfg_rescale == 0
    with pytest.raises(InputError, match="--freeu four numbers"):
        cli.request_from_args(parser.parse_args([*common, "--freeu", "1.1", "1.2"]))
