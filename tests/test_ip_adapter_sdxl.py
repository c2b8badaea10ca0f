"""IP-Adapter on SDXL (plain and plus; the bigG and ViT-H image encoders) against diffusers' IP-Adapter path, on the
tiny SDXL reference (tests/tiny_families.py) with adapter weights in the published key layout for its UNet, laid out
as h94/IP-Adapter publishes them: `sdxl_models/ip-adapter_sdxl.safetensors` with its bigG encoder in
`sdxl_models/image_encoder`, `sdxl_models/ip-adapter*_sdxl_vit-h.safetensors` with the ViT-H encoder in
`models/image_encoder`. diffusers reads them with `load_ip_adapter(folder, subfolder=..., weight_name=...)` as a user
would (its image encoder included); pictures within 2/255.

The tiny SDXL UNet has 28 cross-attention layers (down 2*2 + 2*3, up 3*3 + 3*2, mid 3: the real one's 70 with depths
2 and 10 in place of 2 and 3), an 80-wide text context (the real 2048). The families' refusals are also checked at
the real sizes, on the meta device (shapes only).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny import ENC, adapter_state
from tiny import nested_adapter as _nested

from cldm.errors import InputError
from cldm.io import checkpoints
from cldm.pipeline.request import ControlUnit, GenerationRequest, ImagePrompt
from cldm.pipeline.stages import generate
from tests import tiny_families as tf
from tests.test_pipeline import _ref

SIZE = 64
PIXEL_TOL = 2  # out of 255, per pixel, as the other whole-picture comparisons
ENC_G = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=3, image_size=32,
             patch_size=8, projection_dim=40, hidden_act="gelu")  # a tiny bigG: other widths than ENC (ViT-H)  # fmt: skip
RESAMPLER = 128  # the plus adapters' Resampler width: 2 heads of 64 (the real 1280: 20 heads)
# name -> (kind, encoder folder as published, the encoder's config)
ADAPTERS = {
    "ip-adapter_sdxl": ("plain", "sdxl_models/image_encoder", ENC_G),
    "ip-adapter_sdxl_vit-h": ("plain", "models/image_encoder", ENC),
    "ip-adapter-plus_sdxl_vit-h": ("plus", "models/image_encoder", ENC),
}
INSTANT_STYLE = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}  # diffusers' style+layout


def sdxl_adapter_state(unet, kind: str, enc: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published key layout for this UNet (`ip_adapter.{2i+1}.to_k_ip/to_v_ip` per
    cross-attention layer; plain: 4 tokens from the encoder's image embeds; plus: a depth-4 Resampler of 16 tokens
    over its hidden states)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    layers = unet.cross_attentions()
    ctx = layers[0].to_k.in_features
    state = {}
    for i, attn in enumerate(layers):
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{name}.weight"] = rnd(attn.to_q.out_features, ctx)
    if kind == "plain":
        e = enc["projection_dim"]
        return state | {"image_proj.proj.weight": rnd(4 * ctx, e), "image_proj.proj.bias": rnd(4 * ctx),
                        "image_proj.norm.weight": 1 + rnd(ctx), "image_proj.norm.bias": rnd(ctx)}  # fmt: skip
    h, e = RESAMPLER, enc["hidden_size"]
    state |= {"image_proj.latents": rnd(1, 16, h), "image_proj.proj_in.weight": rnd(h, e),
              "image_proj.proj_in.bias": rnd(h), "image_proj.proj_out.weight": rnd(ctx, h),
              "image_proj.proj_out.bias": rnd(ctx), "image_proj.norm_out.weight": 1 + rnd(ctx),
              "image_proj.norm_out.bias": rnd(ctx)}  # fmt: skip
    for layer in range(4):
        p = f"image_proj.layers.{layer}"
        state |= {f"{p}.0.norm1.weight": 1 + rnd(h), f"{p}.0.norm1.bias": rnd(h), f"{p}.0.norm2.weight": 1 + rnd(h),
                  f"{p}.0.norm2.bias": rnd(h), f"{p}.0.to_q.weight": rnd(h, h), f"{p}.0.to_kv.weight": rnd(2 * h, h),
                  f"{p}.0.to_out.weight": rnd(h, h), f"{p}.1.0.weight": 1 + rnd(h), f"{p}.1.0.bias": rnd(h),
                  f"{p}.1.1.weight": rnd(4 * h, h), f"{p}.1.3.weight": rnd(h, 4 * h)}  # fmt: skip
    return state


def _write_encoder(folder, enc: dict, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**enc)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(SDXL pipeline folder, a folder laid out as h94/IP-Adapter, its SDXL ControlNet folder)."""
    root = tmp_path_factory.mktemp("ip_sdxl")
    pipe_dir = tf.make_sdxl_pipeline(root)
    repo = root / "IP-Adapter"
    _write_encoder(repo / "models" / "image_encoder", ENC, seed=3)
    _write_encoder(repo / "sdxl_models" / "image_encoder", ENC_G, seed=4)
    return pipe_dir, repo, tf.make_sdxl_controlnet(root, pipe_dir, seed=1)


