"""Tiny random SDXL and SD2 models, written by diffusers/transformers themselves (the reference), in the layouts
users download: diffusers folders (save_pretrained) and the original single files (SGM for SDXL, LDM for SD2).

This module builds the reference; it imports nothing from `cldm` (tests/tiny.py, the SD1.5 twin, only lends the
tiny BPE tokenizer and `wake_zero_convs`). tests/test_tiny_families.py proves the single-file writers by reading every
file back with diffusers' own converters (diffusers.loaders.single_file_utils) and comparing tensors exactly.

Shapes (every model runs in well under a second on a CPU; images are 64x64 px, latents 8x8):

- VAE (both families): 4 levels (16, 32, 32, 32), 2 resnets a level, so it downsamples by 8 as the real one;
  scaling_factor 0.13025 for SDXL, 0.18215 for SD2.
- SDXL UNet: levels (32, 64, 128) = DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D like the real one (no
  attention at the first level); transformer_layers_per_block (1, 2, 3) (the mid block takes the last, 3), attention
  heads (2, 4, 8) = width / 16, use_linear_projection; text_time conditioning with addition_time_embed_dim 8, so
  projection_class_embeddings_input_dim = 6 * 8 + 40 = 88; cross_attention_dim = 32 + 48 = 80.
- SDXL text_encoder: CLIP-L shape, CLIPTextModel, hidden 32, 3 layers, 4 heads (width 8, as tests/tiny.py), ffn 37,
  quick_gelu. text_encoder_2: bigG shape, CLIPTextModelWithProjection, hidden 48, 4 layers, 3 heads (width 16),
  ffn 72, gelu, projection_dim 40. tokenizer pads with "<|endoftext|>", tokenizer_2 with "!" (id 0), as the real ones.
- SDXL ControlNets: the UNet's encoder with its own random weights; depths (1, 2, 3) (full, like
  diffusers/controlnet-canny-sdxl-1.0 and xinsir's), SDXL_CN_MID = (0, 0, 1) and SDXL_CN_SMALL = (0, 0, 0) (in the
  manner of the -mid / -small checkpoints: attention blocks kept, with fewer or no transformer layers inside).
  conditioning_embedding_out_channels (8, 16, 24, 32): three stride-2 steps, so the original hint block has the
  published indices 0, 2, ..., 14.
- SD2 UNet: levels (32, 64, 128) = CrossAttn, CrossAttn, Down (SD1.5/SD2 shape), heads (2, 4, 8) = width / 16,
  use_linear_projection, cross_attention_dim 48; upcast_attention=True for the v model (as SD2.1-768-v).
- SD2 text_encoder: OpenCLIP ViT-H shape as diffusers keeps it: CLIPTextModel, hidden 48, 3 layers (the original
  file has 4: diffusers drops OpenCLIP's last layer), 3 heads (width 16), ffn 72, gelu. tokenizer pads with "!".
  DDIMScheduler with prediction_type "epsilon" (2.1-base) or "v_prediction" (2.1-768-v).

Head counts are in no single file (OpenCLIP and LDM layouts carry none): in these tiny families every attention
head is 16 wide except CLIP-L's (8 wide, 4 heads), as the real ones are all 64 wide.

Text-encoder configs keep the published quirk bos/eos/pad = 0/2/1 (the configs of openai/clip-vit-large-patch14,
SDXL and SD2 all say so); transformers then pools at argmax(input_ids), which is the real end token (the highest id).
transformers 5 saves CLIPTextModel without the `text_model.` prefix; the published folders have it, so the
text_encoder files are rewritten with it (transformers 5 reads both).

The reference pipelines run as written under transformers 5.25 / diffusers 0.42.1 on CPU in fp32, no workaround
needed (checked for txt2img with one and two ControlNets, the -mid/-small ControlNets, img2img, inpaint, SD2
epsilon and v; tests/test_tiny_families.py runs a few of them):

    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    cn = ControlNetModel.from_pretrained(cn_dir)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(sdxl_dir, controlnet=cn)  # or controlnet=[cn, cn2]
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a cat", image=hint, num_inference_steps=3, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # or output_type="np"
    # StableDiffusionXLControlNetImg2ImgPipeline: image=init, control_image=hint, strength=0.7
    # StableDiffusionXLControlNetInpaintPipeline: image=init, mask_image=mask, control_image=hint, strength=0.9
    # SD2: StableDiffusionControlNetPipeline.from_pretrained(sd2_dir, controlnet=cn, safety_checker=None,
    #                                                         requires_safety_checker=False)

What diffusers computes there (the rules a port must follow, checked to 0.0 in the tests):
- SDXL: context = cat(text_encoder(ids1).hidden_states[-2], text_encoder_2(ids2).hidden_states[-2]) (the
  penultimate layers, no final layer norm), pooled = text_encoder_2(ids2).text_embeds (final layer norm at the first
  end token, then text_projection); with force_zeros_for_empty_prompt and no negative prompt, the negative context and
  pooled are zeros. clip_skip=k takes hidden_states[-(k + 2)] and works under transformers 5.
- SD2: context = text_encoder(ids).last_hidden_state (diffusers' 3-layer encoder = OpenCLIP's penultimate + ln_final).
  The one break: StableDiffusion(ControlNet)Pipeline.encode_prompt(clip_skip=...) raises AttributeError under
  transformers 5 ('CLIPTextModel' object has no attribute 'text_model': the model was flattened), as for SD1.5;
  write the rule out (hidden_states[-(k + 1)], then text_encoder.final_layer_norm), as tests/test_model_parity.py does.

diffusers can read back every single file written here with from_single_file(..., config=<the tiny folder>,
local_files_only=True), except the SDXL ControlNets: its convert_controlnet_checkpoint drops `label_emb`, so the
tests convert those with it and add the four label_emb tensors by diffusers' own name table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tiny import wake_zero_convs, write_tiny_tokenizer

HEAD = 16  # the width of every attention head in these tiny UNets and OpenCLIP encoders

VAE_KW = dict(
    block_out_channels=(16, 32, 32, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=2,
    sample_size=64,
)
HINT_CHANNELS = (8, 16, 24, 32)  # the real (16, 32, 96, 256): three stride-2 steps for a VAE that downsamples by 8

SDXL_TEXT1 = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32)  # fmt: skip
SDXL_TEXT2 = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=48 // HEAD,
                  hidden_act="gelu", projection_dim=40)  # fmt: skip
SDXL_TIME_DIM = 8
SDXL_UNET_KW = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(32 // HEAD, 64 // HEAD, 128 // HEAD),  # diffusers' name for the number of heads
    use_linear_projection=True,
    cross_attention_dim=SDXL_TEXT1["hidden_size"] + SDXL_TEXT2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_DIM,
    projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_TEXT2["projection_dim"],
    norm_num_groups=8,
)
# lighter ControlNets in the manner of diffusers/controlnet-canny-sdxl-1.0-mid / -small (fewer transformer layers than
# the UNet; with 0 an attention block keeps only norm/proj_in/proj_out - diffusers' own -mid detector looks for that)
SDXL_CN_MID = (0, 0, 1)
SDXL_CN_SMALL = (0, 0, 0)

SD2_TEXT = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=48 // HEAD,
                hidden_act="gelu", projection_dim=48)  # fmt: skip
SD2_UNET_KW = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(32 // HEAD, 64 // HEAD, 128 // HEAD),
    use_linear_projection=True,
    cross_attention_dim=SD2_TEXT["hidden_size"],
    norm_num_groups=8,
)

# the published text-encoder configs say bos/eos/pad = 0/2/1 whatever the vocabulary (transformers then pools at argmax)
PUBLISHED_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)


# ------------------------------------------------------------------------------------------------ building blocks
def tokenizer(folder: Path, pad: str = "<|endoftext|>"):
    """The tiny CLIP BPE tokenizer of tests/tiny.py, padding with `pad` ("!" for OpenCLIP's SDXL/SD2 tokenizers)."""
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


def text_config(tok, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, **PUBLISHED_IDS, **kw)


def publish_text_keys(folder: Path) -> None:
    """Give a transformers-5 CLIPTextModel file the `text_model.` prefix the published folders have."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    if not any(k.startswith("text_model.") for k in sd):
        sd = {("" if k.startswith("text_projection") else "text_model.") + k: v for k, v in sd.items()}
        save_file(sd, str(path), metadata={"format": "pt"})


def publish_tokenizer(folder: Path, tok) -> None:
    """The published tokenizer folder: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json.

    (transformers 5 saves a tokenizer.json instead; the SD/SDXL repos have none, and transformers reads either.)
    """
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": tok.pad_token}  # fmt: skip
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special}  # fmt: skip
    (folder / "tokenizer.json").unlink(missing_ok=True)
    write_tiny_tokenizer(folder)  # vocab.json + merges.txt, the files `tok` was made from
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _save_pipeline(pipe, out: Path) -> Path:
    pipe.save_pretrained(str(out))
    for name in ("text_encoder", "text_encoder_2"):
        if (out / name).is_dir():
            publish_text_keys(out / name)
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():
            publish_tokenizer(out / name, getattr(pipe, name))
    return out


def _unet_config(base: Path) -> dict:
    """A UNet config.json from a pipeline folder (base/unet) or a UNet folder."""
    folder = base / "unet" if (base / "unet").is_dir() else base
    return json.loads((folder / "config.json").read_text())


def _controlnet_from_unet_config(ucfg: dict, **overrides):
    """A random diffusers ControlNet with the encoder of this UNet (the way the published ones were configured)."""
    from diffusers import ControlNetModel

    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "upcast_attention", "transformer_layers_per_block",
            "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "norm_num_groups", "only_cross_attention", "class_embed_type")  # fmt: skip
    kw = {k: ucfg[k] for k in keys if k in ucfg and ucfg[k] is not None}
    kw["conditioning_embedding_out_channels"] = HINT_CHANNELS
    kw.update(overrides)
    return ControlNetModel(**kw)


# ------------------------------------------------------------------------------------------------------- SDXL
def make_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline saved with save_pretrained to folder/"sdxl"; returns that folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET_KW)
    vae = AutoencoderKL(**VAE_KW, scaling_factor=0.13025)
    tok = tokenizer(folder / "_tok_sdxl")
    tok2 = tokenizer(folder / "_tok_sdxl", pad="!")
    text = CLIPTextModel(text_config(tok, **SDXL_TEXT1))
    text2 = CLIPTextModelWithProjection(text_config(tok2, **SDXL_TEXT2))
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        interpolation_type="linear", use_karras_sigmas=False, prediction_type="epsilon",
    )  # fmt: skip
    # the published scheduler_config.json also carries these DDIM fields (a DDIM made from it reads them)
    sched.register_to_config(set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    return _save_pipeline(pipe, folder / "sdxl")


def make_sdxl_controlnet(
    folder: Path, unet_folder_or_pipeline: Path, seed: int = 1, transformer_layers_per_block=None, name: str = ""
) -> Path:
    """A tiny diffusers ControlNetModel for the SDXL UNet at `unet_folder_or_pipeline`, saved to folder/name.

    transformer_layers_per_block=None copies the UNet's (full, like controlnet-canny-sdxl-1.0 and xinsir's); pass
    SDXL_CN_MID or SDXL_CN_SMALL for the lighter ones. The name defaults to "cn-sdxl" / "cn-sdxl-0-0-1" etc.
    """
    ucfg = _unet_config(Path(unet_folder_or_pipeline))
    depth = transformer_layers_per_block
    over = {} if depth is None else {"transformer_layers_per_block": depth}
    torch.manual_seed(seed)
    cn = _controlnet_from_unet_config(ucfg, **over)
    wake_zero_convs(cn, seed + 100)
    if not name:
        name = "cn-sdxl" + ("" if depth is None else "-" + "-".join(map(str, depth)))
    cn.save_pretrained(str(folder / name))
    return folder / name


def sdxl_with_reference(folder: Path, pipeline: str, **options):
    """(our tiny SDXL base, our ControlNet, diffusers' `pipeline` class on the same files) for SDXL parity tests."""
    import diffusers

    from cldm.io import checkpoints

    pipe_dir = make_sdxl_pipeline(folder)
    cn_dir = make_sdxl_controlnet(folder, pipe_dir, seed=1)
    sd = checkpoints.load_sd(pipe_dir)
    cn = diffusers.ControlNetModel.from_pretrained(cn_dir)
    ref = getattr(diffusers, pipeline).from_pretrained(pipe_dir, controlnet=cn, **options)
    ref.set_progress_bar_config(disable=True)
    return sd, checkpoints.load_controlnet(cn_dir, base=sd.config.unet), ref


def sdxl_embedding_file(out_path: Path, n_vectors: int = 2, seed: int = 0) -> Path:
    """An SDXL textual inversion in the published layout: safetensors {"clip_l": (n, 32), "clip_g": (n, 48)}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {
        "clip_l": torch.randn(n_vectors, SDXL_TEXT1["hidden_size"], generator=g) * 0.02,
        "clip_g": torch.randn(n_vectors, SDXL_TEXT2["hidden_size"], generator=g) * 0.02,
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path))
    return Path(out_path)


# -------------------------------------------------------------------------------------------------------- SD2
def make_sd2_pipeline(folder: Path, seed: int = 0, prediction: str = "epsilon") -> Path:
    """A tiny SD2 StableDiffusionPipeline saved to folder/"sd2" (epsilon, like 2.1-base) or folder/"sd2-v"."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert prediction in ("epsilon", "v_prediction"), prediction
    v = prediction == "v_prediction"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD2_UNET_KW, upcast_attention=v)
    vae = AutoencoderKL(**VAE_KW, scaling_factor=0.18215)
    tok = tokenizer(folder / "_tok_sd2", pad="!")
    text = CLIPTextModel(text_config(tok, **SD2_TEXT))
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return _save_pipeline(pipe, folder / ("sd2-v" if v else "sd2"))


