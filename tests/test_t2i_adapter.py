"""T2I-Adapters against diffusers' adapter pipelines, on tiny random weights in the published layouts: TencentARC's
`.pth` keys for the SD1.5 full and light adapters, diffusers' T2IAdapter folders / files for SDXL's full_adapter_xl.

Bound: pictures within 2/255 per pixel in fp32 (the same operations; a few sums in another order).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.errors import CheckpointError, InputError
from cldm.io import checkpoints, t2i_adapters
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from tests import tiny, tiny_families
from tests.test_pipeline import _ref

SIZE = 64
PIXEL_TOL = 2
SD15_LEVELS = (32, 64, 64)  # tests/tiny.py's UNet widths
SDXL_LEVELS = (32, 64, 128, 128)  # tests/tiny_families.py's SDXL widths, the last one for the middle block

pytestmark = pytest.mark.usefixtures("one_thread")


def _hint(seed=0, grey=False):
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 8 + 8 * seed % 24 : 40] = 255
    img = np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)
    return np.repeat(img[..., :1], 3, axis=2) if grey else img


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def tencent_keys(state: dict, light: bool, blocks: int) -> dict:
    """diffusers' T2IAdapter keys -> TencentARC's (the published .pth layout), by the rule of diffusers' own
    scripts/convert_original_t2i_adapter.py read backwards."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("adapter.")
        m = re.fullmatch(r"body\.(\d+)\.(?:resnets\.(\d+)\.)?(.+)", k)
        if m is None:
            out[k] = v
        elif light:
            out[f"body.{m[1]}.body.{m[2]}.{m[3]}" if m[2] else k] = v
        else:
            out[f"body.{int(m[1]) * blocks + int(m[2] or 0)}.{m[3]}"] = v
    return out


def _diffusers_adapter(seed: int, **kw):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(**kw).eval()


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD1.5 (tests/tiny.py's UNet and text encoder) whose VAE downsamples 8x as the real one, a ControlNet
    for it, and the diffusers adapters with their TencentARC .pth files: full (RGB), full (grey: sketch), light."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny.UNET_KW, "sample_size": 8})
    vae = AutoencoderKL(**tiny_families.VAE_KW)
    tok = tiny.tiny_tokenizer(root / "_tok")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(tiny.text_config(tok)), tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(str(root / "sd"))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tiny_families.HINT_CHANNELS)
    tiny.wake_zero_convs(cn, 5)
    cn.save_pretrained(str(root / "cn"))
    refs = {
        "full": _diffusers_adapter(1, in_channels=3, channels=SD15_LEVELS, num_res_blocks=2, downscale_factor=8),
        "sketch": _diffusers_adapter(2, in_channels=1, channels=SD15_LEVELS, num_res_blocks=2, downscale_factor=8),
        "light": _diffusers_adapter(
            3,
            in_channels=3,
            channels=SD15_LEVELS[:2],
            num_res_blocks=4,
            downscale_factor=8,
            adapter_type="light_adapter",
        ),  # fmt: skip
    }
    files = {}
    for name, ref in refs.items():
        files[name] = root / f"t2iadapter_{name}_sd14v1.pth"
        torch.save(tencent_keys(ref.state_dict(), name == "light", 2), files[name])
    return {"root": root, "sd": checkpoints.load_sd(root / "sd"), "pipe": pipe, "cn": root / "cn",
            "cn_ref": cn.eval(), "refs": refs, "files": files}  # fmt: skip


def _sd15_ref(sd15, adapter):
    from diffusers import StableDiffusionAdapterPipeline

    p = sd15["pipe"]
    pipe = StableDiffusionAdapterPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                          adapter=adapter, scheduler=p.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tencent_files_are_told_apart_and_keep_their_keys(sd15, tmp_path):
    for name, path in sd15["files"].items():
        adapter = t2i_adapters.load_t2i_adapter(path)
        assert t2i_adapters.is_t2i_adapter(path)
        assert adapter.cfg.kind == ("light" if name == "light" else "full") and adapter.cfg.family == "SD1.5"
        assert adapter.cfg.hint_channels == (1 if name == "sketch" else 3)
        assert list(adapter.cfg.channels) == list(SD15_LEVELS) and adapter.cfg.unshuffle == 8
        published = torch.load(path, weights_only=True)
        # the state dict is the published file's, key for key: saving it again gives the same file
        saved = tmp_path / f"{name}.pth"
        torch.save(adapter.state_dict(), saved)
        again = torch.load(saved, weights_only=True)
        assert again.keys() == published.keys()
        assert all(torch.equal(again[k], published[k]) for k in published)
    assert "body.2.in_conv.weight" in published or "body.1.in_conv.weight" in published
    assert not t2i_adapters.is_t2i_adapter(sd15["root"] / "cn")


