"""StableDiffusion: the UNet, VAE and text encoder of one base model, held together."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cldm.models.config import SDConfig
from cldm.models.text import TextEncoder
from cldm.models.unet import UNet
from cldm.models.vae import AutoencoderKL


@dataclass
class StableDiffusion:
    """One base model; `source` says where it came from (shown to users)."""

    unet: UNet
    vae: AutoencoderKL
    text: TextEncoder
    config: SDConfig
    source: str = "random"
    hash: str = ""  # A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (none for a folder)

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> StableDiffusion:
        for m in self.modules():
            m.requires_grad_(False).eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downsample_factor


def random_sd(cfg: SDConfig, tokenizer=None, seed: int = 0) -> StableDiffusion:
    """A randomly initialised model (tests, training from scratch)."""
    torch.manual_seed(seed)
    text = TextEncoder(cfg.text, tokenizer)
    return StableDiffusion(UNet(cfg.unet), AutoencoderKL(cfg.vae), text, cfg, source="random")
