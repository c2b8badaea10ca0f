"""The tiny SDXL / SD2 fixtures themselves (tests/tiny_families.py): diffusers reads every file back, tensor for tensor.

Each single file is read with diffusers' own converters (diffusers.loaders.single_file_utils, offline) and must give
back exactly the diffusers weights it was written from; the reference pipelines must run (transformers 5, CPU, fp32).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tiny_families as tf
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    sdxl = tf.make_sdxl_pipeline(root)
    sd2 = tf.make_sd2_pipeline(root)
    sd2v = tf.make_sd2_pipeline(root, prediction="v_prediction")
    return {
        "root": root, "sdxl": sdxl, "sd2": sd2, "sd2v": sd2v,
        "cn_sdxl": tf.make_sdxl_controlnet(root, sdxl),
        "cn_sdxl_mid": tf.make_sdxl_controlnet(root, sdxl, transformer_layers_per_block=tf.SDXL_CN_MID),
        "cn_sdxl_small": tf.make_sdxl_controlnet(root, sdxl / "unet", transformer_layers_per_block=tf.SDXL_CN_SMALL),
        "cn_sd2": tf.make_sd2_controlnet(root, sd2), "cn_sd2v": tf.make_sd2_controlnet(root, sd2v),
    }  # fmt: skip


def _cfg(folder):
    return json.loads((folder / "config.json").read_text())


def _same(got: dict, want: dict, what: str) -> None:
    got = {k: v for k, v in got.items() if v is not None}
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))[:8]}"
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {bad[:8]}"


def _text(folder) -> dict:
    return {k.removeprefix("text_model."): v for k, v in load_file(str(folder / "model.safetensors")).items()}


def _sub(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def test_published_folder_layouts(fam):
    sdxl, sd2v = fam["sdxl"], fam["sd2v"]
    for folder in (sdxl / "text_encoder", sdxl / "text_encoder_2", sd2v / "text_encoder"):
        keys = load_file(str(folder / "model.safetensors"))
        assert all(k.startswith(("text_model.", "text_projection.")) for k in keys)
    for tok, pad in ((sdxl / "tokenizer", "<|endoftext|>"), (sdxl / "tokenizer_2", "!"), (sd2v / "tokenizer", "!")):
        assert sorted(p.name for p in tok.iterdir()) == [
            "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # fmt: skip
        assert json.loads((tok / "special_tokens_map.json").read_text())["pad_token"] == pad
    assert json.loads((sdxl / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    assert _cfg(sdxl / "vae")["scaling_factor"] == 0.13025 and _cfg(sd2v / "vae")["scaling_factor"] == 0.18215
    sched = json.loads((sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert (sched["timestep_spacing"], sched["steps_offset"], sched["beta_schedule"]) == ("leading", 1, "scaled_linear")
    assert json.loads((sd2v / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert _cfg(sd2v / "unet")["upcast_attention"] and not _cfg(fam["sd2"] / "unet")["upcast_attention"]
    assert _cfg(fam["cn_sd2v"])["upcast_attention"]
    u = _cfg(sdxl / "unet")
    assert u["projection_class_embeddings_input_dim"] == 6 * u["addition_time_embed_dim"] + 40
    assert u["cross_attention_dim"] == 32 + 48 and list(u["transformer_layers_per_block"]) == [1, 2, 3]
    assert list(_cfg(fam["cn_sdxl_mid"])["transformer_layers_per_block"]) == list(tf.SDXL_CN_MID)
    # the ControlNets are their own random weights, zero convs awake
    cn = load_file(str(fam["cn_sdxl"] / "diffusion_pytorch_model.safetensors"))
    unet = load_file(str(sdxl / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(cn["conv_in.weight"], unet["conv_in.weight"])
    assert cn["controlnet_mid_block.weight"].abs().mean() > 0.01


def test_sdxl_single_file_reads_back(fam):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModelWithProjection

    pipe = fam["sdxl"]
    path = tf.sdxl_single_file(pipe, fam["root"] / "sdxl.safetensors")
    ck = load_file(str(path))
    # (diffusers' infer_diffusers_model_type keys on the real depths, resblocks.9, so it can't name tiny files)
    assert sfu.is_clip_sdxl_model(ck) and sfu.is_open_clip_sdxl_model(ck)
    unet = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(pipe / "vae" / "diffusion_pytorch_model.safetensors"))
    _same(sfu.convert_ldm_unet_checkpoint(ck, _cfg(pipe / "unet")), unet, "unet")
    _same(sfu.convert_ldm_vae_checkpoint(ck, _cfg(pipe / "vae")), vae, "vae")
    assert len(_sub(ck, "model.diffusion_model.")) == len(unet) and len(_sub(ck, "first_stage_model.")) == len(vae)
    assert ck["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "model.diffusion_model.label_emb.0.2.weight" in ck
    clip_l = sfu.convert_ldm_clip_checkpoint(ck)
    clip_l.pop("text_model.embeddings.position_ids")  # a buffer the published files carry, rebuilt by CLIP
    _same({k.removeprefix("text_model."): v for k, v in clip_l.items()}, _text(pipe / "text_encoder"), "clip-l")
    g_ref = _text(pipe / "text_encoder_2")
    model = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2")
    clip_g = sfu.convert_open_clip_checkpoint(model, ck, prefix="conditioner.embedders.1.model.")
    _same({k.removeprefix("text_model."): v for k, v in clip_g.items()}, g_ref, "clip-g")
    p = "conditioner.embedders.1.model."
    assert ck[p + "text_projection"].shape == (48, 40)
    assert torch.equal(ck[p + "text_projection"], g_ref["text_projection.weight"].T)
    assert ck[p + "transformer.resblocks.3.attn.in_proj_weight"].shape == (3 * 48, 48) and p + "logit_scale" in ck
    # and the whole pipeline, the way users load a single file
    got = StableDiffusionXLPipeline.from_single_file(str(path), config=str(pipe), local_files_only=True)
    want = StableDiffusionXLPipeline.from_pretrained(pipe)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same(getattr(got, name).state_dict(), getattr(want, name).state_dict(), name)


@pytest.mark.parametrize("kind", ["sd2", "sd2v"])
def test_sd2_single_file_reads_back(fam, kind):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel

    pipe = fam[kind]
    path = tf.sd2_single_file(pipe, fam["root"] / f"{kind}.safetensors")
    ck = load_file(str(path))
    unet = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    _same(sfu.convert_ldm_unet_checkpoint(ck, _cfg(pipe / "unet")), unet, "unet")
    _same(sfu.convert_ldm_vae_checkpoint(ck, _cfg(pipe / "vae")), load_file(str(pipe / "vae" / "diffusion_pytorch_model.safetensors")), "vae")  # fmt: skip
    assert ck["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # use_linear_projection
    # OpenCLIP text: one more resblock than diffusers keeps (its weights unused), as a real SD2 file
    p = "cond_stage_model.model."
    blocks = {int(m.group(1)) for k in ck if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))}
    assert blocks == {0, 1, 2, 3}
    assert ck[p + "text_projection"].shape == (48, 48) and p + "logit_scale" in ck
    text = sfu.convert_open_clip_checkpoint(CLIPTextModel.from_pretrained(pipe / "text_encoder"), ck, prefix=p)
    extra = {k for k in text if k.startswith("text_model.encoder.layers.3.")}
    assert len(extra) == 16  # ln_1, ln_2, q/k/v (split from in_proj), out_proj, c_fc, c_proj: weight + bias each
    _same({k.removeprefix("text_model."): v for k, v in text.items() if k not in extra}, _text(pipe / "text_encoder"), "text")  # fmt: skip
    # the LDM schedule buffers agree with the scheduler
    from diffusers import DDIMScheduler

    ac = DDIMScheduler.from_pretrained(pipe / "scheduler").alphas_cumprod
    assert (ck["alphas_cumprod"] - ac).abs().max() < 1e-6 and ck["betas"].shape == (1000,)
    got = StableDiffusionPipeline.from_single_file(str(path), config=str(pipe), local_files_only=True)
    want = StableDiffusionPipeline.from_pretrained(pipe)
    for name in ("unet", "vae", "text_encoder"):
        _same(getattr(got, name).state_dict(), getattr(want, name).state_dict(), name)
    assert got.scheduler.config.prediction_type == want.scheduler.config.prediction_type
    assert got.unet.config.upcast_attention == (kind == "sd2v")


@pytest.mark.parametrize("kind", ["cn_sdxl", "cn_sdxl_mid", "cn_sdxl_small", "cn_sd2", "cn_sd2v"])
def test_controlnet_single_file_reads_back(fam, kind):
    from diffusers.loaders import single_file_utils as sfu

    folder = fam[kind]
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = _cfg(folder)
    for prefix in ("control_model.", ""):  # lllyasviel-style and thibaud-style (no prefix)
        ck = load_file(str(tf.controlnet_single_file(folder, fam["root"] / f"{kind}{prefix}.safetensors", prefix)))
        assert len(ck) == len(want)
        assert {k for k in ck if "input_hint_block" in k} == {
            f"{prefix}input_hint_block.{i}.{w}" for i in range(0, 15, 2) for w in ("weight", "bias")}  # fmt: skip
        assert {k for k in ck if "zero_convs" in k} == {f"{prefix}zero_convs.{i}.0.{w}" for i in range(9) for w in ("weight", "bias")}  # fmt: skip
        got = sfu.convert_controlnet_checkpoint(ck, cfg)
        if cfg.get("addition_embed_type") == "text_time":
            # diffusers' reader leaves label_emb out; its own name table says where they go
            state = {k.removeprefix(prefix): v for k, v in ck.items()}
            for new, old in sfu.DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
                got[new] = state[old]
        _same(got, want, kind)


def test_sd2_controlnet_from_single_file(fam):
    from diffusers import ControlNetModel

    folder = fam["cn_sd2v"]
    path = tf.controlnet_single_file(folder, fam["root"] / "cn-sd2-v-full.safetensors")
    got = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    _same(got.state_dict(), ControlNetModel.from_pretrained(folder).state_dict(), "controlnet")


def test_sdxl_embedding_file_loads_in_diffusers(fam):
    from diffusers import StableDiffusionXLPipeline

    state = load_file(str(tf.sdxl_embedding_file(fam["root"] / "emb.safetensors", n_vectors=3, seed=4)))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (3, 32), "clip_g": (3, 48)}
    pipe = StableDiffusionXLPipeline.from_pretrained(fam["sdxl"])
    pipe.load_textual_inversion(state["clip_l"], token="<e>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<e>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)  # fmt: skip
    ids = pipe.tokenizer_2.convert_tokens_to_ids(["<e>", "<e>_1", "<e>_2"])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids], state["clip_g"])


@torch.no_grad()
def test_reference_pipelines_run_and_encode_by_the_documented_rules(fam):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0))
    cns = [ControlNetModel.from_pretrained(fam[k]) for k in ("cn_sdxl", "cn_sdxl_mid")]
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(fam["sdxl"], controlnet=cns)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", image=[hint, hint], controlnet_conditioning_scale=[0.8, 0.5], output_type="np", **kw).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # SDXL's text rule: the two penultimate layers side by side, pooled = text_embeds, zeros for no negative prompt
    ctx, neg, pooled, neg_pooled = pipe.encode_prompt("a photo of a cat", device="cpu")
    ids = [t("a photo of a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for t in (pipe.tokenizer, pipe.tokenizer_2)]  # fmt: skip
    o1 = pipe.text_encoder(ids[0], output_hidden_states=True)
    o2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
    assert torch.equal(ctx, torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1))
    assert torch.equal(pooled, o2.text_embeds) and not neg.any() and not neg_pooled.any()
    assert ids[1][0, -1] == 0  # tokenizer_2 pads with "!"

    sd2 = StableDiffusionControlNetPipeline.from_pretrained(
        fam["sd2v"], controlnet=ControlNetModel.from_pretrained(fam["cn_sd2v"]), safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    sd2.set_progress_bar_config(disable=True)
    kw["generator"] = torch.Generator().manual_seed(0)
    out = sd2("a cat", image=hint, output_type="np", **kw).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    ctx, _ = sd2.encode_prompt("a cat", "cpu", 1, False)
    ids = sd2.tokenizer("a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ctx, sd2.text_encoder(ids).last_hidden_state)