@pytest.mark.parametrize("name", ["full", "sketch", "light"])
def test_sd15_adapter_picture_matches_diffusers(sd15, name):
    hint = _hint(grey=name == "sketch")
    image = Image.fromarray(hint).convert("L") if name == "sketch" else Image.fromarray(hint)
    ref = _ref(_sd15_ref(sd15, sd15["refs"][name]), "ddim", prompt="a red square", image=image,
               num_inference_steps=4, guidance_scale=5.0, seed=3, adapter_conditioning_scale=0.7)  # fmt: skip
    adapter = t2i_adapters.load_t2i_adapter(sd15["files"][name])
    request = GenerationRequest("a red square", "", (ControlUnit(adapter, hint, scale=0.7),), steps=4, cfg_scale=5.0,
                                seed=3, width=SIZE, height=SIZE, sampler="ddim")  # fmt: skip
    out = generate(sd15["sd"], request).images[0]
    plain = generate(sd15["sd"], GenerationRequest("a red square", steps=4, cfg_scale=5.0, seed=3, width=SIZE,
                                                   height=SIZE, sampler="ddim")).images[0]  # fmt: skip
    assert _diff(out, ref[0]) <= PIXEL_TOL
    assert _diff(out, plain) > 8  # the adapter changed the picture: the comparison is of something


def test_two_adapters_match_diffusers_multi_adapter(sd15):
    hints = [_hint(0), _hint(1)]
    refs = [sd15["refs"]["full"], sd15["refs"]["light"]]
    ref = _ref(_sd15_ref(sd15, refs), "ddim", prompt="a star", image=[Image.fromarray(h) for h in hints],
               num_inference_steps=4, guidance_scale=4.0, seed=5, adapter_conditioning_scale=[0.8, 0.5])  # fmt: skip
    units = tuple(ControlUnit(t2i_adapters.load_t2i_adapter(sd15["files"][n]), h, scale=s)
                  for n, h, s in (("full", hints[0], 0.8), ("light", hints[1], 0.5)))  # fmt: skip
    out = generate(sd15["sd"], GenerationRequest("a star", "", units, steps=4, cfg_scale=4.0, seed=5, width=SIZE,
                                                 height=SIZE, sampler="ddim")).images[0]  # fmt: skip
    assert _diff(out, ref[0]) <= PIXEL_TOL
    swapped = generate(
        sd15["sd"],
        GenerationRequest(
            "a star",
            "",
            (units[0], replace_scale(units[1], 0.0)),
            steps=4,
            cfg_scale=4.0,
            seed=5,
            width=SIZE,
            height=SIZE,
            sampler="ddim",
        ),
    )
    assert _diff(swapped.images[0], out) > 5  # the second adapter counts


def replace_scale(unit: ControlUnit, scale: float) -> ControlUnit:
    from dataclasses import replace

    return replace(unit, scale=scale)


def test_adapter_with_a_controlnet_matches_diffusers(sd15):
    """diffusers has no SD1.5 pipeline for both: its ControlNet pipeline, with the adapter's features passed to its
    UNet as `down_intrablock_additional_residuals` (as its adapter pipelines pass them: both guidance halves)."""
    from diffusers import StableDiffusionControlNetPipeline

    hint_cn, hint_ad = _hint(2), _hint(0)
    ref_adapter = sd15["refs"]["full"]
    with torch.no_grad():
        states = [f * 0.6 for f in ref_adapter(torch.from_numpy(hint_ad).permute(2, 0, 1)[None].float() / 255)]

    def add_states(module, args, kwargs):
        batch = args[0].shape[0]
        kwargs["down_intrablock_additional_residuals"] = [s.expand(batch, -1, -1, -1).clone() for s in states]
        return args, kwargs

    p = sd15["pipe"]
    pipe = StableDiffusionControlNetPipeline(**{**p.components, "controlnet": sd15["cn_ref"]})
    pipe.set_progress_bar_config(disable=True)
    handle = pipe.unet.register_forward_pre_hook(add_states, with_kwargs=True)
    try:
        ref = _ref(pipe, "ddim", prompt="a cat", image=Image.fromarray(hint_cn), num_inference_steps=4,
                   guidance_scale=5.0, seed=7, controlnet_conditioning_scale=0.9)  # fmt: skip
    finally:
        handle.remove()
    units = (ControlUnit(checkpoints.load_controlnet(sd15["cn"]), hint_cn, scale=0.9),
             ControlUnit(t2i_adapters.load_t2i_adapter(sd15["files"]["full"]), hint_ad, scale=0.6))  # fmt: skip
    out = generate(sd15["sd"], GenerationRequest("a cat", "", units, steps=4, cfg_scale=5.0, seed=7, width=SIZE,
                                                 height=SIZE, sampler="ddim")).images[0]  # fmt: skip
    assert _diff(out, ref[0]) <= PIXEL_TOL


