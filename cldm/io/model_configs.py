"""Model configs from weight shapes and from diffusers config.json files (no file access here)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from cldm.errors import CheckpointError, MissingWeightsError
from cldm.models.config import TextConfig, UNetConfig, VAEConfig

CONFIG_METADATA_KEY = "cldm.config"  # a file-format key, not a module path: our safetensors files carry their config in the header metadata

StateDict = dict


# The head width of the families whose UNets fix it (SD2.x, SDXL: 64); shapes cannot tell heads apart.
HEAD_CHANNELS = 64


def hint_fields(state: StateDict) -> dict:
    """A ControlNet's hint-block config fields from its `input_hint_block.*` convolutions (every other one widens);
    empty when there is no hint block."""
    hint = [state[f"input_hint_block.{i}.weight"] for i in range(0, 64, 2) if f"input_hint_block.{i}.weight" in state]
    if not hint:
        return {}
    return dict(hint_channels=hint[0].shape[1], hint_block_channels=tuple(h.shape[0] for h in hint[:-1:2]))


def infer_unet_config(state: StateDict, base: UNetConfig | None = None) -> UNetConfig:
    """Channels, levels, blocks, attention (levels and depth per level), context width, projection style and vector
    conditioning of an original-format UNet/ControlNet from its shapes.

    Head counts and GroupNorm groups cannot be seen in shapes: they come from `base` when it has the same projection
    style (the UNet a ControlNet will drive), else from the family's rule (SD1.5: 8 heads; linear projections, SD2
    and SDXL: 64-wide heads).
    """
    try:
        conv_in = state["input_blocks.0.0.weight"]
    except KeyError as e:
        raise CheckpointError("No `input_blocks.0.0.weight`: this is not an SD UNet or ControlNet.") from e
    mc = conv_in.shape[0]
    mults, attn_levels, depths, nrb, level, count = [], [], {}, 0, 0, 0
    context, linear = (base or UNetConfig()).context_dim, (base or UNetConfig()).use_linear_in_transformer
    k = 1
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
                depths[level] = _blocks(state, f"input_blocks.{k}.1.transformer_blocks.")
                context = state[f"input_blocks.{k}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                linear = state[f"input_blocks.{k}.1.proj_in.weight"].ndim == 2
        k += 1
    nrb = nrb or count
    middle = _blocks(state, "middle_block.1.transformer_blocks.")
    levels = len(mults)
    per_level = tuple(depths.get(i, 0) for i in range(levels))
    same = set(depths.values()) <= {middle}
    depth: int | tuple[int, ...] = middle if same else per_level
    if not same and per_level[-1] != middle:  # the middle block follows the deepest level's count (SGM's rule)
        depth = (*per_level[:-1], middle) if per_level[-1] == 0 else per_level
    extra = hint_fields(state)
    out = state.get("out.2.weight")
    label = state.get("label_emb.0.0.weight")
    heads = base if base is not None and base.use_linear_in_transformer == linear else None
    d = base or UNetConfig()
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=out.shape[0] if out is not None else d.out_channels,
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=nrb,
        attention_levels=tuple(attn_levels),
        num_heads=heads.num_heads if heads else UNetConfig.num_heads,
        head_channels=heads.head_channels if heads else (HEAD_CHANNELS if linear else 0),
        upcast_attention=d.upcast_attention,
        transformer_depth=depth,
        context_dim=context,
        norm_groups=d.norm_groups,
        use_linear_in_transformer=linear,
        adm_in_channels=0 if label is None else label.shape[1],
        global_average_pooling=d.global_average_pooling,
        **extra,
    )


def _blocks(state: StateDict, prefix: str) -> int:
    """How many transformer blocks are numbered under `prefix`."""
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


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


def infer_text_config(state: StateDict, hidden_act: str = "quick_gelu", heads: int | None = None) -> TextConfig:
    """A CLIP text tower's config from our keys' shapes. The activation cannot be seen (CLIP ViT-L: quick_gelu;
    OpenCLIP's towers: gelu); heads are 64 wide unless `heads` says otherwise."""
    p = "transformer.text_model."
    tok = state[p + "embeddings.token_embedding.weight"]
    layers = len({k.split(".")[4] for k in state if k.startswith(p + "encoder.layers.")})
    proj = state.get("text_projection.weight")
    return TextConfig(
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        intermediate_size=state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=heads or max(1, tok.shape[1] // 64),  # CLIP uses 64-wide heads
        max_length=state[p + "embeddings.position_embedding.weight"].shape[0],
        hidden_act=hidden_act,
        projection_dim=0 if proj is None else proj.shape[0],
    )


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    boc = cfg["block_out_channels"]
    levels = len(boc)
    # diffusers' SD configs call the head count `attention_head_dim` (a naming quirk); one count, or one per level
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    head_channels, num_heads = 0, heads
    if isinstance(heads, (list, tuple)):
        widths = {w // h for w, h in zip(boc, heads)}
        if len(set(heads)) == 1:
            num_heads = heads[0]
        elif len(widths) == 1:  # SD2, SDXL: the head width is fixed, the count follows the channels
            head_channels, num_heads = widths.pop(), UNetConfig.num_heads
        else:
            raise CheckpointError(f"Per-level head counts {heads} with per-level head widths are not supported.")
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        depth = tuple(int(d) for d in depth)
        if len(set(depth)) == 1:
            depth = depth[0]
        elif len(depth) != levels:
            raise CheckpointError(f"transformer_layers_per_block {depth} does not have one count per level.")
    text_time = cfg.get("addition_embed_type") == "text_time"
    fields_ = dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_levels=tuple(i for i, t in enumerate(cfg["down_block_types"]) if "CrossAttn" in t),
        num_heads=num_heads,
        head_channels=head_channels,
        transformer_depth=depth,
        context_dim=cfg.get("cross_attention_dim", 768),
        norm_groups=cfg.get("norm_num_groups", 32),
        use_linear_in_transformer=cfg.get("use_linear_projection", False),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        adm_in_channels=int(cfg.get("projection_class_embeddings_input_dim") or 0) if text_time else 0,
        size_embed_dim=int(cfg.get("addition_time_embed_dim") or UNetConfig.size_embed_dim),
        hint_channels=cfg.get("conditioning_channels", 3),
        hint_block_channels=tuple(cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
        global_average_pooling=cfg.get("global_pool_conditions", False),
    )
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError(f"addition_embed_type {cfg['addition_embed_type']!r} is not an SD family's.")
    return UNetConfig(**fields_)


def unet_config_to_diffusers(cfg: UNetConfig, controlnet: bool) -> dict:
    levels = range(len(cfg.channel_mult))
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    depth = cfg.transformer_depth if isinstance(cfg.transformer_depth, int) else list(cfg.transformer_depth)
    out = dict(
        _class_name="ControlNetModel" if controlnet else "UNet2DConditionModel",
        in_channels=cfg.in_channels,
        block_out_channels=widths,
        layers_per_block=cfg.num_res_blocks,
        down_block_types=down,
        attention_head_dim=[cfg.heads(w) for w in widths] if cfg.head_channels else cfg.num_heads,
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        use_linear_projection=cfg.use_linear_in_transformer,
        upcast_attention=cfg.upcast_attention,
        transformer_layers_per_block=depth,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if cfg.adm_in_channels:
        out.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=cfg.size_embed_dim,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
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
        projection_dim=cfg.get("projection_dim", 0) if "WithProjection" in str(cfg.get("architectures", "")) else 0,
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


def metadata_section(meta: dict[str, str], section: str) -> dict | None:
    """One section of the configs written into our safetensors metadata (under `CONFIG_METADATA_KEY`), or None."""
    if CONFIG_METADATA_KEY not in meta:
        return None
    try:
        data = json.loads(meta[CONFIG_METADATA_KEY]).get(section)
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"The file's {CONFIG_METADATA_KEY} metadata is not a config ({e}).") from e
    return data if isinstance(data, dict) else None


def config_from_metadata(meta: dict[str, str], cls, section: str):
    """A config written into our safetensors metadata (under `CONFIG_METADATA_KEY`), or None."""
    data = metadata_section(meta, section)
    if data is None:
        return None
    return cls(
        **{
            f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
            for f in fields(cls)
            if f.name in data
        }
    )


def diffusers_key_config(state: StateDict) -> UNetConfig:
    """Enough of a config to rename a diffusers UNet/ControlNet state dict that came without its config.json: the
    levels, blocks per level, attention levels, vector conditioning and hint-block steps, read from its keys (the
    shapes are read again from our keys after the rename)."""
    levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")})
    if not levels:
        raise CheckpointError("No `down_blocks.*` keys: this is not a diffusers UNet or ControlNet.")
    n = levels[-1] + 1
    resnets = {k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")}
    attn = tuple(i for i in range(n) if any(k.startswith(f"down_blocks.{i}.attentions.") for k in state))
    steps = {k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")}
    add = state.get("add_embedding.linear_1.weight")
    return UNetConfig(
        channel_mult=(1,) * n,
        num_res_blocks=len(resnets),
        attention_levels=attn,
        adm_in_channels=0 if add is None else add.shape[1],
        hint_block_channels=(16,) * (len(steps) // 2 + 1),
    )
