"""Frozen configs with the SD1.5 defaults; `model_configs` reads the other families' from files and shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

from cldm.models.family import SD15

LATENT_SCALE = SD15.latent_scale


@dataclass(frozen=True)
class UNetConfig:
    """The LDM UNetModel hyper-parameters; the ControlNet shares them (plus its hint fields)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Levels (0-based) that carry a SpatialTransformer after each ResBlock. SD1.5: all but the deepest.
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = 8  # SD1.5 fixes the head count; the head width follows the channels
    # Transformer blocks per SpatialTransformer: one count, or one per level (SDXL: (0, 2, 10)); the middle block
    # takes the deepest level's count.
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    norm_groups: int = 32
    use_linear_in_transformer: bool = False  # SD2 style 1x1 projections as Linear
    head_channels: int = 0  # SD2 and SDXL fix the head width (64) instead: heads = width // head_channels
    upcast_attention: bool = False  # SD2.1: attention scores in fp32 even when the model runs in half precision
    adm_in_channels: int = 0  # SDXL: width of the vector conditioning (pooled text + size embeddings); 0: none
    size_embed_dim: int = 256  # SDXL: each of the six size numbers becomes a sinusoid this wide
    # ControlNet-only fields (ignored by the UNet).
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_average_pooling: bool = False

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def depth(self, level: int) -> int:
        """Transformer blocks at `level` (0-based); `len(channel_mult)` is the middle block."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[min(level, len(self.transformer_depth) - 1)]

    def heads(self, width: int) -> int:
        """Attention heads at a block `width` channels wide."""
        return width // self.head_channels if self.head_channels else self.num_heads


def family_of_config(cfg: UNetConfig) -> str:
    """The family a UNet or ControlNet config belongs to, by its structure: SDXL's vector conditioning, SD2's linear
    projections, SD1.5's 1x1 convolutions (the context width says the same for full-size models)."""
    if cfg.adm_in_channels:
        return "SDXL"
    return "SD2.x" if cfg.use_linear_in_transformer else "SD1.5"


@dataclass(frozen=True)
class VAEConfig:
    """The LDM AutoencoderKL hyper-parameters."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scale_factor: float = LATENT_SCALE

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text tower; the defaults are CLIP ViT-L/14 as SD1.5 uses it. SD2's OpenCLIP ViT-H and SDXL's second
    encoder, OpenCLIP ViT-bigG, are the same transformer with other sizes ("gelu"); bigG also projects its pooled
    output (`projection_dim`)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77
    hidden_act: str = "quick_gelu"
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    projection_dim: int = 0  # width of the pooled-output projection (SDXL's second encoder); 0: none

    def to_transformers(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_length,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            **({"projection_dim": self.projection_dim} if self.projection_dim else {}),
        )


@dataclass(frozen=True)
class SDConfig:
    """A whole Stable Diffusion model: UNet, VAE, text encoder(s), its family (`cldm.models.family`) and what its
    UNet predicts ("epsilon": the noise; "v": SD2's 768-v models)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text_2: TextConfig | None = None  # SDXL's second text encoder
    family: str = "SD1.5"
    prediction: str = "epsilon"