def make_sd2_controlnet(folder: Path, unet_folder_or_pipeline: Path, seed: int = 1, name: str = "") -> Path:
    """A tiny diffusers ControlNetModel for the SD2 UNet at `unet_folder_or_pipeline` (its upcast_attention too)."""
    ucfg = _unet_config(Path(unet_folder_or_pipeline))
    torch.manual_seed(seed)
    cn = _controlnet_from_unet_config(ucfg)
    wake_zero_convs(cn, seed + 100)
    name = name or ("cn-sd2-v" if ucfg.get("upcast_attention") else "cn-sd2")
    cn.save_pretrained(str(folder / name))
    return folder / name


# ---------------------------------------------------------------------------------------- original single files
# diffusers name -> original name, written from the published conversion rules (diffusers' scripts
# convert_diffusers_to_original_{sdxl,stable_diffusion}.py), generalised to any number of levels and blocks.
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    return _load(folder / f"{stem}.safetensors")


def _rename(sd: dict, prefixes: dict[str, str], inner: dict[str, dict[str, str]] | None = None) -> dict:
    """Map every key by its longest matching diffusers prefix; `inner[new_prefix]` renames the next name part."""
    out = {}
    order = sorted(prefixes, key=len, reverse=True)
    for key, value in sd.items():
        src = next((p for p in order if key.startswith(p)), None)
        if src is None:
            raise KeyError(f"no original name for {key}")
        dst, rest = prefixes[src], key[len(src) :]
        table = (inner or {}).get(dst)
        if table:
            head, _, tail = rest.partition(".")
            rest = table.get(head, head) + ("." + tail if tail else "")
        assert dst + rest not in out, f"two weights named {dst + rest}"
        out[dst + rest] = value
    return out