# ------------------------------------------------------------------------------------------------------ SDXL
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL (tests/tiny_families.py) and a full_adapter_xl for it, saved by diffusers (a folder) and as a
    bare weights file in diffusers' keys (no config beside it)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("t2i_xl")
    pipe_dir = tiny_families.make_sdxl_pipeline(root)
    ref = _diffusers_adapter(4, in_channels=3, channels=SDXL_LEVELS, num_res_blocks=2, downscale_factor=16,
                             adapter_type="full_adapter_xl")  # fmt: skip
    ref.save_pretrained(str(root / "t2i-adapter-canny-sdxl-1.0"))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(root / "adapter_xl.safetensors"))
    return {"dir": pipe_dir, "sd": checkpoints.load_sd(pipe_dir), "ref": ref, "folder": root / "t2i-adapter-canny-sdxl-1.0",
            "file": root / "adapter_xl.safetensors"}  # fmt: skip


@pytest.mark.parametrize("factor", [1.0, 0.3])
def test_sdxl_adapter_matches_diffusers_with_its_conditioning_factor(sdxl, factor):
    from diffusers import StableDiffusionXLAdapterPipeline

    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(sdxl["dir"], adapter=sdxl["ref"])
    pipe.set_progress_bar_config(disable=True)
    hint = _hint(1)
    ref = _ref(pipe, "euler_a", prompt="a red circle", image=Image.fromarray(hint), num_inference_steps=6,
               guidance_scale=5.0, seed=3, adapter_conditioning_scale=0.8, adapter_conditioning_factor=factor)  # fmt: skip
    pictures = {}
    for source in (sdxl["folder"], sdxl["file"]):
        adapter = t2i_adapters.load_t2i_adapter(source)
        assert adapter.cfg.family == "SDXL" and adapter.cfg.xl and adapter.cfg.unshuffle == 16
        for end in {factor, 1.0, 0.0001}:  # diffusers' factor is the unit's end
            unit = ControlUnit(adapter, hint, scale=0.8, end=end)
            pictures[end] = generate(sdxl["sd"], GenerationRequest("a red circle", "", (unit,), steps=6, cfg_scale=5.0,
                                     seed=3, width=SIZE, height=SIZE, sampler="euler_a")).images[0]  # fmt: skip
        assert _diff(pictures[factor], ref[0]) <= PIXEL_TOL
    assert _diff(pictures[1.0], pictures[0.0001]) > 8  # the adapter acts (on no step at end 0.0001)
    if factor < 1:
        assert _diff(pictures[factor], pictures[1.0]) > 2  # the last steps without it make another picture


def test_an_adapter_of_another_family_is_refused_before_sampling(sd15, sdxl):
    xl = t2i_adapters.load_t2i_adapter(sdxl["folder"])
    sd = t2i_adapters.load_t2i_adapter(sd15["files"]["full"])
    steps = []
    for base, adapter in ((sd15["sd"], xl), (sdxl["sd"], sd)):
        request = GenerationRequest("a cat", units=(ControlUnit(adapter, _hint()),), steps=2, width=SIZE, height=SIZE)
        with pytest.raises(InputError, match="T2I-Adapter for (SDXL|SD1.5) models"):
            generate(base, request, callback=lambda k, n: steps.append(k))
    assert steps == []  # refused before the first step


def test_manager_loads_adapters_by_content_and_refuses_misfits(sd15, sdxl, tmp_path):
    from cldm.runtime.manager import ModelManager

    manager = ModelManager(str(sd15["root"] / "sd"), device="cpu", dtype="fp32")
    named = tmp_path / "control_v11p_sd15_canny.pth"  # the name says ControlNet; the content says adapter
    named.write_bytes(sd15["files"]["full"].read_bytes())
    request = GenerationRequest("a cat", units=(ControlUnit(str(named), _hint(), scale=0.7),), steps=2, width=SIZE,
                                height=SIZE)  # fmt: skip
    result = manager.run(request)
    direct = generate(sd15["sd"], GenerationRequest("a cat", units=(ControlUnit(t2i_adapters.load_t2i_adapter(named),
                      _hint(), scale=0.7),), steps=2, width=SIZE, height=SIZE))  # fmt: skip
    assert _diff(result.images[0], direct.images[0]) == 0
    with pytest.raises(CheckpointError, match="SDXL"):
        manager.controlnet(str(sdxl["folder"]))


def test_cli_takes_an_adapter_file_as_controlnet(sd15, tmp_path):
    from cldm.__main__ import main

    hint = tmp_path / "hint.png"
    Image.fromarray(_hint()).save(hint)
    out = tmp_path / "out.png"
    argv = [
        "generate",
        "--base",
        str(sd15["root"] / "sd"),
        "--controlnet",
        str(sd15["files"]["full"]),
        "--hint",
        str(hint),
        "--prompt",
        "a red square",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        str(out),
    ]
    assert main(argv) in (0, None)
    assert np.asarray(Image.open(out)).shape == (SIZE, SIZE, 3)


