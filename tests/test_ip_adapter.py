"""IP-Adapter (plain and plus) against diffusers' IP-Adapter path, on tiny random weights in the published layout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import ENC, adapter_state
from tiny import nested_adapter as _nested

from cldm.errors import CheckpointError, InputError
from cldm.pipeline.request import ControlUnit, GenerationRequest, ImagePrompt
from cldm.pipeline.stages import generate

SIZE = 64
PIXEL_TOL = 2  # out of 255, per pixel, as the other whole-picture comparisons


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tiny import write_image_encoder

    return write_image_encoder(tmp_path_factory.mktemp("image_encoder"))


@pytest.fixture(scope="module", params=["plain", "plus"])
def adapter_file(request, ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ip_{request.param}")
    path = folder / f"ip-adapter-{request.param}_sd15.bin"
    torch.save(_nested(adapter_state(ours[0].unet, request.param)), path)
    return request.param, path


def _picture(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    img[10:30, 8:30] = (220, 40, 40)
    return img


def _diffusers(ref_pipe, adapter_path, encoder_dir, controlnet=None):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    parts = {
        k: v for k, v in ref_pipe.components.items() if k not in ("controlnet", "image_encoder", "feature_extractor")
    }
    parts["unet"] = copy.deepcopy(parts["unet"])  # load_ip_adapter changes the UNet: the shared reference stays clean
    size = {"shortest_edge": ENC["image_size"]}
    extractor = CLIPImageProcessor(size=size, crop_size={"height": ENC["image_size"], "width": ENC["image_size"]})
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir))
    if controlnet is None:
        pipe = StableDiffusionPipeline(**parts, image_encoder=encoder, feature_extractor=extractor)
    else:
        pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, image_encoder=encoder,
                                                 feature_extractor=extractor)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(adapter_path.parent), subfolder="", weight_name=adapter_path.name, image_encoder_folder=None
    )
    return pipe


def _ours(adapter_path, encoder_dir, images, scale):
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.io.image_encoder import load_image_encoder

    return ImagePrompt(load_ip_adapter(adapter_path), tuple(images), load_image_encoder(encoder_dir), scale)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_projection_and_pictures_match_diffusers(adapter_file, ours, ref_pipe, encoder_dir, tiny_dirs, tmp_path):
    kind, path = adapter_file
    sd, cn = ours
    pipe = _diffusers(ref_pipe, path, encoder_dir)
    pipe.set_ip_adapter_scale(0.8)
    prompt = _ours(path, encoder_dir, [_picture()], 0.8)
    # the projection: our tokens against diffusers' image projection of the same features
    feats = prompt.encoder.hidden(prompt.encoder.pixels([_picture()])) if kind == "plus" else \
        prompt.encoder.embeds(prompt.encoder.pixels([_picture()]))  # fmt: skip
    ref_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](feats)
    assert torch.allclose(prompt.adapter.tokens(feats), ref_tokens, atol=1e-5)
    out = pipe("a cat", ip_adapter_image=Image.fromarray(_picture()), num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator("cpu").manual_seed(7), output_type="np", width=SIZE, height=SIZE)  # fmt: skip
    ref = (out.images * 255).round().astype(np.uint8)
    ours_ = generate(sd, GenerationRequest("a cat", steps=4, cfg_scale=5.0, seed=7, width=SIZE, height=SIZE,
                                           image_prompt=prompt))  # fmt: skip
    assert _diff(ours_.images[0], ref[0]) <= PIXEL_TOL
    from cldm.__main__ import main  # and the same through the command line

    Image.fromarray(_picture()).save(tmp_path / "ip.png")
    args = ["generate", "--dtype", "fp32", "--base", str(tiny_dirs[0]), "--prompt", "a cat", "--steps", "4", "--cfg", "5", "--seed", "7",
            "--width", str(SIZE), "--height", str(SIZE), "--ip-adapter", str(path), "--image-encoder", str(encoder_dir),
            "--ip-image", str(tmp_path / "ip.png"), "--ip-scale", "0.8", "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    assert _diff(np.asarray(Image.open(tmp_path / "out.png")), ref[0]) <= PIXEL_TOL
    plain = generate(sd, GenerationRequest("a cat", steps=4, cfg_scale=5.0, seed=7, width=SIZE, height=SIZE))
    assert _diff(plain.images[0], ours_.images[0]) > 10  # the image prompt does something
    assert "IP-Adapter:" in ours_.parameters


def test_with_a_controlnet_matches_diffusers(adapter_file, ours, ref_pipe, encoder_dir, tiny_dirs, tmp_path):
    from diffusers import ControlNetModel

    kind, path = adapter_file
    sd, cn = ours
    pipe = _diffusers(ref_pipe, path, encoder_dir, controlnet=ControlNetModel.from_pretrained(str(tiny_dirs[1])))
    pipe.set_ip_adapter_scale(0.6)
    hint = np.zeros((SIZE, SIZE, 3), np.uint8)
    hint[16:48, 16:48] = 255
    out = pipe("a dog", image=Image.fromarray(hint), ip_adapter_image=Image.fromarray(_picture(1)),
               num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(2),
               output_type="np", width=SIZE, height=SIZE)  # fmt: skip
    ref = (out.images * 255).round().astype(np.uint8)
    request = GenerationRequest("a dog", units=[ControlUnit(cn, hint)], steps=3, cfg_scale=6.0, seed=2, width=SIZE,
                                height=SIZE, image_prompt=_ours(path, encoder_dir, [_picture(1)], 0.6))  # fmt: skip
    assert _diff(generate(sd, request).images[0], ref[0]) <= PIXEL_TOL
    from cldm.__main__ import main

    Image.fromarray(hint).save(tmp_path / "hint.png")
    Image.fromarray(_picture(1)).save(tmp_path / "ip.png")
    args = ["generate", "--dtype", "fp32", "--base", str(tiny_dirs[0]), "--controlnet", str(tiny_dirs[1]), "--hint", str(tmp_path / "hint.png"),
            "--prompt", "a dog", "--steps", "3", "--cfg", "6", "--seed", "2", "--width", str(SIZE), "--height", str(SIZE),
            "--ip-adapter", str(path), "--image-encoder", str(encoder_dir), "--ip-image", str(tmp_path / "ip.png"),
            "--ip-scale", "0.6", "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    assert _diff(np.asarray(Image.open(tmp_path / "out.png")), ref[0]) <= PIXEL_TOL


def test_the_manager_adds_and_drops_an_adapter_without_touching_the_base(adapter_file, tiny_dirs, encoder_dir):
    from cldm.runtime.manager import ModelManager

    _, path = adapter_file
    m = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    kw = dict(steps=2, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE)
    before = m.run(GenerationRequest("a cat", **kw)).images
    with_ip = m.run(
        GenerationRequest("a cat", image_prompt=ImagePrompt(str(path), (_picture(),), str(encoder_dir)), **kw)
    )
    assert not np.array_equal(before, with_ip.images) and "IP-Adapter" in with_ip.parameters
    again = m.run(
        GenerationRequest("a cat", image_prompt=ImagePrompt(str(path), (_picture(),), str(encoder_dir)), **kw)
    )
    assert np.array_equal(with_ip.images, again.images) and m.ip_loads == 1  # kept, not loaded again
    m.drop_image_prompt()
    assert np.array_equal(m.run(GenerationRequest("a cat", **kw)).images, before) and m.base_loads == 1


def test_an_adapter_for_another_family_is_refused_before_sampling(ours, tmp_path, tiny_dirs, encoder_dir):
    from cldm.runtime.manager import ModelManager

    state = {k: v for k, v in adapter_state(ours[0].unet, "plain").items() if k.startswith("ip_adapter.")}
    ctx = 64  # an adapter made for a text context twice as wide (SD2's is 1024 to SD1.5's 768)
    state = {k: torch.zeros(v.shape[0], ctx) for k, v in state.items()}
    state |= {"image_proj.proj.weight": torch.zeros(4 * ctx, ENC["projection_dim"]), "image_proj.proj.bias": torch.zeros(4 * ctx),
              "image_proj.norm.weight": torch.ones(ctx), "image_proj.norm.bias": torch.zeros(ctx)}  # fmt: skip
    torch.save(_nested(state), tmp_path / "sd2-ish.bin")
    m = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    steps = []
    with pytest.raises(CheckpointError, match="sd2-ish.bin does not fit the base model.*text context"):
        m.run(GenerationRequest("a", image_prompt=ImagePrompt(str(tmp_path / "sd2-ish.bin"), (_picture(),), str(encoder_dir)),
                                steps=2, width=SIZE, height=SIZE), callback=lambda i, n: steps.append(i))  # fmt: skip
    assert steps == [] and m.ip_loads == 0  # refused, so not kept


def test_scale_zero_is_the_plain_picture_and_the_base_is_untouched(adapter_file, ours, encoder_dir):
    _, path = adapter_file
    sd, _ = ours
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    kw = dict(steps=2, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE)
    plain = generate(sd, GenerationRequest("a cat", **kw)).images
    zero = generate(sd, GenerationRequest("a cat", image_prompt=_ours(path, encoder_dir, [_picture()], 0.0), **kw))
    assert np.array_equal(plain, zero.images)
    after = sd.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _plain_unet(unet) -> bool:
    """Every attention layer computes with the plain processor and no block carries a hook."""
    from cldm.models.attention import sdpa_attention

    layers = [*unet.cross_attentions(), *unet.self_attentions()]
    return all(a.processor is sdpa_attention for a in layers) and not any(m._forward_hooks for m in unet.modules())


def test_adapters_attach_for_one_request_and_leave_the_unet_plain(adapter_file, ours, encoder_dir, monkeypatch):
    """The image prompt and the reference act through processors and hooks set for the request only: afterwards
    (and after a request that fails halfway) the UNet is the plain model again."""
    from cldm.pipeline import stages
    from cldm.pipeline.request import ReferenceUnit

    _, path = adapter_file
    sd, _ = ours
    seen = []
    real = sd.unet.forward

    def spy(*args, **kwargs):
        seen.append({type(a.processor).__name__ for a in sd.unet.cross_attentions()})
        return real(*args, **kwargs)

    r = GenerationRequest("a cat", steps=2, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE,
                          image_prompt=_ours(path, encoder_dir, [_picture()], 0.7),
                          reference=ReferenceUnit(_picture(1), mode="adain+attn"))  # fmt: skip
    monkeypatch.setattr(sd.unet, "forward", spy)
    generate(sd, r)
    assert seen and all(names == {"ImagePromptAttention"} for names in seen)
    assert _plain_unet(sd.unet)
    monkeypatch.setattr(stages, "preview_rgb", lambda *a: 1 / 0)  # the preview fails after the first step
    with pytest.raises(ZeroDivisionError):
        generate(sd, r, preview=lambda p: None, preview_every=1)
    assert _plain_unet(sd.unet)


def test_per_block_scales_follow_diffusers_layout():
    from cldm.adapters.ip_scales import layer_scales

    s = layer_scales({"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}})
    assert s == [0, 0, 0, 0, 0, 1.0] + [0, 1.0, 0] + [0] * 6 + [0]
    assert layer_scales(0.5) == [0.5] * 16
    assert layer_scales({"mid": 2.0, "down": 1.0}) == [1.0] * 6 + [0.0] * 9 + [2.0]
    with pytest.raises(InputError, match="block_0"):
        layer_scales({"up": {"block_0": 1.0}})  # SD1.5's first up block has no attention


def test_several_pictures_average_their_embeddings(adapter_file, ours, encoder_dir):
    from cldm.adapters.ip_adapter import prompt_tokens

    _, path = adapter_file
    a, b = _picture(0), _picture(5)
    both = prompt_tokens(_ours(path, encoder_dir, [a, b], 1.0), batch=1, guidance=False)
    one = prompt_tokens(_ours(path, encoder_dir, [a], 1.0), batch=1, guidance=False)
    assert both.shape == one.shape and not torch.allclose(both, one)


def test_published_layouts_load_and_wrong_files_are_named(ours, tmp_path, tiny_dirs):
    from safetensors.torch import save_file

    from cldm.adapters.ip_adapter import load_ip_adapter

    state = adapter_state(ours[0].unet, "plain")
    save_file(state, tmp_path / "ip-adapter_sd15.safetensors")  # flat keys
    torch.save(_nested(state), tmp_path / "ip-adapter_sd15.bin")  # nested, as published
    a, b = load_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors"), load_ip_adapter(tmp_path / "ip-adapter_sd15.bin")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.cfg.tokens == 4 and a.cfg.kind == "plain"
    with pytest.raises(CheckpointError, match="not an IP-Adapter"):
        load_ip_adapter(tiny_dirs[1] / "diffusion_pytorch_model.safetensors")
    broken = dict(state)
    broken.pop("image_proj.norm.bias")
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_ip_adapter(tmp_path / "broken.safetensors")
