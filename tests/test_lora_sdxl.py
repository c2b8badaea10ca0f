"""SDXL (and SD2.x) LoRAs and SDXL textual inversions against diffusers, on the tiny reference models of
tests/tiny_families.py, and the family checks: a LoRA or an embedding of another family is refused, both families
named, and the base is left as it was.

References: `pipe.load_lora_weights(file)` + `pipe.fuse_lora(...)` (diffusers' kohya converter, its SGM block map
and its PEFT loader) and `pipe.load_textual_inversion` into each text encoder + `pipe.encode_prompt`.
Bounds: merged weights within 1e-6 (the same float32 sums), pictures within 2/255 (tests/test_families.py's bound),
text contexts within 1e-4.

The reference LoRA has one alpha per part (UNet, text encoder 1, text encoder 2): with alphas that vary layer by
layer, diffusers 0.42 writes PEFT alpha_pattern keys that match no module for attention layers and text encoders
(peft warns "alpha_pattern keys did not match any targeted module") and merges those layers with the part's common
alpha, which kohya's and A1111's per-layer alpha do not do; we keep the per-layer alpha
(test_per_layer_alpha_is_kept).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cldm.adapters import embeddings, lora
from cldm.errors import InputError
from cldm.io import checkpoints, files, keymaps
from cldm.pipeline.conditioning import encode_prompts
from cldm.pipeline.extras import LoraUnit
from cldm.pipeline.request import GenerationRequest
from cldm.pipeline.stages import generate
from cldm.runtime.base_slot import read_embeddings
from tests import tiny_families as tf
from tests.test_pipeline import _ref

SIZE = 64
PIXEL_TOL = 2
RANK = 4
ALPHAS = {"lora_unet_": 2.0, "lora_te1_": 3.0, "lora_te2_": 1.0}  # one per part (see the module's docstring)
WEIGHT = 0.7
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",  # the attention blocks
               "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", ".op", ".conv")  # LoCon: resnets, samplers  # fmt: skip
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _pair(w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) for a weight: a Linear's, or a convolution's (down with its kernel, up 1x1)."""
    down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.1
    up = torch.randn(w.shape[0], RANK, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
    return down, up


def kohya_sdxl_state(sd, seed: int = 0, alpha=None) -> dict[str, torch.Tensor]:
    """A kohya SDXL LoRA over our SDXL model, with the names sd-scripts writes: `lora_unet_<SGM module>` (its own
    SDXL UNet has the original block names: input_blocks_4_1_transformer_blocks_0_attn1_to_q, middle_block_1_...,
    output_blocks_...), `lora_te1_text_model_...` (CLIP ViT-L) and `lora_te2_text_model_...` (bigG); every attention
    and feed-forward layer, the resnet and sampler convolutions (LoCon) and the text encoders' attention and MLP.
    `alpha(name, i)` gives a layer's alpha (default: ALPHAS by part)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(name: str, w: torch.Tensor) -> None:
        down, up = _pair(w, g)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        a = alpha(name, len(out)) if alpha else next(v for p, v in ALPHAS.items() if name.startswith(p))
        out[f"{name}.alpha"] = torch.tensor(float(a))

    for key, w in sd.unet.state_dict().items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and w.ndim in (2, 4) and module.endswith(UNET_LAYERS):
            add("lora_unet_" + module.replace(".", "_"), w)
    for prefix, text in (("lora_te1_", sd.text), ("lora_te2_", sd.text_2)):
        for key, w in text.state_dict().items():
            module = key.removeprefix("transformer.").removesuffix(".weight")
            if key.endswith(".weight") and ".layers." in key and module.endswith(TEXT_LAYERS):
                add(prefix + module.replace(".", "_"), w)
    return out


def _diffusers_names(state: dict[str, torch.Tensor], sd) -> dict[str, torch.Tensor]:
    """The same kohya LoRA with the UNet named by diffusers' modules (`lora_unet_down_blocks_1_attentions_0_...`,
    what kohya-style converters of diffusers-trained SDXL LoRAs write)."""
    modules = keymaps.unet_modules(sd.config.unet)
    ours = {k.removesuffix(".weight").replace(".", "_"): k for k in sd.unet.state_dict()}
    out = {}
    for key, v in state.items():
        name, _, rest = key.partition(".")
        if name.startswith("lora_unet_"):
            module = keymaps.rename(ours[name.removeprefix("lora_unet_")], modules).removesuffix(".weight")
            name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{rest}"] = v
    return out


def _modules(sd) -> dict[str, torch.nn.Module]:
    return {"unet": sd.unet, "text": sd.text, "text_2": sd.text_2}


def _snapshot(sd) -> dict[tuple[str, str], torch.Tensor]:
    return {(part, k): v.clone() for part, m in _modules(sd).items() if m is not None
            for k, v in m.state_dict().items()}  # fmt: skip


def _unchanged(sd, before) -> bool:
    now = _snapshot(sd)
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def _worst(pipe, sd, parsed) -> float:
    """The largest difference between our merged weights and diffusers' fused ones (after fuse + unload: the plain
    module names), over every layer of `parsed`."""
    ours = {part: m.state_dict() for part, m in _modules(sd).items() if m is not None}
    theirs = {"unet": pipe.unet.state_dict(), "text": pipe.text_encoder.state_dict(),
              "text_2": pipe.text_encoder_2.state_dict() if getattr(pipe, "text_encoder_2", None) else {}}  # fmt: skip
    modules = keymaps.unet_modules(sd.config.unet)
    worst = 0.0
    for layer in parsed.layers:
        if layer.part == "unet":
            ref = theirs["unet"][keymaps.rename(layer.key, modules)]
        else:
            name = layer.key.removeprefix("transformer.")
            state = theirs[layer.part]
            # transformers 5's CLIPTextModel has no text_model. level (CLIPTextModelWithProjection keeps it)
            ref = state[name] if name in state else state[name.removeprefix("text_model.")]
        worst = max(worst, float((ours[layer.part][layer.key] - ref).abs().max()))
    return worst


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _xl_pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return tf.make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl_lora"))


@pytest.fixture(scope="module")
def xl(xl_dir):
    return checkpoints.load_sd(xl_dir)


@pytest.fixture(scope="module")
def xl_lora(xl, xl_dir, tmp_path_factory):
    """(kohya file, diffusers/PEFT file written by diffusers from it, diffusers' pipeline with it fused at WEIGHT)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("xl_lora_files")
    kohya = root / "xl_style.safetensors"
    save_file(kohya_sdxl_state(xl), str(kohya))
    pipe = _xl_pipeline(xl_dir)
    pipe.load_lora_weights(str(kohya))
    # the PEFT layout, written by diffusers' own save from what it loaded (text_encoder.encoder.* for transformers 5's
    # flat CLIPTextModel, text_encoder_2.text_model.*), with the PEFT configs (alpha, rank) in the file's metadata
    layers, meta = {}, {}
    for part, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                         ("text_encoder_2", pipe.text_encoder_2)):  # fmt: skip
        name = next(iter(module.peft_config))
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module, adapter_name=name)
        meta[f"{part}_lora_adapter_metadata"] = module.peft_config[name].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(root / "peft", **layers, **meta)
    peft = next((root / "peft").glob("*.safetensors"))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=WEIGHT)
    pipe.unload_lora_weights()  # the fused weights stay, under the plain module names
    return kohya, peft, pipe


