"""The CLIP image encoder of IP-Adapter (`transformers.CLIPVisionModelWithProjection`) and its input preprocessing,
done exactly as transformers' `CLIPImageProcessor` does it: the short side resized to 224 (8-bit bicubic with
antialiasing), the centre 224x224 cut out, then (x - 255 * mean) / (255 * std) with CLIP's mean and std.
`cldm.io.image_encoder` reads the published folder into it.

h94/IP-Adapter publishes two encoders (`KNOWN_ENCODERS`): OpenCLIP ViT-H/14 in `models/image_encoder` (the SD1.5
adapters and the SDXL `_vit-h` ones) and OpenCLIP ViT-bigG/14 in `sdxl_models/image_encoder` (`ip-adapter_sdxl`).
An adapter reads either the projected embedding (plain) or the penultimate hidden states (plus), so the width it
takes names the encoder it was trained with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: list[np.ndarray], size: int = 224) -> torch.Tensor:
    """HxWx3 uint8 pictures -> (n, 3, size, size) float32, as CLIPImageProcessor(size=size, crop_size=size)."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    out = []
    for img in images:
        h, w = img.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if w <= h else (size, new_long)
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        if (new_h, new_w) != (h, w):  # torch's own 8-bit antialiased bicubic kernel, as torchvision uses on the CPU
            t = F.interpolate(t, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        t = t[0].float()
        top, left = int((new_h - size) / 2.0), int((new_w - size) / 2.0)
        out.append((t[:, top : top + size, left : left + size] - mean) / std)
    return torch.stack(out)


@dataclass(frozen=True)
class EncoderKind:
    """A published IP-Adapter image encoder: its widths and where h94/IP-Adapter keeps it."""

    name: str
    hidden_size: int  # width of its hidden states (plus adapters read the penultimate layer's)
    projection_dim: int  # width of its projected image embedding (plain adapters)
    hub_folder: str  # the folder in h94/IP-Adapter

    def width(self, hidden: bool) -> int:
        return self.hidden_size if hidden else self.projection_dim


VIT_H = EncoderKind("OpenCLIP ViT-H/14", 1280, 1024, "models/image_encoder")
VIT_BIGG = EncoderKind("OpenCLIP ViT-bigG/14", 1664, 1280, "sdxl_models/image_encoder")
KNOWN_ENCODERS = (VIT_H, VIT_BIGG)


def encoder_for(width: int, hidden: bool) -> EncoderKind | None:
    """The published encoder whose hidden states (`hidden`) or image embeds are `width` wide, or None."""
    return next((e for e in KNOWN_ENCODERS if e.width(hidden) == width), None)


def known_encoder(config) -> EncoderKind | None:
    """The published encoder a CLIPVisionConfig has the widths of, or None."""
    widths = (config.hidden_size, config.projection_dim)
    return next((e for e in KNOWN_ENCODERS if widths == (e.hidden_size, e.projection_dim)), None)


class ImageEncoder(nn.Module):
    """CLIPVisionModelWithProjection: the projected image embedding (plain adapters) or the penultimate layer's
    hidden states (plus adapters)."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.clip = CLIPVisionModelWithProjection(config)

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    @property
    def kind(self) -> EncoderKind | None:
        """Which published encoder this is (by its widths), or None."""
        return known_encoder(self.clip.config)

    def width(self, hidden: bool) -> int:
        """The width of its penultimate hidden states (`hidden`) or of its projected image embedding."""
        return self.clip.config.hidden_size if hidden else self.clip.config.projection_dim

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        p = self.clip.visual_projection.weight
        return preprocess(images, self.image_size).to(p.device, p.dtype)

    def embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels).image_embeds

    def hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def last_hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden states, before the final norm (what the T2I style adapter reads)."""
        return self.clip(pixel_values=pixels).last_hidden_state

    def reset_buffers(self) -> None:
        """Rebuild the non-persistent position ids (left empty when the module was built on the meta device)."""
        emb = self.clip.vision_model.embeddings
        n = emb.position_embedding.weight.shape[0]
        ids = torch.arange(n, device=emb.position_embedding.weight.device)[None]
        emb.register_buffer("position_ids", ids, persistent=False)
