"""Model configs from weight shapes and from diffusers config.json files (no file access here)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from cldm.errors import CheckpointError, MissingWeightsError
from cldm.models.config import TextConfig, UNetConfig, VAEConfig

CONFIG_METADATA_KEY = "cldm.config"  # a file-format key, not a module path: our safetensors files carry their config in the header metadata

StateDict = dict


def infer_unet_config(state: StateDict, base: UNetConfig | None = None) -> UNetConfig:
    """Channels, levels, blocks, attention and context width of an original-format UNet/ControlNet from its shapes.

    Head count and GroupNorm groups cannot be seen in shapes: they come from `base` (SD1.5 defaults).
    """
    base = base or UNetConfig()
    try:
        conv_in = state["input_blocks.0.0.weight"]
    except KeyError as e:
        raise CheckpointError("No `input_blocks.0.0.weight`: this is not an SD UNet or ControlNet.") from e
    mc = conv_in.shape[0]
    mults, attn_levels, nrb, level, count, depth, context = [], [], 0, 0, 0, base.transformer_depth, base.context_dim
    k = 1
    linear = base.use_linear_in_transformer
    while f"input_blocks.{k}.0.op.weight" in state or f"input_blocks.{k}.0.in_layers.0.weight" in state:
        if f"input_blocks.{k}.0.op.weight" in state:
            nrb, level, count = count, level + 1, 0
        else:
            if count == 0:
                mults.append(state[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] // mc)
            count += 1
            if f"input_blocks.{k}.1.proj_in.weight" in state:
                if level not in attn_levels:
                    attn_levels.append(level)
                depth = len(
                    {key.split(".")[4] for key in state if key.startswith(f"input_blocks.{k}.1.transformer_blocks.")}
                )
                context = state[f"input_blocks.{k}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                linear = state[f"input_blocks.{k}.1.proj_in.weight"].ndim == 2
        k += 1
    nrb = nrb or count
    hint = [state[f"input_hint_block.{i}.weight"] for i in range(0, 64, 2) if f"input_hint_block.{i}.weight" in state]
    extra = {}
    if hint:
        extra = dict(hint_channels=hint[0].shape[1], hint_block_channels=tuple(h.shape[0] for h in hint[:-1:2]))
    out = state.get("out.2.weight")
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=out.shape[0] if out is not None else base.out_channels,
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=nrb,
        attention_levels=tuple(attn_levels),
        num_heads=base.num_heads,
        transformer_depth=depth,
        context_dim=context,
        norm_groups=base.norm_groups,
        use_linear_in_transformer=linear,
        global_average_pooling=base.global_average_pooling,
        **extra,
    )


def infer_vae_config(state: StateDict, base: VAEConfig | None = None) -> VAEConfig:
    base = base or VAEConfig()
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
    mults = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    nrb = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    return VAEConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        z_channels=state["decoder.conv_in.weight"].shape[1],
        base_channels=ch,
        channel_mult=mults,
        num_res_blocks=nrb,
        norm_groups=base.norm_groups,
        scale_factor=base.scale_factor,
    )


def infer_text_config(state: StateDict) -> TextConfig:
    p = "transformer.text_model."
    tok = state[p + "embeddings.token_embedding.weight"]
    layers = len({k.split(".")[4] for k in state if k.startswith(p + "encoder.layers.")})
    return TextConfig(
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        intermediate_size=state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=max(1, tok.shape[1] // 64),  # CLIP uses 64-wide heads
        max_length=state[p + "embeddings.position_embedding.weight"].shape[0],
    )


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    boc = cfg["block_out_channels"]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' SD1.5 naming quirk
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise CheckpointError(f"Per-level head counts {heads} are not supported (SD1.5 uses one count).")
        heads = heads[0]
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        depth = depth[0]
    fields_ = dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_levels=tuple(i for i, t in enumerate(cfg["down_block_types"]) if "CrossAttn" in t),
        num_heads=heads,
        transformer_depth=depth,
        context_dim=cfg.get("cross_attention_dim", 768),
        norm_groups=cfg.get("norm_num_groups", 32),
        use_linear_in_transformer=cfg.get("use_linear_projection", False),
        hint_channels=cfg.get("conditioning_channels", 3),
        hint_block_channels=tuple(cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
        global_average_pooling=cfg.get("global_pool_conditions", False),
    )
    return UNetConfig(**fields_)


def unet_config_to_diffusers(cfg: UNetConfig, controlnet: bool) -> dict:
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    out = dict(
        _class_name="ControlNetModel" if controlnet else "UNet2DConditionModel",
        in_channels=cfg.in_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        down_block_types=down,
        attention_head_dim=cfg.num_heads,
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=cfg.transformer_depth,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if controlnet:
        out.update(
            conditioning_channels=cfg.hint_channels,
            conditioning_embedding_out_channels=list(cfg.hint_block_channels),
            global_pool_conditions=cfg.global_average_pooling,
        )
    else:
        up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)]
        out.update(out_channels=cfg.out_channels, up_block_types=up, sample_size=64)
    return out


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    boc = cfg["block_out_channels"]
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        z_channels=cfg.get("latent_channels", 4),
        base_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        norm_groups=cfg.get("norm_num_groups", 32),
        scale_factor=cfg.get("scaling_factor", VAEConfig.scale_factor),
    )


def text_config_from_diffusers(cfg: dict) -> TextConfig:
    return TextConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        max_length=cfg.get("max_position_embeddings", 77),
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        bos_token_id=cfg.get("bos_token_id", 49406),
        eos_token_id=cfg.get("eos_token_id", 49407),
        pad_token_id=cfg.get("pad_token_id", 49407),
    )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    levels = len(cfg.channel_mult)
    return dict(
        _class_name="AutoencoderKL",
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.z_channels,
        block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_groups,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        scaling_factor=cfg.scale_factor,
        sample_size=512,
    )


# ----------------------------------------------------------------------------------------- config files
def config_file(parse, path: Path):
    """A diffusers config.json through one of the `model_configs` parsers; missing fields are a CheckpointError."""
    try:
        return parse(read_json(path))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path} is not a usable diffusers config ({type(e).__name__}: {e}).") from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MissingWeightsError(f"{path} is missing.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e


def config_from_metadata(meta: dict[str, str], cls, section: str):
    """A config written into our safetensors metadata (under `CONFIG_METADATA_KEY`), or None."""
    if CONFIG_METADATA_KEY not in meta:
        return None
    data = json.loads(meta[CONFIG_METADATA_KEY]).get(section)
    if data is None:
        return None
    return cls(
        **{
            f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
            for f in fields(cls)
            if f.name in data
        }
    )