# ------------------------------------------------------------------------------------------------- (a) kohya SDXL
def test_kohya_sdxl_lora_matches_diffusers_and_restores_the_base(xl, xl_lora):
    kohya, _, pipe = xl_lora
    state = files.read_file(kohya)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in state)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in state)
    assert any(k.startswith("lora_unet_output_blocks_") for k in state)
    parsed = lora.parse(state, xl, "xl_style")
    parts = {p: sum(x.part == p for x in parsed.layers) for p in ("unet", "text", "text_2")}
    assert len(parsed.layers) == len(state) // 3 and parsed.skipped == 0 and all(parts.values())  # every layer
    assert any(x.down.ndim == 4 and x.down.shape[-1] == 3 for x in parsed.layers)  # LoCon 3x3 convolutions
    assert {x.scale for x in parsed.layers if x.part == "text_2"} == {ALPHAS["lora_te2_"] / RANK}
    before = _snapshot(xl)
    originals = lora.apply(xl, [(parsed, WEIGHT)])
    try:
        assert _worst(pipe, xl, parsed) < 1e-6  # every target module, as diffusers merges it
    finally:
        lora.restore(xl, originals)
    assert _unchanged(xl, before)  # bit for bit

    # the picture: diffusers' StableDiffusionXLPipeline with the LoRA fused, ours with it merged for the request
    ref = _ref(pipe, "euler_a", prompt="a red circle", num_inference_steps=6, guidance_scale=5.0, seed=3)
    request = dict(steps=6, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE, sampler="euler_a")
    out = generate(xl, GenerationRequest("a red circle", loras=(LoraUnit(parsed, WEIGHT),), **request))
    plain = generate(xl, GenerationRequest("a red circle", **request))
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    assert _diff(out.images[0], plain.images[0]) > 8  # the LoRA shows
    assert _unchanged(xl, before)


