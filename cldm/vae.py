"""The SD AutoencoderKL (LDM names): image <-> 4-channel latent, with a diagonal Gaussian posterior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig

VAE_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # the original clamps log-variance to keep exp() finite


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

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (not clamped)."""
        z = latent.to(self.post_quant_conv.weight.dtype) / self.cfg.scale_factor
        return self.decoder(self.post_quant_conv(z))