@pytest.fixture(scope="module")
def sdxl(hub):
    pipe_dir, repo, cn_dir = hub
    sd = checkpoints.load_sd(pipe_dir)
    for i, (name, (kind, _, enc)) in enumerate(ADAPTERS.items()):
        save_file(sdxl_adapter_state(sd.unet, kind, enc, seed=10 + i), repo / "sdxl_models" / f"{name}.safetensors")
    return sd, checkpoints.load_controlnet(cn_dir, base=sd.config.unet)


@pytest.fixture(scope="module")
def sdxl_base(hub):
    """diffusers' tiny SDXL pipeline, the parts each test's own pipeline is built from."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(hub[0])


def _diffusers(base, repo, name: str, controlnet=None):
    """A fresh diffusers SDXL pipeline with the adapter `name` loaded from the published layout (its encoder too)."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    parts["unet"] = copy.deepcopy(parts["unet"])  # load_ip_adapter changes the UNet: the shared one stays clean
    if controlnet is None:
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    encoder = ADAPTERS[name][1]
    pipe.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=f"{name}.safetensors",
                         image_encoder_folder="image_encoder" if encoder.startswith("sdxl_models") else encoder)  # fmt: skip
    return pipe


def _ours(repo, name: str, images, scale) -> ImagePrompt:
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.io.image_encoder import load_image_encoder

    adapter = load_ip_adapter(repo / "sdxl_models" / f"{name}.safetensors")
    return ImagePrompt(adapter, tuple(images), load_image_encoder(repo / ADAPTERS[name][1]), scale)


def _picture(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    img[10:30, 8:30] = (220, 40, 40)
    return img


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize(
    "name, sampler", [("ip-adapter_sdxl", "ddim"), ("ip-adapter_sdxl_vit-h", "euler"), ("ip-adapter-plus_sdxl_vit-h", "ddim")]
)  # fmt: skip
def test_sdxl_adapters_match_diffusers(sdxl, sdxl_base, hub, name, sampler):
    sd, _ = sdxl
    repo = hub[1]
    pipe = _diffusers(sdxl_base, repo, name)
    prompt = _ours(repo, name, [_picture()], 0.8)
    cfg = prompt.adapter.cfg
    assert len(cfg.layer_dims) == len(sd.unet.cross_attentions()) == 28 and cfg.context_dim == 80
    assert (cfg.tokens, cfg.heads) == ((16, 2) if cfg.kind == "plus" else (4, 0))
    # the projection: our tokens against diffusers' image projection of the same features
    enc = prompt.encoder
    feats = enc.hidden(enc.pixels([_picture()])) if cfg.kind == "plus" else enc.embeds(enc.pixels([_picture()]))
    ref_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](feats)
    assert torch.allclose(prompt.adapter.tokens(feats), ref_tokens, atol=1e-5)
    kw = dict(steps=4, cfg_scale=5.0, seed=7, width=SIZE, height=SIZE, sampler=sampler)
    for scale in (0.8, INSTANT_STYLE) if name == "ip-adapter_sdxl_vit-h" else (0.8,):
        pipe.set_ip_adapter_scale(scale)
        ref = _ref(pipe, sampler, prompt="a cat", ip_adapter_image=Image.fromarray(_picture()), num_inference_steps=4,
                   guidance_scale=5.0, seed=7)  # fmt: skip
        ours = generate(sd, GenerationRequest("a cat", image_prompt=_ours(repo, name, [_picture()], scale), **kw))
        assert _diff(ours.images[0], ref[0]) <= PIXEL_TOL, scale
    plain = generate(sd, GenerationRequest("a cat", **kw))
    assert _diff(plain.images[0], ours.images[0]) > 10  # the image prompt does something
    assert "IP-Adapter:" in ours.parameters


