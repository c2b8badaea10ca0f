"""The T2I style adapter (TencentARC t2iadapter_style_sd14v1.pth) end to end, on tiny random weights in the published
layouts: the StyleAdapter's .pth keys and a CLIP folder as openai/clip-vit-large-patch14 publishes it (a whole
CLIPModel, config.json with its vision_config, text half included).

The reference is the original's rule written here, independently of cldm: transformers' CLIPImageProcessor and CLIP
vision model give last_hidden_state, the StyleAdapter's forward is spelled out from the file's tensors, and the tokens
times the scale are appended to diffusers' conditional prompt embeddings, the negative ones padded with their own last
tokens (ldm/models/diffusion/ddim.py, `append_to_context`). Bound: pictures within 2/255 per pixel in fp32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cldm.errors import CheckpointError, InputError, MissingWeightsError
from cldm.io import checkpoints, clip_vision, locate, t2i_adapters
from cldm.models.t2i_adapter import StyleControl
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from tests import tiny, tiny_families
from tests.test_pipeline import _ref

SIZE = 64
PIXEL_TOL = 2
WIDTH, CONTEXT, TOKENS, HEADS, LAYERS = 32, 32, 8, 8, 3  # the published file: 1024, 768, 8, 8 heads, 3 layers
VISION = dict(hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
              patch_size=14, hidden_act="quick_gelu")  # ViT-L/14's geometry (257 tokens), a tiny width  # fmt: skip
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

pytestmark = pytest.mark.usefixtures("one_thread")


def style_state(seed: int) -> dict[str, torch.Tensor]:
    """Random StyleAdapter weights under the published file's keys (`transformer_layes` as spelled there)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    w = WIDTH
    state = {"style_embedding": rnd(1, TOKENS, w, s=1.0), "proj": rnd(w, CONTEXT, s=0.5),
             "ln_pre.weight": 1 + rnd(w), "ln_pre.bias": rnd(w), "ln_post.weight": 1 + rnd(w), "ln_post.bias": rnd(w)}  # fmt: skip
    for i in range(LAYERS):
        p = f"transformer_layes.{i}"
        state |= {f"{p}.attn.in_proj_weight": rnd(3 * w, w), f"{p}.attn.in_proj_bias": rnd(3 * w),
                  f"{p}.attn.out_proj.weight": rnd(w, w), f"{p}.attn.out_proj.bias": rnd(w),
                  f"{p}.ln_1.weight": 1 + rnd(w), f"{p}.ln_1.bias": rnd(w), f"{p}.ln_2.weight": 1 + rnd(w),
                  f"{p}.ln_2.bias": rnd(w), f"{p}.mlp.c_fc.weight": rnd(4 * w, w), f"{p}.mlp.c_fc.bias": rnd(4 * w),
                  f"{p}.mlp.c_proj.weight": rnd(w, 4 * w), f"{p}.mlp.c_proj.bias": rnd(w)}  # fmt: skip
    return state