def test_style_adapter_loads_with_its_keys_and_is_refused_as_a_control_unit(sd15, tmp_path):
    """TencentARC's StyleAdapter (t2iadapter_style_sd14v1.pth: CLIP ViT-L/14 tokens -> 8 context tokens), tiny."""
    g = torch.Generator().manual_seed(0)
    width, ctx = 64, 32
    state = {"style_embedding": torch.randn(1, 8, width, generator=g), "proj": torch.randn(width, ctx, generator=g),
             "ln_pre.weight": torch.ones(width), "ln_pre.bias": torch.zeros(width),
             "ln_post.weight": torch.ones(width), "ln_post.bias": torch.zeros(width)}  # fmt: skip
    for i in range(3):
        p = f"transformer_layes.{i}"
        state |= {f"{p}.attn.in_proj_weight": torch.randn(3 * width, width, generator=g) * 0.1,
                  f"{p}.attn.in_proj_bias": torch.zeros(3 * width),
                  f"{p}.attn.out_proj.weight": torch.randn(width, width, generator=g) * 0.1,
                  f"{p}.attn.out_proj.bias": torch.zeros(width), f"{p}.ln_1.weight": torch.ones(width),
                  f"{p}.ln_1.bias": torch.zeros(width), f"{p}.ln_2.weight": torch.ones(width),
                  f"{p}.ln_2.bias": torch.zeros(width),
                  f"{p}.mlp.c_fc.weight": torch.randn(4 * width, width, generator=g) * 0.1,
                  f"{p}.mlp.c_fc.bias": torch.zeros(4 * width),
                  f"{p}.mlp.c_proj.weight": torch.randn(width, 4 * width, generator=g) * 0.1,
                  f"{p}.mlp.c_proj.bias": torch.zeros(width)}  # fmt: skip
    path = tmp_path / "t2iadapter_style_sd14v1.pth"
    torch.save(state, path)
    style = t2i_adapters.load_t2i_adapter(path)
    assert style.cfg.kind == "style" and style.state_dict().keys() == state.keys()
    assert style(torch.randn(2, 5, width)).shape == (2, 8, ctx)
    request = GenerationRequest("a cat", units=(ControlUnit(style, _hint()),), steps=2, width=SIZE, height=SIZE)
    with pytest.raises(InputError, match="style adapter"):
        generate(sd15["sd"], request)


def test_files_that_are_no_adapter_are_refused(sd15, tmp_path):
    path = tmp_path / "t2iadapter_canny_sd14v1.pth"  # the name says adapter; the content does not
    torch.save({"conv_in.weight": torch.zeros(320, 190, 3, 3), "body.0.block1.weight": torch.zeros(320, 320, 3, 3)},
               path)  # fmt: skip
    with pytest.raises(CheckpointError, match="no picture unshuffled"):
        t2i_adapters.load_t2i_adapter(path)
    with pytest.raises(CheckpointError, match="not a T2I-Adapter"):
        t2i_adapters.load_t2i_adapter(sd15["root"] / "sd" / "unet" / "diffusion_pytorch_model.safetensors")


def test_an_adapter_region_mask_zeroes_its_features_outside(sd15):
    """The unit's effective region multiplies the adapter's features at every injection level, as ControlNet
    residuals (cldm/pipeline/regions.py): exactly zero under black cells, unchanged under white ones."""
    from dataclasses import replace as dc_replace

    from cldm.pipeline.regions import mask_tensor
    from cldm.pipeline.t2i import encoder_additions, hint_features

    adapter = t2i_adapters.load_t2i_adapter(sd15["files"]["full"])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255  # the left half acts
    unit = ControlUnit(adapter, _hint(0), scale=0.7)
    r = GenerationRequest("a star", "", (unit,), steps=2, width=SIZE, height=SIZE)
    hint = torch.from_numpy(_hint(0)).permute(2, 0, 1)[None].float() / 255
    feats = [hint_features(adapter, hint)]
    plain = encoder_additions(sd15["sd"], r, feats, [True], 2)
    masked_r = dc_replace(r, units=(dc_replace(unit, mask=mask_tensor(mask)),))
    masked = encoder_additions(sd15["sd"], masked_r, feats, [True], 2)
    assert plain.keys() == masked.keys() and len(plain) >= 2
    for block in plain:
        w = plain[block].shape[-1]
        assert torch.count_nonzero(masked[block][..., w // 2 :]) == 0  # outside the region: nothing added
        assert torch.allclose(masked[block][..., : w // 2 - 1], plain[block][..., : w // 2 - 1])
        assert torch.count_nonzero(plain[block][..., w // 2 :]) > 0  # the check could fail