def test_diffusers_named_kohya_sdxl_lora_is_the_same(xl, xl_lora):
    """kohya names from diffusers' modules (lora_unet_down_blocks_1_attentions_0_...) give the same layers."""
    kohya, _, pipe = xl_lora
    state = files.read_file(kohya)
    renamed = _diffusers_names(state, xl)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") for k in renamed)
    assert not any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks")) for k in renamed)
    a, b = lora.parse(state, xl, "sgm"), lora.parse(renamed, xl, "diffusers_names")
    assert [(x.part, x.key, x.scale) for x in a.layers] == [(x.part, x.key, x.scale) for x in b.layers]
    originals = lora.apply(xl, [(b, WEIGHT)])
    try:
        assert _worst(pipe, xl, b) < 1e-6
    finally:
        lora.restore(xl, originals)


def test_per_layer_alpha_is_kept(xl):
    """kohya's alpha is per layer (A1111 reads it so): each layer's change is alpha / rank * up @ down."""
    state = kohya_sdxl_state(xl, seed=5, alpha=lambda name, i: 1 + i % 5)
    parsed = lora.parse(state, xl, "alphas")
    for layer in parsed.layers[:40]:
        name = next(k for k in state if k.endswith(".lora_down.weight") and state[k] is layer.down)
        assert layer.scale == float(state[name.replace(".lora_down.weight", ".alpha")]) / RANK


# -------------------------------------------------------------------------------------------- (b) diffusers / PEFT
def test_peft_sdxl_lora_matches_diffusers(xl, xl_lora, xl_dir):
    kohya, peft, pipe = xl_lora
    state = files.read_file(peft)
    assert any(k.startswith("unet.down_blocks.") and k.endswith(".lora_A.weight") for k in state)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("text_encoder_2.") for k in state)
    parsed = lora.parse(state, xl, "xl_peft", files.read_metadata(peft))
    reference = lora.parse(files.read_file(kohya), xl, "xl_style")
    assert len(parsed.layers) == len(reference.layers) and parsed.skipped == 0
    # alpha from the PEFT configs diffusers saved beside the weights: one per part
    assert {(x.part, x.scale) for x in parsed.layers} == {
        ("unet", ALPHAS["lora_unet_"] / RANK), ("text", ALPHAS["lora_te1_"] / RANK),
        ("text_2", ALPHAS["lora_te2_"] / RANK)}  # fmt: skip
    before = _snapshot(xl)
    originals = lora.apply(xl, [(parsed, WEIGHT)])
    try:
        assert _worst(pipe, xl, parsed) < 1e-6  # the kohya file fused by diffusers
        # and the PEFT file fused by diffusers itself
        again = _xl_pipeline(xl_dir)
        again.load_lora_weights(str(peft))
        again.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=WEIGHT)
        again.unload_lora_weights()
        assert _worst(again, xl, parsed) < 1e-6
    finally:
        lora.restore(xl, originals)
    assert _unchanged(xl, before)