def reference_style(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The original StyleAdapter.forward on the file's tensors: style tokens after the image tokens, ln_pre, CLIP
    residual attention blocks (QuickGELU), ln_post on the style tokens, @ proj."""
    ln = lambda t, p: F.layer_norm(t, (WIDTH,), state[f"{p}.weight"], state[f"{p}.bias"])  # noqa: E731
    x = ln(torch.cat([x, state["style_embedding"].expand(x.shape[0], -1, -1)], dim=1), "ln_pre").transpose(0, 1)
    for i in range(LAYERS):
        p = f"transformer_layes.{i}"
        h = ln(x, f"{p}.ln_1")
        x = x + F.multi_head_attention_forward(
            h, h, h, WIDTH, HEADS, state[f"{p}.attn.in_proj_weight"], state[f"{p}.attn.in_proj_bias"], None, None,
            False, 0.0, state[f"{p}.attn.out_proj.weight"], state[f"{p}.attn.out_proj.bias"], need_weights=False,
        )[0]  # fmt: skip
        h = F.linear(ln(x, f"{p}.ln_2"), state[f"{p}.mlp.c_fc.weight"], state[f"{p}.mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), state[f"{p}.mlp.c_proj.weight"], state[f"{p}.mlp.c_proj.bias"])
    return ln(x.transpose(0, 1)[:, -TOKENS:], "ln_post") @ state["proj"]


def write_openai_clip(folder, seed: int = 5):
    """A tiny CLIPModel saved as openai/clip-vit-large-patch14 is: config.json with text_config / vision_config
    (the projection width only at the top) and model.safetensors with both halves. Returns the model."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=77)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)).eval()
    folder.mkdir(parents=True)
    config = {"model_type": "clip", "projection_dim": 24, "text_config": text, "vision_config": VISION,
              "architectures": ["CLIPModel"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def picture(seed: int, h: int = 150, w: int = 110) -> np.ndarray:
    """A style picture of another shape than CLIP's 224 px square (the crop and resize are part of the rule)."""
    rng = np.random.RandomState(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, :, seed % 3] = 220
    img[h // 3 :, w // 2 :, (seed + 1) % 3] = 180
    return np.clip(img.astype(int) + rng.randint(0, 70, img.shape), 0, 255).astype(np.uint8)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD1.5 pipeline (context 32 wide), a style adapter file for it with openai's CLIP folder beside it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("t2i_style")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny.UNET_KW, "sample_size": 8})
    tok = tiny.tiny_tokenizer(root / "_tok")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**tiny_families.VAE_KW), unet=unet, tokenizer=tok,
                                   text_encoder=CLIPTextModel(tiny.text_config(tok)), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(root / "sd"))
    models = root / "models"
    clip = write_openai_clip(models / locate.STYLE_ENCODER_FOLDER)
    state = style_state(1)
    torch.save(state, models / "t2iadapter_style_sd14v1.pth")
    return {"root": root, "sd": checkpoints.load_sd(root / "sd"), "pipe": pipe, "clip": clip, "state": state,
            "file": models / "t2iadapter_style_sd14v1.pth", "models": models}  # fmt: skip


def reference_tokens(sd15, pic: np.ndarray) -> torch.Tensor:
    """The original's get_cond_style: CLIPProcessor (openai's preprocessor config) -> last_hidden_state -> adapter."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip
    pixels = processor(images=Image.fromarray(pic), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = sd15["clip"].vision_model(pixel_values=pixels).last_hidden_state  # (1, 257, width)
        return reference_style(sd15["state"], hidden)


def reference_picture(sd15, pic, prompt, scale, steps, cfg, seed, end_step=None) -> np.ndarray:
    """diffusers' pipeline with the original's contexts; from loop step `end_step` on, the plain ones (the unit's end,
    the original's style_cond_tau), swapped in through the step-end callback."""
    pipe = sd15["pipe"]
    with torch.no_grad():
        c, uc = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    style = reference_tokens(sd15, pic) * scale
    c_style, uc_style = torch.cat([c, style], dim=1), torch.cat([uc, uc[:, -style.shape[1] :]], dim=1)

    def plain_after_end(p, i, t, kwargs):
        return {"prompt_embeds": torch.cat([uc, c])} if end_step is not None and i + 1 >= end_step else {}

    return _ref(pipe, "ddim", prompt_embeds=c_style, negative_prompt_embeds=uc_style, num_inference_steps=steps,
                guidance_scale=cfg, seed=seed, callback_on_step_end=plain_after_end,
                callback_on_step_end_tensor_inputs=["prompt_embeds"])[0]  # fmt: skip


def _request(units, prompt="a red square", steps=4, cfg=5.0, seed=3):
    return GenerationRequest(prompt, "", units, steps=steps, cfg_scale=cfg, seed=seed, width=SIZE, height=SIZE,
                             sampler="ddim")  # fmt: skip


def test_files_load_as_published(sd15, tmp_path):
    adapter = t2i_adapters.load_t2i_adapter(sd15["file"])
    assert adapter.cfg.kind == "style" and adapter.state_dict().keys() == sd15["state"].keys()
    encoder = clip_vision.load_clip_vision(sd15["models"] / locate.STYLE_ENCODER_FOLDER)
    assert encoder.clip.config.projection_dim == 24  # from the weights: the config keeps it at the top only
    control = clip_vision.style_control(adapter, sd15["models"], torch.float32)
    pic = picture(0)
    with torch.no_grad():
        ours = control.tokens(pic)
    assert ours.shape == (1, TOKENS, CONTEXT)
    assert torch.allclose(ours, reference_tokens(sd15, pic), atol=1e-4)  # the same preprocessing and layers
    with torch.no_grad():  # bf16 weights (the CPU's default dtype): the adapter's norms still run in fp32
        half_adapter = t2i_adapters.load_t2i_adapter(sd15["file"], dtype=torch.bfloat16)
        half = clip_vision.style_control(half_adapter, sd15["models"], torch.bfloat16).tokens(pic)
    assert half.dtype == torch.bfloat16 and (half.float() - ours).abs().max() < 0.05 * ours.abs().max()


@pytest.mark.parametrize("scale, end, end_step", [(0.8, 1.0, None), (1.3, 0.5, 2)])
def test_style_picture_matches_the_original_rule(sd15, scale, end, end_step):
    control = clip_vision.style_control(t2i_adapters.load_t2i_adapter(sd15["file"]), sd15["models"], torch.float32)
    pic = picture(1)
    out = generate(sd15["sd"], _request((ControlUnit(control, pic, scale=scale, end=end),))).images[0]
    ref = reference_picture(sd15, pic, "a red square", scale, 4, 5.0, 3, end_step)
    assert _diff(out, ref) <= PIXEL_TOL
    plain = generate(sd15["sd"], _request(())).images[0]
    assert _diff(out, plain) > 8  # the style tokens changed the picture: the comparison is of something
    other = generate(sd15["sd"], _request((ControlUnit(control, picture(2), scale=scale, end=end),))).images[0]
    assert _diff(out, other) > 2  # another picture, another style


def test_a1111_padding_differs(sd15):
    """The A1111 extension pads the negative half with zeros (its cond mark): another picture, so the rule matters."""
    pipe, pic = sd15["pipe"], picture(1)
    with torch.no_grad():
        c, uc = pipe.encode_prompt("a red square", "cpu", 1, True, "")
    style = reference_tokens(sd15, pic)
    zeros = _ref(pipe, "ddim", prompt_embeds=torch.cat([c, style], 1), num_inference_steps=4, guidance_scale=5.0,
                 negative_prompt_embeds=torch.cat([uc, torch.zeros_like(style)], 1), seed=3)[0]  # fmt: skip
    assert _diff(zeros, reference_picture(sd15, pic, "a red square", 1.0, 4, 5.0, 3)) > PIXEL_TOL


def test_manager_and_cli_find_the_encoder_beside_the_file(sd15, tmp_path):
    from cldm.__main__ import main
    from cldm.runtime.manager import ModelManager

    pic = picture(3)
    manager = ModelManager(str(sd15["root"] / "sd"), device="cpu", dtype="fp32")
    result = manager.run(_request((ControlUnit(str(sd15["file"]), pic, scale=0.9),), steps=2))
    control = clip_vision.style_control(t2i_adapters.load_t2i_adapter(sd15["file"]), sd15["models"], torch.float32)
    direct = generate(sd15["sd"], _request((ControlUnit(control, pic, scale=0.9),), steps=2))
    assert _diff(result.images[0], direct.images[0]) == 0
    assert isinstance(manager.controlnet(str(sd15["file"])), StyleControl)
    hint, out = tmp_path / "style.png", tmp_path / "styled.png"
    Image.fromarray(pic).save(hint)
    argv = ["generate", "--base", str(sd15["root"] / "sd"), "--controlnet", str(sd15["file"]), "--hint", str(hint),
            "--control-scale", "0.9", "--prompt", "a red square", "--steps", "2", "--cfg", "5", "--seed", "3",
            "--sampler", "ddim", "--width", "64", "--height", "64", "--dtype", "fp32", "--out", str(out)]  # fmt: skip
    assert main(argv) in (0, None)
    assert _diff(np.asarray(Image.open(out).convert("RGB")), direct.images[0]) == 0


def test_missing_encoder_is_said_with_where_to_put_it(sd15, tmp_path, monkeypatch):
    alone = tmp_path / "t2iadapter_style_sd14v1.pth"
    alone.write_bytes(sd15["file"].read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = t2i_adapters.load_t2i_adapter(alone)
    with pytest.raises(MissingWeightsError, match="clip-vit-large-patch14"):
        clip_vision.style_control(adapter, tmp_path, torch.float32)
    a1111 = tmp_path / locate.A1111_STYLE_ENCODER  # the extension's file: ViT-L/14 shapes, none here
    a1111.parent.mkdir()
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(WIDTH),
                "visual_projection.weight": torch.zeros(24, WIDTH)}, a1111)  # fmt: skip
    assert locate.locate_style_encoder(tmp_path) == a1111
    with pytest.raises(CheckpointError, match="do not fit the CLIP vision model"):
        clip_vision.style_control(adapter, tmp_path, torch.float32)


def test_style_units_are_refused_before_sampling(sd15, tmp_path):
    from cldm.runtime.manager import ModelManager

    control = clip_vision.style_control(t2i_adapters.load_t2i_adapter(sd15["file"]), sd15["models"], torch.float32)
    steps = []
    tensor_hint = torch.zeros(1, 3, SIZE, SIZE)
    for unit, why in ((ControlUnit(control, tensor_hint), "reads a picture"),
                      (ControlUnit(control, picture(0), mode="control"), "balanced mode"),
                      (ControlUnit(control, picture(0), mask=np.ones((SIZE, SIZE), np.uint8) * 255), "no region mask"),
                      (ControlUnit(t2i_adapters.load_t2i_adapter(sd15["file"]), picture(0)), "without its CLIP")):  # fmt: skip
        with pytest.raises(InputError, match=why):
            generate(sd15["sd"], _request((unit,)), callback=lambda k, n: steps.append(k))
    sdxl = tiny_families.make_sdxl_pipeline(tmp_path)
    with pytest.raises(InputError, match="T2I-Adapter for SD1.5 models"):
        unit = ControlUnit(control, picture(0))
        generate(checkpoints.load_sd(sdxl), _request((unit,)), callback=lambda k, n: steps.append(k))
    assert steps == []  # every one refused before the first step
    manager = ModelManager(str(sdxl), device="cpu", dtype="fp32")
    with pytest.raises(CheckpointError, match="SD1.5"):
        manager.controlnet(str(sd15["file"]))
