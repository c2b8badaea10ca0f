"""TAESD, the tiny autoencoder (madebyollin/taesd): SD's latent space at a fraction of the VAE's cost.

Each half is an `nn.Sequential` laid out as the published halves are (`taesd_decoder.pth`: a weightless Clamp at
index 0, so the first conv is "1.weight"; `taesd_encoder.pth`: the first conv is "0.weight"), so those files load
as they are. TAESD works on the latents the UNet sees (SD's VAE latents times its scale factor: its own scale factor
is 1) and on pictures in [0, 1]; `TinyAutoencoder` wraps it in the VAE's contract (`decode(scaled latent)` ->
picture in [-1, 1], `encode(picture in [-1, 1])` -> scaled latent), so it can stand in for the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cldm.errors import InputError

LATENT_BOUND = 3.0  # the decoder squashes its input into (-3, 3) (tanh): TAESD latents live in about that range
TAESD_CHANNELS = 64  # the published halves' width at every stage


@dataclass(frozen=True)
class TinyConfig:
    """One half's shape. `blocks[i]`: the Blocks of stage i; stages are joined by a stride-2 conv (encoder) or a
    nearest x2 upsample and a conv (decoder), so a half with n stages scales by 2 ** (n - 1)."""

    latent_channels: int = 4
    channels: int = TAESD_CHANNELS
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # the decoder's; the encoder's are (1, 3, 3, 3)

    @property
    def factor(self) -> int:
        """Picture pixels per latent pixel, per side."""
        return 2 ** (len(self.blocks) - 1)


ENCODER = TinyConfig(blocks=(1, 3, 3, 3))
DECODER = TinyConfig()


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents into (-LATENT_BOUND, LATENT_BOUND)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / LATENT_BOUND) * LATENT_BOUND


class Block(nn.Module):
    """Three 3x3 convs with ReLUs between, added to the input, then a ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.skip = nn.Identity()  # the original's 1x1 skip exists only where widths differ: never in TAESD
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Sequential):
    """Picture in [0, 1] -> latent: a conv, then per stage a stride-2 conv (not before the first) and its Blocks,
    then a conv to the latent channels."""

    def __init__(self, cfg: TinyConfig = ENCODER):
        c = cfg.channels
        layers: list[nn.Module] = [_conv(3, c)]
        for i, n in enumerate(cfg.blocks):
            if i:
                layers.append(_conv(c, c, stride=2, bias=False))
            layers += [Block(c) for _ in range(n)]
        super().__init__(*layers, _conv(c, cfg.latent_channels))
        self.cfg = cfg


class TinyDecoder(nn.Sequential):
    """Latent -> picture in about [0, 1]: Clamp, a conv and ReLU, then per stage its Blocks followed by an upsample
    and a conv (the last stage: a conv to RGB)."""

    def __init__(self, cfg: TinyConfig = DECODER):
        c = cfg.channels
        layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, c), nn.ReLU()]
        for i, n in enumerate(cfg.blocks):
            layers += [Block(c) for _ in range(n)]
            if i < len(cfg.blocks) - 1:
                layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False)]
        super().__init__(*layers, _conv(c, 3))
        self.cfg = cfg


class TinyAutoencoder(nn.Module):
    """TAESD with the VAE's contract (scaled latents, pictures in [-1, 1]). The encoder is optional: the published
    halves are separate files and previews need only the decoder."""

    def __init__(self, decoder: TinyDecoder, encoder: TinyEncoder | None = None):
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.source = ""  # the file it came from (A1111 names a VAE by its file name)
        self.hash = ""

    @property
    def latent_channels(self) -> int:
        return self.decoder.cfg.latent_channels

    @property
    def factor(self) -> int:
        return self.decoder.cfg.factor

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    def encode(
        self, image: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Picture in [-1, 1] -> scaled latent. TAESD has no posterior: nothing is drawn from `generator` (as
        diffusers' pipelines take AutoencoderTiny's latents as they are)."""
        if self.encoder is None:
            named = f" {self.source}" if self.source else ""
            raise InputError(
                f"The TAESD{named} has no encoder, and this request encodes a picture (img2img, "
                "inpainting, reference-only, a hires fix with a picture upscaler): put its encoder file "
                "(taesd_encoder.pth beside taesd_decoder.pth) next to it, or use a full VAE."
            )
        return self.encoder((image.to(self.dtype) + 1) / 2)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> picture in [-1, 1] (not clamped), whole: its memory grows with the picture, linearly."""
        return self.decoder(latent.to(self.dtype)) * 2 - 1
