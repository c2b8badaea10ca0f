"""The SD denoising UNet (SD1.5, SD2.x, SDXL) with LDM/SGM module names, and the encoder builder it shares with
ControlNet."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cldm.models.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from cldm.models.config import UNetConfig
from cldm.models.freeu import FreeU

MAX_PERIOD = 10000  # sinusoidal timestep embedding, as in "Attention is all you need"


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (b,) -> (b, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),  # dropout in the original
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 (or to the skip's size, for sizes that are not powers of two) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands each layer what it needs: the time embedding, the text context or nothing."""

    def forward(self, x, emb, context, upsample_size=None):  # noqa: D102
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def _transformer(cfg: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels, cfg.heads(channels), cfg.depth(level), cfg.context_dim, cfg.norm_groups,
        cfg.use_linear_in_transformer, cfg.upcast_attention,
    )  # fmt: skip


def build_time_embed(cfg: UNetConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cfg.model_channels, cfg.time_embed_dim), nn.SiLU(), nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
    )


def build_label_emb(cfg: UNetConfig) -> nn.Sequential | None:
    """SDXL's vector conditioning (pooled text and size embeddings) -> an addition to the time embedding (SGM's
    `label_emb.0.0` / `label_emb.0.2`); None for families without one."""
    if not cfg.adm_in_channels:
        return None
    ted = cfg.time_embed_dim
    return nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))


def embed_time(module: nn.Module, t: torch.Tensor, batch: int, y: torch.Tensor | None) -> torch.Tensor:
    """The timestep embedding of a UNet or ControlNet (its `time_embed`, `label_emb` and config), plus the vector
    conditioning `y` for the families that take one."""
    t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
    dtype = module.time_embed[0].weight.dtype
    emb = module.time_embed(timestep_embedding(t, module.cfg.model_channels).to(dtype))
    if module.label_emb is not None:
        if y is None:
            raise ValueError("this model needs its vector conditioning `y` (SDXL: pooled text + size embeddings)")
        emb = emb + module.label_emb(y.to(dtype))
    return emb


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """The encoder half shared by UNet and ControlNet: input blocks, middle block, and each input block's width."""
    ch = cfg.model_channels
    blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
    widths = [ch]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, cfg.time_embed_dim, mult * cfg.model_channels, cfg.norm_groups)]
            ch = mult * cfg.model_channels
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch, level))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            widths.append(ch)
    middle = TimestepEmbedSequential(
        ResBlock(ch, cfg.time_embed_dim, ch, cfg.norm_groups),
        _transformer(cfg, ch, len(cfg.channel_mult)),
        ResBlock(ch, cfg.time_embed_dim, ch, cfg.norm_groups),
    )
    return nn.ModuleList(blocks), middle, widths


def build_decoder(cfg: UNetConfig, skip_widths: list[int]) -> nn.ModuleList:
    """Output blocks: each takes the previous output concatenated with one encoder skip."""
    skips = list(skip_widths)
    ch = cfg.model_channels * cfg.channel_mult[-1]
    blocks = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            out_ch = cfg.model_channels * mult
            layers: list[nn.Module] = [ResBlock(ch + skips.pop(), cfg.time_embed_dim, out_ch, cfg.norm_groups)]
            ch = out_ch
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch, level))
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepEmbedSequential(*layers))
    return nn.ModuleList(blocks)


class UNet(nn.Module):
    """The SD UNet; `control` residuals (12 skips + middle) from ControlNets are added when given.

    Adapters change it from outside, never through flags in here: an attention layer computes with its `processor`
    (`cross_attentions()` and `self_attentions()` list the layers in a fixed order, `attention.processors_set` sets
    processors for a while), and each block of `input_blocks`, `middle_block`, `output_blocks` takes torch forward
    hooks on its output.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = build_time_embed(cfg)
        self.label_emb = build_label_emb(cfg)
        self.input_blocks, self.middle_block, widths = build_encoder(cfg)
        self.output_blocks = build_decoder(cfg, widths)
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, cfg.model_channels),
            nn.SiLU(),
            nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1),
        )

    def _transformer_blocks(self, blocks: list[nn.Module]) -> list[BasicTransformerBlock]:
        return [m for b in blocks for m in b.modules() if isinstance(m, BasicTransformerBlock)]

    def cross_attentions(self) -> list[CrossAttention]:
        """The text cross-attention layers in diffusers' attention-processor order (down, up, then mid blocks), the
        order in which adapter files with weights per layer number them."""
        return [m.attn2 for m in self._transformer_blocks([*self.input_blocks, *self.output_blocks, self.middle_block])]

    def self_attentions(self) -> list[CrossAttention]:
        """The self-attention layers in the order they run (input blocks, middle block, output blocks)."""
        return [m.attn1 for m in self._transformer_blocks([*self.input_blocks, self.middle_block, *self.output_blocks])]

    def time_emb(self, t: torch.Tensor, batch: int, y: torch.Tensor | None = None) -> torch.Tensor:
        return embed_time(self, t, batch, y)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        control: list[torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
        adapter: dict[int, torch.Tensor] | None = None,
        freeu: FreeU | None = None,
    ) -> torch.Tensor:
        """Noisy latent x at timestep t, text context (b, n, context_dim), optional ControlNet residuals and, for
        SDXL, the vector conditioning y (b, adm_in_channels) -> the UNet's prediction (noise or v).

        `adapter` maps an input block's index (`len(input_blocks)`: the middle block) to T2I-Adapter features added to
        that block's output, which its skip connection carries too. `freeu` reweighs the backbone and the skips of
        the two deepest decoder stages (`cldm.models.freeu`)."""
        emb = self.time_emb(t, x.shape[0], y)
        adapter = adapter or {}
        hs = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i in adapter:
                h = h + adapter[i]
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if len(self.input_blocks) in adapter:
            h = h + adapter[len(self.input_blocks)]
        control = list(control) if control is not None else None
        if control is not None:
            h = h + control.pop()
        for i, block in enumerate(self.output_blocks):
            skip = hs.pop()
            if control is not None:
                skip = skip + control.pop()
            if freeu is not None:  # a decoder stage is one level's output blocks (num_res_blocks + 1 of them)
                h, skip = freeu.apply(i // (self.cfg.num_res_blocks + 1), h, skip)
            h = torch.cat([h, skip], dim=1)
            # The next skip's size tells an Upsample where to land (odd latent sizes).
            h = block(h, emb, context, upsample_size=hs[-1].shape[-2:] if hs else None)
        return self.out(h)
