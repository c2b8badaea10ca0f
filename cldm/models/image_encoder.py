"""The CLIP image encoder of IP-Adapter (`transformers.CLIPVisionModelWithProjection`; ViT-H/14 for the SD1.5
adapters) and its input preprocessing, done exactly as transformers' `CLIPImageProcessor` does it: the short side
resized to 224 (8-bit bicubic with antialiasing), the centre 224x224 cut out, then
(x - 255 * mean) / (255 * std) with CLIP's mean and std. `cldm.io.image_encoder` reads the published folder into it."""

from __future__ import annotations

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

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        p = self.clip.visual_projection.weight
        return preprocess(images, self.image_size).to(p.device, p.dtype)

    def embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels).image_embeds

    def hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def reset_buffers(self) -> None:
        """Rebuild the non-persistent position ids (left empty when the module was built on the meta device)."""
        emb = self.clip.vision_model.embeddings
        n = emb.position_embedding.weight.shape[0]
        ids = torch.arange(n, device=emb.position_embedding.weight.device)[None]
        emb.register_buffer("position_ids", ids, persistent=False)
