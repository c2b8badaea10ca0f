"""The SD AutoencoderKL (LDM names): image <-> 4-channel latent, with a diagonal Gaussian posterior."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from cldm.models.config import VAEConfig

VAE_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # the original clamps log-variance to keep exp() finite
# Memory cap: pictures of more than VAE_TILE_PX**2 pixels (above 1024x1024) are decoded in tiles; env overrides it.
VAE_TILE_PX = 1024
TILE_PX_ENV = "CLDM_VAE_TILE_PX"
TILE_LATENT = 64  # tiles of 64 latent pixels (512 px for SD), overlapping by a quarter: diffusers' enable_tiling()
TILE_OVERLAP = 0.25

log = logging.getLogger(__name__)


def tile_threshold_px() -> int:
    """The memory cap as a picture side in pixels: CLDM_VAE_TILE_PX when set (0 tiles all that spans 2+ tiles)."""
    raw = os.environ.get(TILE_PX_ENV, "").strip()
    if not raw:
        return VAE_TILE_PX
    if not raw.isdigit():
        raise ValueError(f"{TILE_PX_ENV} must be a whole number of pixels, got {raw!r}")
    return int(raw)


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Fade the end of `prev` into the start of `tile` along dim (2: rows, 3: columns), in place, linearly."""
    n = min(prev.shape[dim], tile.shape[dim], extent)
    if n <= 0:
        return
    w = torch.arange(n, dtype=torch.float64) / n  # the weight of `tile`: 0 at its edge, as diffusers' blend_v/_h
    shape = (n, 1) if dim == 2 else (n,)
    fade = (1 - w).to(tile.device, tile.dtype).view(shape)
    w = w.to(tile.device, tile.dtype).view(shape)
    head = tile.narrow(dim, 0, n)
    head.copy_(prev.narrow(dim, prev.shape[dim] - n, n) * fade + head * w)


def _norm(cfg: VAEConfig, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, ch, eps=VAE_NORM_EPS)


class VAEResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with a residual (no time embedding in the VAE)."""

    def __init__(self, cfg: VAEConfig, ch_in: int, ch_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2 = _norm(cfg, ch_out)
        self.dropout = nn.Identity()
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        if ch_in != ch_out:
            self.nin_shortcut = nn.Conv2d(ch_in, ch_out, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class VAEAttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.norm = _norm(cfg, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (b, 1, hw, c)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class VAEDownsample(nn.Module):
    """Asymmetric pad (right/bottom) then a stride-2 conv, as the original."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(cfg: VAEConfig, ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = VAEResnetBlock(cfg, ch, ch)
    mid.attn_1 = VAEAttnBlock(cfg, ch)
    mid.block_2 = VAEResnetBlock(cfg, ch, ch)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image -> mean and log-variance of the latent (2 * z_channels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            stage = nn.Module()
            out = cfg.base_channels * mult
            stage.block = nn.ModuleList(
                VAEResnetBlock(cfg, ch if i == 0 else out, out) for i in range(cfg.num_res_blocks)
            )
            stage.attn = nn.ModuleList()  # SD uses no attention at these resolutions
            ch = out
            if level != len(cfg.channel_mult) - 1:
                stage.downsample = VAEDownsample(ch)
            self.down.append(stage)
        self.mid = _mid(cfg, ch)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image in [-1, 1] (roughly)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _mid(cfg, ch)
        stages = []
        for level in reversed(range(len(cfg.channel_mult))):
            stage = nn.Module()
            out = cfg.base_channels * cfg.channel_mult[level]
            stage.block = nn.ModuleList(
                VAEResnetBlock(cfg, ch if i == 0 else out, out) for i in range(cfg.num_res_blocks + 1)
            )
            stage.attn = nn.ModuleList()
            ch = out
            if level != 0:
                stage.upsample = VAEUpsample(ch)
            stages.insert(0, stage)  # self.up[level], deepest last, as the original indexes it
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """VAE with the SD latent scaling folded into encode()/decode()."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.tile_latent_size = TILE_LATENT
        self.tile_overlap = TILE_OVERLAP

    def moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> (mean, std) of the unscaled latent."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))

    def encode(
        self, image: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent (a posterior sample, or its mode when sample=False)."""
        image = image.to(self.quant_conv.weight.dtype)
        mean, std = self.moments(image)
        if sample:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype)
            mean = mean + std * noise.to(mean.device)
        return mean * self.cfg.scale_factor

    def wants_tiles(self, latent_shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether decode() tiles by itself: a picture over the memory cap (tile_threshold_px() squared pixels)."""
        h, w = latent_shape[-2:]
        f = self.cfg.downsample_factor
        return h * w * f * f > tile_threshold_px() ** 2 and max(h, w) > self.tile_latent_size

    def decode(self, latent: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (not clamped).

        Pictures above the memory cap (VAE_TILE_PX, env CLDM_VAE_TILE_PX) go through tiled_decode(); tiled=True or
        False forces it either way (a latent that fits in one tile is always decoded whole)."""
        z = latent.to(self.post_quant_conv.weight.dtype) / self.cfg.scale_factor
        tiled = self.wants_tiles(z.shape) if tiled is None else tiled and max(z.shape[-2:]) > self.tile_latent_size
        out = self.tiled_decode(z) if tiled else self.decoder(self.post_quant_conv(z))
        if out.dtype == torch.float16 and not bool(torch.isfinite(out).all()):
            # SDXL's own VAE overflows in fp16 (the fp16-fix VAE does not): decode again in fp32, as A1111 reverts
            # its VAE to 32-bit floats and diffusers upcasts it (force_upcast)
            log.warning("the VAE overflowed in fp16: decoding in fp32 (use an fp16-fix VAE to stay in fp16)")
            self.float()
            try:
                return self.decode(latent.float(), tiled).half()
            finally:
                self.half()
        return out

    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image, as diffusers' tiled_decode: overlapping tiles of tile_latent_size latent pixels,
        each decoded alone, faded in from the tile above and then the one to the left, cropped and joined."""
        size, f = self.tile_latent_size, self.cfg.downsample_factor
        step = int(size * (1 - self.tile_overlap))
        extent = int(size * f * self.tile_overlap)
        keep = size * f - extent
        above: list[torch.Tensor] = []  # the previous row's tiles, blended already
        strips = []
        for i in range(0, z.shape[2], step):
            row: list[torch.Tensor] = []
            for j in range(0, z.shape[3], step):
                tile = self.decoder(self.post_quant_conv(z[:, :, i : i + size, j : j + size]))
                if above:
                    _blend(above[len(row)], tile, extent, dim=2)
                if row:
                    _blend(row[-1], tile, extent, dim=3)
                row.append(tile)
            strips.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
            above = row
        return torch.cat(strips, dim=2)