def test_sdxl_plus_with_a_controlnet_matches_diffusers(sdxl, sdxl_base, hub):
    from diffusers import ControlNetModel

    sd, cn = sdxl
    name, repo = "ip-adapter-plus_sdxl_vit-h", hub[1]
    pipe = _diffusers(sdxl_base, repo, name, controlnet=ControlNetModel.from_pretrained(str(hub[2])))
    pipe.set_ip_adapter_scale(0.6)
    hint = np.zeros((SIZE, SIZE, 3), np.uint8)
    hint[16:48, 16:48] = 255
    ref = _ref(pipe, "euler", prompt="a dog", image=Image.fromarray(hint), ip_adapter_image=Image.fromarray(_picture(1)),
               num_inference_steps=3, guidance_scale=6.0, seed=2)  # fmt: skip
    request = GenerationRequest("a dog", units=[ControlUnit(cn, hint)], steps=3, cfg_scale=6.0, seed=2, width=SIZE,
                                height=SIZE, sampler="euler", image_prompt=_ours(repo, name, [_picture(1)], 0.6))  # fmt: skip
    assert _diff(generate(sd, request).images[0], ref[0]) <= PIXEL_TOL


def test_the_command_line_runs_the_bigg_adapter_from_the_published_layout(sdxl, sdxl_base, hub, tmp_path):
    from cldm.__main__ import main

    pipe_dir, repo, _ = hub
    name = "ip-adapter_sdxl"
    pipe = _diffusers(sdxl_base, repo, name)
    pipe.set_ip_adapter_scale(0.7)
    ref = _ref(pipe, "euler", prompt="a cat", ip_adapter_image=Image.fromarray(_picture(2)), num_inference_steps=3,
               guidance_scale=5.0, seed=5)  # fmt: skip
    Image.fromarray(_picture(2)).save(tmp_path / "ip.png")
    args = ["generate", "--dtype", "fp32", "--device", "cpu", "--base", str(pipe_dir), "--prompt", "a cat", "--steps", "3",
            "--cfg", "5", "--seed", "5", "--sampler", "euler", "--width", str(SIZE), "--height", str(SIZE),
            "--ip-adapter", str(repo / "sdxl_models" / f"{name}.safetensors"),
            "--image-encoder", str(repo / "sdxl_models" / "image_encoder"), "--ip-image", str(tmp_path / "ip.png"),
            "--ip-scale", "0.7", "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    assert _diff(np.asarray(Image.open(tmp_path / "out.png")), ref[0]) <= PIXEL_TOL


def test_published_layouts_load_alike(sdxl, hub, tmp_path):
    from cldm.adapters.ip_adapter import load_ip_adapter

    sd, _ = sdxl
    state = sdxl_adapter_state(sd.unet, "plus", ENC, seed=12)
    torch.save(_nested(state), tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")  # the .bin layout: nested
    a = load_ip_adapter(tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")
    b = load_ip_adapter(hub[1] / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    assert a.cfg == b.cfg and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------------------ refusals
def _refused(sd, prompt, *must):
    steps = []
    with pytest.raises(InputError) as e:
        generate(sd, GenerationRequest("a", image_prompt=prompt, steps=2, width=SIZE, height=SIZE),
                 callback=lambda i, n: steps.append(i))  # fmt: skip
    assert steps == []  # before sampling
    for text in must:
        assert text in str(e.value), (text, str(e.value))
    return str(e.value)


def test_an_sd15_adapter_on_sdxl_and_an_sdxl_adapter_on_sd15_are_refused_before_sampling(sdxl, ours, hub, tmp_path):
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.io.image_encoder import load_image_encoder

    sd, _ = sdxl
    repo = hub[1]
    vit_h = load_image_encoder(repo / "models" / "image_encoder")  # the tiny ENC: what the SD1.5 adapters take
    save_file(adapter_state(ours[0].unet, "plain"), tmp_path / "ip-adapter_sd15.safetensors")
    sd15_adapter = load_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors")
    _refused(sd, ImagePrompt(sd15_adapter, (_picture(),), vit_h, name="ip-adapter_sd15"), "ip-adapter_sd15",
             "made for SD1.5 (11 cross-attention layers, 32-wide", "base model is SDXL (28 cross-attention layers, 80-wide",
             "Use an IP-Adapter made for SDXL (ip-adapter_sdxl, ")  # fmt: skip
    sdxl_prompt = _ours(repo, "ip-adapter_sdxl_vit-h", [_picture()], 1.0)
    _refused(ours[0], sdxl_prompt, "made for SDXL (28 cross-attention layers, 80-wide",
             "base model is SD1.5 (11 cross-attention layers, 32-wide", "made for SD1.5 (ip-adapter_sd15, ")  # fmt: skip


def test_an_image_encoder_that_does_not_fit_the_adapter_is_refused(sdxl, hub):
    from cldm.io.image_encoder import load_image_encoder

    sd, _ = sdxl
    repo = hub[1]
    big_g, vit_h = (load_image_encoder(repo / f) for f in ("sdxl_models/image_encoder", "models/image_encoder"))
    plain_g = _ours(repo, "ip-adapter_sdxl", [_picture()], 1.0)
    _refused(sd, ImagePrompt(plain_g.adapter, plain_g.images, vit_h, name="ip-adapter_sdxl"),
             "gives 24-wide image embeds but the IP-Adapter ip-adapter_sdxl takes 40-wide ones")  # fmt: skip
    plus = _ours(repo, "ip-adapter-plus_sdxl_vit-h", [_picture()], 1.0)
    _refused(sd, ImagePrompt(plus.adapter, plus.images, big_g, name="plus"),
             "gives 48-wide hidden states but the IP-Adapter plus takes 32-wide ones")  # fmt: skip


def test_per_block_scales_follow_the_base_layout(sdxl, hub):
    from cldm.adapters.ip_scales import layer_scales, scale_layout

    sd, _ = sdxl
    layout = scale_layout(sd.unet.cfg)
    assert len(layout) == len(sd.unet.cross_attentions()) == 28
    s = layer_scales(INSTANT_STYLE, layout)  # down: 2*2, 2*3; up: 3*3, 3*2; mid: 3
    assert s == [0] * 4 + [0] * 3 + [1.0] * 3 + [0] * 3 + [1.0] * 3 + [0] * 3 + [0] * 6 + [0] * 3
    assert layer_scales({"mid": 0.5, "up": 1.0}, layout) == [0] * 10 + [1.0] * 15 + [0.5] * 3
    assert ImagePrompt("x", (_picture(),), "enc", INSTANT_STYLE).problems() == []  # not judged by SD1.5's layout
    prompt = _ours(hub[1], "ip-adapter_sdxl_vit-h", [_picture()], {"down": {"block_0": 1.0}})
    _refused(sd, prompt, "down has no cross-attention in block_0 (this base model: block_1, block_2)")
    prompt = _ours(hub[1], "ip-adapter_sdxl_vit-h", [_picture()], {"up": {"block_1": [1.0, 0.0]}})
    _refused(sd, prompt, "up.block_1 has 3 attention blocks, got 2 scales")


# ---------------------------------------------------------------------------------- the real sizes (meta)
SDXL_UNET = dict(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                 transformer_depth=(0, 2, 10), context_dim=2048, use_linear_in_transformer=True, head_channels=64,
                 adm_in_channels=2816)  # fmt: skip


def _meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _published_shapes(unet, kind: str, image_dim: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the published files for this (real-size) UNet: plain 4 tokens; plus a 1280-wide Resampler
    (20 heads of 64, depth 4, 16 tokens)."""
    layers = unet.cross_attentions()
    ctx = layers[0].to_k.in_features
    out = {f"ip_adapter.{2 * i + 1}.{n}.weight": (a.to_q.out_features, ctx) for i, a in enumerate(layers)
           for n in ("to_k_ip", "to_v_ip")}  # fmt: skip
    if kind == "plain":
        return out | {"image_proj.proj.weight": (4 * ctx, image_dim), "image_proj.proj.bias": (4 * ctx,),
                      "image_proj.norm.weight": (ctx,), "image_proj.norm.bias": (ctx,)}  # fmt: skip
    h = 1280
    out |= {"image_proj.latents": (1, 16, h), "image_proj.proj_in.weight": (h, image_dim), "image_proj.proj_in.bias": (h,),
            "image_proj.proj_out.weight": (ctx, h), "image_proj.proj_out.bias": (ctx,),
            "image_proj.norm_out.weight": (ctx,), "image_proj.norm_out.bias": (ctx,)}  # fmt: skip
    for i in range(4):
        p = f"image_proj.layers.{i}"
        out |= {f"{p}.0.norm1.weight": (h,), f"{p}.0.norm1.bias": (h,), f"{p}.0.norm2.weight": (h,),
                f"{p}.0.norm2.bias": (h,), f"{p}.0.to_q.weight": (h, h), f"{p}.0.to_kv.weight": (2 * h, h),
                f"{p}.0.to_out.weight": (h, h), f"{p}.1.0.weight": (h,), f"{p}.1.0.bias": (h,),
                f"{p}.1.1.weight": (4 * h, h), f"{p}.1.3.weight": (h, 4 * h)}  # fmt: skip
    return out


def test_real_sizes_are_read_and_the_families_and_encoders_named():
    from transformers import CLIPVisionConfig

    from cldm.adapters.ip_adapter import IPAdapter, config_from_state, image_prompt_problem
    from cldm.adapters.ip_scales import layer_scales, scale_layout
    from cldm.models.config import UNetConfig
    from cldm.models.image_encoder import ImageEncoder
    from cldm.models.unet import UNet

    with torch.device("meta"):
        xl, sd15 = UNet(UNetConfig(**SDXL_UNET)), UNet(UNetConfig())
        vit_h, big_g = (ImageEncoder(CLIPVisionConfig(hidden_size=h, projection_dim=p, num_hidden_layers=1,
                                                      num_attention_heads=16, intermediate_size=64, patch_size=14))
                        for h, p in ((1280, 1024), (1664, 1280)))  # fmt: skip
    assert len(xl.cross_attentions()) == len(scale_layout(xl.cfg)) == 70 and len(scale_layout(sd15.cfg)) == 16
    assert layer_scales(INSTANT_STYLE, scale_layout(xl.cfg)) == [0] * 4 + [0] * 10 + [1.0] * 10 + [0] * 10 + \
        [1.0] * 10 + [0] * 10 + [0] * 6 + [0] * 10  # fmt: skip
    cfgs = {
        "ip-adapter_sdxl": config_from_state(_meta_state(_published_shapes(xl, "plain", 1280)), "x"),
        "ip-adapter_sdxl_vit-h": config_from_state(_meta_state(_published_shapes(xl, "plain", 1024)), "x"),
        "ip-adapter-plus_sdxl_vit-h": config_from_state(_meta_state(_published_shapes(xl, "plus", 1280)), "x"),
        "ip-adapter_sd15": config_from_state(_meta_state(_published_shapes(sd15, "plain", 1024)), "x"),
    }
    plus = cfgs["ip-adapter-plus_sdxl_vit-h"]
    assert (plus.tokens, plus.hidden_dim, plus.heads, plus.depth, plus.ff_mult) == (16, 1280, 20, 4, 4)
    assert plus.context_dim == 2048 and plus.image_dim == 1280
    assert len(cfgs["ip-adapter_sdxl"].layer_dims) == 70 and cfgs["ip-adapter_sdxl"].tokens == 4
    with torch.device("meta"):
        adapters = {k: IPAdapter(c) for k, c in cfgs.items()}

    def problem(name, encoder, unet):
        return image_prompt_problem(ImagePrompt(adapters[name], (_picture(),), encoder, 1.0, name=name), unet)

    assert problem("ip-adapter_sdxl", big_g, xl) is None and problem("ip-adapter-plus_sdxl_vit-h", vit_h, xl) is None
    assert problem("ip-adapter_sdxl_vit-h", vit_h, xl) is None and problem("ip-adapter_sd15", vit_h, sd15) is None
    assert "(OpenCLIP ViT-H/14) gives 1024-wide image embeds but the IP-Adapter ip-adapter_sdxl takes 1280-wide ones: " \
           "use OpenCLIP ViT-bigG/14, `sdxl_models/image_encoder`" in problem("ip-adapter_sdxl", vit_h, xl)  # fmt: skip
    assert "(OpenCLIP ViT-bigG/14) gives 1664-wide hidden states" in problem("ip-adapter-plus_sdxl_vit-h", big_g, xl)
    assert "use OpenCLIP ViT-H/14, `models/image_encoder`" in problem("ip-adapter_sdxl_vit-h", big_g, xl)
    why = problem("ip-adapter_sd15", vit_h, xl)
    assert "made for SD1.5 (16 cross-attention layers, 768-wide text context) and the base model is SDXL (70 " \
           "cross-attention layers, 2048-wide text context)" in why  # fmt: skip
    why = problem("ip-adapter-plus_sdxl_vit-h", vit_h, sd15)
    assert "made for SDXL (70 cross-attention layers, 2048-wide" in why and "base model is SD1.5 (16" in why
