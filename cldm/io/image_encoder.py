"""Reading IP-Adapter's CLIP image encoder: the published folder (config.json + model.safetensors: the
`models/image_encoder` folder of h94/IP-Adapter, ViT-H/14, or its `sdxl_models/image_encoder`, ViT-bigG/14) into
`cldm.models.image_encoder.ImageEncoder`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cldm.errors import CheckpointError
from cldm.io import files
from cldm.io.assemble import build
from cldm.models.image_encoder import ImageEncoder


def load_image_encoder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """The image-encoder folder as published beside the adapters (config.json + model.safetensors)."""
    from transformers import CLIPVisionConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder.name}/ is not an image-encoder folder (no config.json): use an image_encoder folder of "
            "h94/IP-Adapter: `models/image_encoder` (ViT-H/14, for the SD1.5 adapters and the SDXL _vit-h ones) or "
            "`sdxl_models/image_encoder` (ViT-bigG/14, for ip-adapter_sdxl)."
        )
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = CLIPVisionConfig.from_dict(data.get("vision_config", data) if "vision_config" in data else data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder.name}/config.json is not a CLIP vision config ({e}).") from e
    state = {f"clip.{k}": v for k, v in files.read_folder(folder).items() if "position_ids" not in k}
    encoder = build(ImageEncoder, config, state, "image encoder", dtype)
    encoder.reset_buffers()
    return encoder