# ------------------------------------------------------------------------------------------------ (c) embeddings
def test_sdxl_embedding_matches_diffusers(xl, xl_dir, tmp_path):
    folder = tmp_path / "embeddings"
    path = tf.sdxl_embedding_file(folder / "inkstyle.safetensors", n_vectors=2, seed=4)
    assert read_embeddings(xl, folder) == {}  # the reader puts clip_l into sd.text, clip_g into sd.text_2
    try:
        state = files.read_file(path)
        assert torch.equal(xl.text.embeddings["inkstyle"].vectors, state["clip_l"])
        assert torch.equal(xl.text_2.embeddings["inkstyle"].vectors, state["clip_g"])
        assert xl.text.embeddings["inkstyle"].hash == xl.text_2.embeddings["inkstyle"].hash != ""
        pipe = _xl_pipeline(xl_dir)
        pipe.load_textual_inversion(state["clip_l"], token="inkstyle", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)  # fmt: skip
        pipe.load_textual_inversion(state["clip_g"], token="inkstyle", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)  # fmt: skip
        for prompt in ("a inkstyle house", "inkstyle, a red circle in inkstyle"):
            with torch.no_grad():
                pe, _, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=True)
            ctx = encode_prompts(xl, GenerationRequest(prompt, width=SIZE, height=SIZE))
            assert ctx.cond.shape == pe.shape
            assert (ctx.cond - pe).abs().max() < 1e-4, (ctx.cond - pe).abs().max()
        # without it the word is only letters: the context changes (in both encoders' halves)
        for text in xl.texts:
            text.embeddings.clear()
        plain = encode_prompts(xl, GenerationRequest("a inkstyle house", width=SIZE, height=SIZE)).cond
        with torch.no_grad():
            pe, _, _, _ = pipe.encode_prompt("a inkstyle house", do_classifier_free_guidance=True)
        width = xl.text.cfg.hidden_size
        for half in (slice(0, width), slice(width, None)):
            assert (plain[..., half] - pe[..., half]).abs().max() > 1e-3
    finally:
        for text in xl.texts:
            text.embeddings.clear()


def test_embeddings_of_another_family_are_skipped_or_refused(xl, ours, tmp_path):
    sd15, _ = ours
    folder = tmp_path / "embeddings"
    folder.mkdir()
    tf.sdxl_embedding_file(folder / "xlstyle.safetensors", seed=1)
    save_file({"emb_params": torch.randn(2, sd15.text.cfg.hidden_size)}, str(folder / "oldstyle.safetensors"))
    try:
        # a folder read (A1111's embeddings folder): the other family's file is skipped, with why, the rest loaded
        refused = read_embeddings(xl, folder)
        assert set(refused) == {"oldstyle"} and "SDXL" in refused["oldstyle"] and "SD1.5" in refused["oldstyle"]
        assert set(xl.text.embeddings) == set(xl.text_2.embeddings) == {"xlstyle"}
        refused = read_embeddings(sd15, folder)
        assert set(refused) == {"xlstyle"} and "SDXL" in refused["xlstyle"] and "SD1.5" in refused["xlstyle"]
        assert set(sd15.text.embeddings) == {"oldstyle"}
        # asked for by name: an error naming both families, nothing installed
        with pytest.raises(InputError, match=r"is for SD1\.5 or SD2\.x.*this base is SDXL"):
            embeddings.install(xl, {"emb_params": torch.randn(2, 32)}, "one")
        with pytest.raises(InputError, match=r"is for SD1\.5 \(.*this base is SDXL"):
            embeddings.install(xl, {"emb_params": torch.randn(2, 768)}, "real15")
        with pytest.raises(InputError, match=r"is for SDXL.*this base is SD1\.5"):
            embeddings.install(sd15, files.read_file(folder / "xlstyle.safetensors"), "xl")
        with pytest.raises(InputError, match="no clip_g"):
            embeddings.install(xl, {"clip_l": torch.randn(2, 32)}, "half")
        with pytest.raises(InputError, match="2 clip_l vectors and 3 clip_g"):
            embeddings.install(xl, {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 48)}, "uneven")
        with pytest.raises(InputError, match="clip_g vectors have the shape"):
            embeddings.install(xl, {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 1280)}, "real_xl")
        assert "one" not in xl.text.embeddings and "half" not in xl.text.embeddings
        assert set(xl.text_2.embeddings) == {"xlstyle"}
    finally:
        for text in [*xl.texts, sd15.text]:
            text.embeddings.clear()


