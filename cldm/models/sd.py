"""StableDiffusion: the UNet, VAE and text encoder(s) of one base model, held together."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cldm.models.config import SDConfig
from cldm.models.family import ModelFamily, family
from cldm.models.text import TextEncoder
from cldm.models.unet import UNet
from cldm.models.vae import AutoencoderKL


@dataclass
class StableDiffusion:
    """One base model; `source` says where it came from (shown to users). `text_2` is SDXL's second text encoder
    (OpenCLIP ViT-bigG), None for the one-encoder families."""

    unet: UNet
    vae: AutoencoderKL
    text: TextEncoder
    config: SDConfig
    source: str = "random"
    hash: str = ""  # A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (none for a folder)
    text_2: TextEncoder | None = None

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.texts]

    @property
    def texts(self) -> list[TextEncoder]:
        """The text encoders, in the order their states are joined."""
        return [self.text] if self.text_2 is None else [self.text, self.text_2]

    @property
    def family(self) -> ModelFamily:
        return family(self.config.family)

    @property
    def native_size(self) -> int:
        """The picture side the model was trained at (SD2's 512-base, an epsilon model, at 512)."""
        f = self.family
        return f.native_size if self.config.prediction == f.prediction else f.alternate_size

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


def random_sd(cfg: SDConfig, tokenizer=None, seed: int = 0, tokenizer_2=None) -> StableDiffusion:
    """A randomly initialised model (tests, training from scratch)."""
    torch.manual_seed(seed)
    text = TextEncoder(cfg.text, tokenizer)
    text_2 = None if cfg.text_2 is None else TextEncoder(cfg.text_2, tokenizer_2)
    return StableDiffusion(UNet(cfg.unet), AutoencoderKL(cfg.vae), text, cfg, source="random", text_2=text_2)
