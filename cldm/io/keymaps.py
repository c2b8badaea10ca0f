"""Key mapping between our (original LDM/ControlNet) names and the diffusers names, built from a config.

Pure tables and renames, no file access: `checkpoints.py` reads and `writers.py` writes diffusers folders through
them. Original-format files need no table at all, only one prefix stripped.
"""

from __future__ import annotations

import torch

from cldm.models.config import UNetConfig, VAEConfig

StateDict = dict[str, torch.Tensor]

# ResBlock internals: ours (LDM) -> diffusers.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers VAE attention names, accepted when reading.
VAE_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _encoder_modules(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """Module prefix (ours) -> (diffusers prefix, internal renames) for the encoder half and the time embedding."""
    m: dict[str, tuple[str, dict[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", {}),
        "time_embed.2": ("time_embedding.linear_2", {}),
        "input_blocks.0.0": ("conv_in", {}),
        "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", {}),
        "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
    }
    if cfg.adm_in_channels:  # SDXL's vector conditioning
        m["label_emb.0.0"] = ("add_embedding.linear_1", {})
        m["label_emb.0.2"] = ("add_embedding.linear_2", {})
    per_level = cfg.num_res_blocks + 1
    for level in range(len(cfg.channel_mult)):
        for j in range(cfg.num_res_blocks):
            idx = 1 + level * per_level + j
            m[f"input_blocks.{idx}.0"] = (f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if level in cfg.attention_levels:
                m[f"input_blocks.{idx}.1"] = (f"down_blocks.{level}.attentions.{j}", {})
        if level != len(cfg.channel_mult) - 1:
            m[f"input_blocks.{(level + 1) * per_level}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", {})
    return m


def unet_modules(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    m = _encoder_modules(cfg)
    levels = len(cfg.channel_mult)
    per_level = cfg.num_res_blocks + 1
    for up in range(levels):
        level = levels - 1 - up
        attn = level in cfg.attention_levels
        for j in range(per_level):
            idx = up * per_level + j
            m[f"output_blocks.{idx}.0"] = (f"up_blocks.{up}.resnets.{j}", _UNET_RESNET)
            if attn:
                m[f"output_blocks.{idx}.1"] = (f"up_blocks.{up}.attentions.{j}", {})
            if level and j == cfg.num_res_blocks:
                m[f"output_blocks.{idx}.{2 if attn else 1}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", {})
    m["out.0"] = ("conv_norm_out", {})
    m["out.2"] = ("conv_out", {})
    return m


def controlnet_modules(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    m = _encoder_modules(cfg)
    n_hint = len(cfg.hint_block_channels)
    m["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", {})
    for k in range(2 * (n_hint - 1)):
        m[f"input_hint_block.{2 * k + 2}"] = (f"controlnet_cond_embedding.blocks.{k}", {})
    m[f"input_hint_block.{4 * (n_hint - 1) + 2}"] = ("controlnet_cond_embedding.conv_out", {})
    n_blocks = 1 + len(cfg.channel_mult) * (cfg.num_res_blocks + 1) - 1
    for k in range(n_blocks):
        m[f"zero_convs.{k}.0"] = (f"controlnet_down_blocks.{k}", {})
    m["middle_block_out.0"] = ("controlnet_mid_block", {})
    return m


def vae_modules(cfg: VAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    levels = len(cfg.channel_mult)
    m: dict[str, tuple[str, dict[str, str]]] = {}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RESNET)
        m[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RESNET)
        m[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTN)
        m[f"{part}.norm_out"] = (f"{part}.conv_norm_out", {})
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            m[f"encoder.down.{level}.block.{j}"] = (f"encoder.down_blocks.{level}.resnets.{j}", _VAE_RESNET)
        if level != levels - 1:
            m[f"encoder.down.{level}.downsample.conv"] = (f"encoder.down_blocks.{level}.downsamplers.0.conv", {})
        up = levels - 1 - level  # diffusers counts decoder stages from the deepest
        for j in range(cfg.num_res_blocks + 1):
            m[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET)
        if level != 0:
            m[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {})
    return m


def rename(key: str, modules: dict[str, tuple[str, dict[str, str]]]) -> str:
    """One of our keys -> its diffusers name (keys outside the table keep their name)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            target, inner = modules[prefix]
            rest = ".".join(parts[cut:])
            for ours, theirs in inner.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours) :]
                    break
            return f"{target}.{rest}"
    return key


def key_table(our_keys, modules: dict[str, tuple[str, dict[str, str]]]) -> dict[str, str]:
    """Our key -> diffusers key, for every key of a model."""
    return {k: rename(k, modules) for k in our_keys}


def is_vae_attn_linear(diffusers_key: str) -> bool:
    """VAE attention projections are 1x1 convs in the original and Linear layers in diffusers."""
    return (
        ".mid_block.attentions." in diffusers_key
        and diffusers_key.endswith(".weight")
        and "group_norm" not in diffusers_key
    )


def from_diffusers(state: StateDict, modules: dict, our_keys: list[str]) -> StateDict:
    """Rename diffusers keys to ours; unknown keys keep their names (and then fail the strict load)."""
    inverse = {theirs: ours for ours, theirs in key_table(our_keys, modules).items()}
    out: StateDict = {}
    for key, value in state.items():
        for old, new in VAE_ATTN_LEGACY.items():
            key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
        if is_vae_attn_linear(key) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (c, c) -> 1x1 conv (c, c, 1, 1)
        out[inverse.get(key, key)] = value
    return out


def to_diffusers(state: StateDict, modules: dict) -> StateDict:
    """Rename our keys to diffusers'; the VAE attention's 1x1 convs become Linear weights."""
    out: StateDict = {}
    for key, value in state.items():
        theirs = rename(key, modules)
        if is_vae_attn_linear(theirs) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[theirs] = value
    return out


# ------------------------------------------------------------------------------------------- OpenCLIP text towers
# SD2's text encoder (`cond_stage_model.model.*`) and SDXL's second one (`conditioner.embedders.1.model.*`) are
# OpenCLIP text towers in the original files; diffusers, transformers and we hold them as CLIP text models. The
# tower's attention keeps q, k and v in one `in_proj` matrix, and its `text_projection` is applied as x @ P, so the
# Linear layer's weight is P transposed.
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}  # fmt: skip
_OPEN_CLIP_SKIP = ("logit_scale", "attn_mask")  # the contrastive loss's temperature; a constant mask
HF_TEXT = "transformer.text_model."  # our (and the SD1.5 file's) prefix of a CLIP text model's keys


def open_clip_layers(state: StateDict) -> int:
    """The number of transformer layers (resblocks) of an OpenCLIP text tower's state dict."""
    return len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})


def from_open_clip(state: StateDict, layers: int | None = None) -> StateDict:
    """An OpenCLIP text tower (keys without the `model.` prefix) -> our text encoder's keys; only the first `layers`
    transformer layers are kept when given (SD2 reads the penultimate layer: its last layer is never used)."""
    out: StateDict = {}
    keep = open_clip_layers(state) if layers is None else layers
    for key, v in state.items():
        if key in _OPEN_CLIP_SKIP:
            continue
        if key == "token_embedding.weight":
            out[HF_TEXT + "embeddings.token_embedding.weight"] = v
        elif key == "positional_embedding":
            out[HF_TEXT + "embeddings.position_embedding.weight"] = v
        elif key.startswith("ln_final."):
            out[HF_TEXT + "final_layer_norm." + key.split(".", 1)[1]] = v
        elif key == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            _, _, i, rest = key.split(".", 3)
            if int(i) >= keep:
                continue
            layer = f"{HF_TEXT}encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            for theirs, ours in _OPEN_CLIP_LAYER.items():
                if rest.startswith(theirs + "."):
                    out[layer + ours + rest[len(theirs) :]] = v
                    break
            else:
                out[key] = v  # unknown: kept, so the strict load names it
        else:
            out[key] = v
    return out


def to_open_clip(state: StateDict) -> StateDict:
    """Our text encoder's keys -> an OpenCLIP text tower's (the inverse of `from_open_clip`)."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
            continue
        rest = key.removeprefix(HF_TEXT)
        if rest == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif rest == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif rest.startswith("final_layer_norm."):
            out["ln_final." + rest.split(".", 1)[1]] = v
        elif rest.startswith("encoder.layers."):
            _, _, i, inner = rest.split(".", 3)
            layer = f"transformer.resblocks.{i}."
            if inner.startswith("self_attn.") and inner.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = inner.split(".")
                qkv.setdefault(f"{layer}attn.in_proj_{kind}", {})[proj] = v
                continue
            for theirs, ours in _OPEN_CLIP_LAYER.items():
                if inner.startswith(ours + "."):
                    out[layer + theirs + inner[len(ours) :]] = v
                    break
        elif rest != "embeddings.position_ids":
            out[key] = v
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out