# -------------------------------------------------------------------------------------------------- (d) refusals
def test_sd15_lora_is_refused_on_sdxl_and_sdxl_lora_on_sd15(xl, ours):
    import tiny

    sd15, _ = ours
    before_xl, before_15 = _snapshot(xl), _snapshot(sd15)
    with pytest.raises(InputError, match=r"ink is a LoRA for SD1\.5 or SD2\.x \(.*lora_te_.*\); this base is SDXL"):
        lora.parse(tiny.lora_state(sd15, seed=1), xl, "ink")
    with pytest.raises(
        InputError, match=r"xl_style is a LoRA for SDXL \(.*lora_te1_ and lora_te2_.*; this base is SD1\.5"
    ):
        lora.parse(kohya_sdxl_state(xl), sd15, "xl_style")
    # the UNet's layers alone (no text-encoder keys): SDXL's block names tell it
    unet_only = {k: v for k, v in kohya_sdxl_state(xl).items() if k.startswith("lora_unet_")}
    with pytest.raises(InputError, match=r"is a LoRA for SDXL \(.*block names.*this base is SD1\.5"):
        lora.parse(unet_only, sd15, "xl_unet")
    # nothing in the names tells (diffusers' module names, tiny widths), but the shapes do not fit the base
    renamed = _diffusers_names(unet_only, xl)
    with pytest.raises(InputError, match=r"does not fit this SD1\.5 model.*cross-attention reads 80-wide text states"):
        lora.parse(renamed, sd15, "xl_unet_diffusers_names")
    # a LoRA read for one base, then given to another: refused before any weight changes
    parsed15 = lora.parse(tiny.lora_state(sd15, seed=1), sd15, "ink")
    with pytest.raises(InputError, match=r"read for an SD1\.5 base; this base is SDXL"):
        lora.apply(xl, [(parsed15, 1.0)])
    assert _unchanged(xl, before_xl) and _unchanged(sd15, before_15)


def test_real_widths_tell_the_family():
    """With the real models' widths the family shows in the shapes even without telling names."""

    def layer(width_in, width_out=320):
        return {"down": torch.zeros(RANK, width_in), "up": torch.zeros(width_out, RANK)}

    peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert lora.lora_family({peft: layer(2048)})[0] == ["SDXL"]
    assert lora.lora_family({peft: layer(1024)})[0] == ["SD2.x"]
    assert lora.lora_family({peft: layer(768)})[0] == ["SD1.5"]
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert lora.lora_family({te: layer(768, 768)})[0] == ["SD1.5", "SDXL"]
    assert lora.lora_family({te: layer(1024, 1024)})[0] == ["SD2.x"]
    fams, why = lora.lora_family({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": layer(768, 768)})
    assert fams == ["SD1.5"] and len(why) == 2
    assert lora.lora_family({"lora_unet_x": layer(32)})[0] == ["SD1.5", "SD2.x", "SDXL"]  # nothing tells


# ------------------------------------------------------------------------------------------------------ SD2.x
def test_sd2_kohya_lora_matches_diffusers(tmp_path, xl):
    """SD2.x LoRAs have SD1.5's kohya names (diffusers modules, lora_te_ for OpenCLIP ViT-H as a CLIP model)."""
    from diffusers import StableDiffusionPipeline

    sd2_dir = tf.make_sd2_pipeline(tmp_path, prediction="v_prediction")
    sd2 = checkpoints.load_sd(sd2_dir)
    pipe = StableDiffusionPipeline.from_pretrained(sd2_dir, safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(2)
    state = {}
    for prefix, module in (("lora_unet", pipe.unet), ("lora_te", pipe.text_encoder)):
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith((*UNET_LAYERS[:12], "conv1",
                                                                                    "conv2", *TEXT_LAYERS)):  # fmt: skip
                name = name if prefix == "lora_unet" or name.startswith("text_model.") else f"text_model.{name}"
                key = f"{prefix}_{name.replace('.', '_')}"
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _pair(m.weight, g)
                state[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "sd2_style.safetensors"
    save_file(state, str(path))
    parsed = lora.parse(files.read_file(path), sd2, "sd2_style")
    assert len(parsed.layers) == len(state) // 3 and parsed.skipped == 0
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=WEIGHT)
    pipe.unload_lora_weights()
    before = _snapshot(sd2)
    originals = lora.apply(sd2, [(parsed, WEIGHT)])
    try:
        assert _worst(pipe, sd2, parsed) < 1e-6
    finally:
        lora.restore(sd2, originals)
    assert _unchanged(sd2, before)
    # and the two other families' LoRAs on it, and it on SDXL
    with pytest.raises(InputError, match=r"is a LoRA for SDXL .*this base is SD2\.x"):
        lora.parse(kohya_sdxl_state(xl), sd2, "xl_style")
    with pytest.raises(InputError, match=r"is a LoRA for SD1\.5 or SD2\.x .*this base is SDXL"):
        lora.parse(state, xl, "sd2_style")
    assert _unchanged(sd2, before)
