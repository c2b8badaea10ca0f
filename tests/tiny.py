"""Tiny random models written in the real formats by diffusers/transformers themselves (the reference)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from cldm.io.tokenizer import bytes_to_unicode

# A diffusers-style tiny SD with the SD1.5 shape: three levels, attention on all but the deepest, 2 blocks each.
UNET_KW = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
CONTROLNET_KW = dict(
    in_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
    conditioning_embedding_out_channels=(16, 32),  # one stride-2 step, as the tiny VAE downsamples by 2
)
VAE_KW = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
)


def write_tiny_tokenizer(folder: Path, n_merges: int = 300) -> int:
    """A real CLIP BPE tokenizer with a small vocabulary: the byte alphabet plus the first merges of CLIP's list."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1 : n_merges + 1]
    alphabet = bytes_to_unicode()
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(folder)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def text_config(tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def wake_zero_convs(controlnet, seed: int = 1, std: float = 0.1) -> None:
    """Give a fresh diffusers ControlNet non-zero zero convs, so parity tests compare something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_diffusers_pipeline(folder: Path, seed: int = 0):
    """Write a tiny SD pipeline folder + ControlNet folder with diffusers; returns (folder, controlnet_folder)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_KW)
    vae = AutoencoderKL(**VAE_KW)
    tok = tiny_tokenizer(folder / "_tok")
    text = CLIPTextModel(text_config(tok))
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(folder / "sd"))
    cn = ControlNetModel(**CONTROLNET_KW)
    wake_zero_convs(cn, seed + 1)
    cn.save_pretrained(str(folder / "cn"))
    return folder / "sd", folder / "cn"


# ------------------------------------------------------------------------------------------------- IP-Adapter
# A tiny CLIP image encoder (CLIPVisionModelWithProjection) and IP-Adapter weights in the published key layout.
ENC = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
           patch_size=8, projection_dim=24)  # fmt: skip


def write_image_encoder(folder: Path) -> Path:
    """A tiny CLIP image encoder folder written by transformers (config.json + model.safetensors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENC)).save_pretrained(str(folder))
    return folder


def adapter_state(unet, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the published files' key names and shapes, for this UNet."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    layers = unet.cross_attentions()
    ctx = layers[0].to_k.in_features
    state = {}
    for i, attn in enumerate(layers):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rnd(attn.to_q.out_features, ctx)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rnd(attn.to_q.out_features, ctx)
    if kind == "plain":
        state |= {"image_proj.proj.weight": rnd(4 * ctx, ENC["projection_dim"]), "image_proj.proj.bias": rnd(4 * ctx),
                  "image_proj.norm.weight": 1 + rnd(ctx), "image_proj.norm.bias": rnd(ctx)}  # fmt: skip
        return state
    hidden, tokens, inner = 64, 16, 256  # one 64-wide head (the files' heads = rows / 64), 4x feed-forward
    state |= {"image_proj.latents": rnd(1, tokens, hidden), "image_proj.proj_in.weight": rnd(hidden, ENC["hidden_size"]),
              "image_proj.proj_in.bias": rnd(hidden), "image_proj.proj_out.weight": rnd(ctx, hidden),
              "image_proj.proj_out.bias": rnd(ctx), "image_proj.norm_out.weight": 1 + rnd(ctx),
              "image_proj.norm_out.bias": rnd(ctx)}  # fmt: skip
    for layer in range(4):  # the published depth (diffusers assumes it)
        p = f"image_proj.layers.{layer}"
        state |= {f"{p}.0.norm1.weight": 1 + rnd(hidden), f"{p}.0.norm1.bias": rnd(hidden),
                  f"{p}.0.norm2.weight": 1 + rnd(hidden), f"{p}.0.norm2.bias": rnd(hidden),
                  f"{p}.0.to_q.weight": rnd(hidden, hidden), f"{p}.0.to_kv.weight": rnd(2 * hidden, hidden),
                  f"{p}.0.to_out.weight": rnd(hidden, hidden), f"{p}.1.0.weight": 1 + rnd(hidden),
                  f"{p}.1.0.bias": rnd(hidden), f"{p}.1.1.weight": rnd(inner, hidden),
                  f"{p}.1.3.weight": rnd(hidden, inner)}  # fmt: skip
    return state


def nested_adapter(state):
    """The .bin layout: {"image_proj": {...}, "ip_adapter": {...}}."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in state.items():
        part, rest = k.split(".", 1)
        out[part][rest] = v
    return out


def lora_state(sd, seed: int = 0, rank: int = 4) -> dict:
    """A kohya-named LoRA over every layer a LoRA may change in `sd` (random weights, alpha = rank / 2)."""
    import torch

    from cldm.adapters import lora

    g = torch.Generator().manual_seed(seed)
    params = {"unet": sd.unet.state_dict(), "text": sd.text.state_dict()}
    out = {}
    for name, (part, key) in lora.targets(sd).items():
        if not name.startswith("lora_"):
            continue
        w = params[part][key]
        out[f"{name}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = (
            torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        )
        out[f"{name}.alpha"] = torch.tensor(rank / 2)
    return out