def _encoder_prefixes(cfg: dict) -> tuple[dict, dict]:
    """conv_in, the time/label embeddings, input_blocks and middle_block (shared by the UNet and the ControlNet)."""
    lpb = cfg["layers_per_block"]
    assert isinstance(lpb, int), "per-level layers_per_block has no original layout"
    p = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
         "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
         "add_embedding.linear_2.": "label_emb.0.2.", "class_embedding.linear_1.": "label_emb.0.0.",
         "class_embedding.linear_2.": "label_emb.0.2."}  # fmt: skip
    resnets = []
    n = 1
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            p[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            resnets.append(f"input_blocks.{n}.0.")
            if kind.startswith("CrossAttn"):
                p[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
            n += 1
        if i < len(cfg["down_block_types"]) - 1:
            p[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{n}.0.op."
            n += 1
    p |= {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
          "mid_block.resnets.1.": "middle_block.2."}  # fmt: skip
    resnets += ["middle_block.0.", "middle_block.2."]
    return p, {r: RESNET for r in resnets}


def unet_to_original(sd: dict, cfg: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict -> LDM/SGM `model.diffusion_model` names (without the prefix)."""
    p, inner = _encoder_prefixes(cfg)
    lpb = cfg["layers_per_block"]
    n = 0
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(lpb + 1):
            p[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            inner[f"output_blocks.{n}.0."] = RESNET
            if attn:
                p[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
            n += 1
        if i < len(cfg["up_block_types"]) - 1:  # the upsampler follows the level's last block
            p[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{n - 1}.{2 if attn else 1}.conv."
    p |= {"conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    return _rename(sd, p, inner)


def controlnet_to_original(sd: dict, cfg: dict) -> dict:
    """A diffusers ControlNetModel state dict -> the original ControlNet names (input_hint_block, zero_convs, ...)."""
    p, inner = _encoder_prefixes(cfg)
    n_hint = 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)  # diffusers' blocks: two convs a step
    p["controlnet_cond_embedding.conv_in."] = "input_hint_block.0."
    for k in range(n_hint):
        p[f"controlnet_cond_embedding.blocks.{k}."] = f"input_hint_block.{2 * k + 2}."
    p["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{2 * n_hint + 2}."
    n_zero = 1 + len(cfg["down_block_types"]) * cfg["layers_per_block"] + len(cfg["down_block_types"]) - 1
    for i in range(n_zero):
        p[f"controlnet_down_blocks.{i}."] = f"zero_convs.{i}.0."
    p["controlnet_mid_block."] = "middle_block_out.0."
    return _rename(sd, p, inner)


def vae_to_original(sd: dict, cfg: dict) -> dict:
    """A diffusers AutoencoderKL state dict -> the original `first_stage_model` names; mid attention as 1x1 convs."""
    levels = len(cfg["block_out_channels"])
    p = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        p[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for k in range(2):
            p[f"{part}.mid_block.resnets.{k}."] = f"{part}.mid.block_{k + 1}."
    for i in range(levels):
        for j in range(cfg["layers_per_block"]):
            p[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        p[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        up = levels - 1 - i  # the decoder's levels are numbered from the bottom in the original
        for j in range(cfg["layers_per_block"] + 1):
            p[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        p[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.",
                 "post_quant_conv."):  # fmt: skip
        p[name] = name
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    inner = {v: {"conv_shortcut": "nin_shortcut"} for k, v in p.items() if ".resnets." in k}
    inner |= {f"{part}.mid.attn_1.": attn for part in ("encoder", "decoder")}
    out = _rename(sd, p, inner)
    fixed = {}
    for k, v in out.items():
        k = k.replace(".proj_out.0.", ".proj_out.")  # diffusers' to_out is a ModuleList: to_out.0
        if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            v = v.reshape(*v.shape, 1, 1)  # Linear (c, c) -> 1x1 conv (c, c, 1, 1)
        fixed[k] = v
    return fixed


def _strip_text_model(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def hf_clip_to_original(sd: dict) -> dict:
    """CLIP-L in the HF layout the original files keep (`transformer.text_model.*` under their prefix)."""
    out = {"text_model." + k: v for k, v in _strip_text_model(sd).items() if not k.startswith("text_projection")}
    n = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)  # a buffer the published files carry
    return out


def hf_clip_to_open_clip(sd: dict) -> dict:
    """A transformers CLIP text model -> OpenCLIP names: q/k/v stacked, text_projection as (width, proj)."""
    sd = _strip_text_model(sd)
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()  # nn.Linear (proj, w) -> x @ P (w, proj)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [sd[f"{src}self_attn.{c}_proj.{part}"] for c in "qkv"]
            out[f"{dst}attn.in_proj_{part}"] = torch.cat(qkv)
            for a, b in names.items():
                out[f"{dst}{b}.{part}"] = sd[f"{src}{a}.{part}"]
    used = {f"encoder.layers.{i}.{a}.{p}" for i in layers for a in [*names, *(f"self_attn.{c}_proj" for c in "qkv")]
            for p in ("weight", "bias")}  # fmt: skip
    left = set(sd) - used - {"embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                             "final_layer_norm.weight", "final_layer_norm.bias", "text_projection.weight",
                             "embeddings.position_ids"}  # fmt: skip
    assert not left, f"text weights without an OpenCLIP name: {sorted(left)}"
    return out


def random_resblock(like: dict, index: int, seed: int) -> dict:
    """One more OpenCLIP resblock with the shapes of resblock 0 and random weights (norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in like.items():
        if k.startswith("transformer.resblocks.0."):
            name = k.replace("transformer.resblocks.0.", f"transformer.resblocks.{index}.")
            noise = torch.randn(v.shape, generator=g) * 0.02
            out[name] = (1 + noise) if (".ln_" in k and k.endswith("weight")) else noise
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _save(state: dict, out_path: Path) -> Path:
    from safetensors.torch import save_file

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path))
    return out_path


def _unet_vae(pipe: Path) -> dict:
    unet = unet_to_original(_weights(pipe / "unet", "diffusion_pytorch_model"), _config(pipe / "unet"))
    vae = vae_to_original(_weights(pipe / "vae", "diffusion_pytorch_model"), _config(pipe / "vae"))
    return {**{"model.diffusion_model." + k: v for k, v in unet.items()},
            **{"first_stage_model." + k: v for k, v in vae.items()}}  # fmt: skip


def sdxl_single_file(pipeline_folder: Path, out_path: Path) -> Path:
    """The SGM single file (sd_xl_base_1.0.safetensors layout) of a diffusers SDXL folder."""
    pipe = Path(pipeline_folder)
    state = _unet_vae(pipe)
    clip_l = hf_clip_to_original(_weights(pipe / "text_encoder", "model"))
    state |= {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()}
    clip_g = hf_clip_to_open_clip(_weights(pipe / "text_encoder_2", "model"))
    clip_g["logit_scale"] = torch.tensor(math.log(100.0))
    state |= {"conditioner.embedders.1.model." + k: v for k, v in clip_g.items()}
    return _save(state, out_path)


def ddpm_buffers(cfg: dict) -> dict:
    """The noise-schedule buffers LDM checkpoints carry (betas, alphas_cumprod, ...), from a scheduler config."""
    n = cfg.get("num_train_timesteps", 1000)
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    out = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": ac.rsqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var, "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac),
    }  # fmt: skip
    return {k: v.float() for k, v in out.items()}


def sd2_single_file(pipeline_folder: Path, out_path: Path, seed: int = 7) -> Path:
    """The LDM single file (v2-1_*.safetensors layout) of a diffusers SD2 folder.

    The OpenCLIP text model gets one more resblock than the diffusers encoder (random weights, unused by the
    reference, as the real file's 24th layer), a random text_projection (width, width) and logit_scale; the schedule
    buffers (betas, alphas_cumprod, ...) are written as LDM checkpoints carry them.
    """
    pipe = Path(pipeline_folder)
    state = _unet_vae(pipe)
    text = hf_clip_to_open_clip(_weights(pipe / "text_encoder", "model"))
    n = _config(pipe / "text_encoder")["num_hidden_layers"]
    text |= random_resblock(text, n, seed)
    width = text["positional_embedding"].shape[1]
    text["text_projection"] = torch.randn(width, width, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    text["logit_scale"] = torch.tensor(math.log(100.0))
    state |= {"cond_stage_model.model." + k: v for k, v in text.items()}
    state |= ddpm_buffers(json.loads((pipe / "scheduler" / "scheduler_config.json").read_text()))
    return _save(state, out_path)


def controlnet_single_file(controlnet_folder: Path, out_path: Path, prefix: str = "control_model.") -> Path:
    """A diffusers ControlNet in the original layout (input_hint_block, zero_convs, middle_block_out, ...).

    prefix "control_model." as in the lllyasviel-style files; "" as thibaud's controlnet-sd21 files.
    """
    folder = Path(controlnet_folder)
    state = controlnet_to_original(_weights(folder, "diffusion_pytorch_model"), _config(folder))
    return _save({prefix + k: v for k, v in state.items()}, out_path)
