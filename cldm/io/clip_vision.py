"""Reading the CLIP ViT-L/14 vision model the T2I style adapter reads, as users have it: the hub repo
openai/clip-vit-large-patch14 (a whole CLIPModel: config.json + model.safetensors or pytorch_model.bin, text half
included, which is left out here), a folder holding only the vision half, or the A1111 extension's
`clip_vision/clip_vitl.pth` (the same weights file with no config beside it: ViT-L/14's shapes are known).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cldm.errors import CheckpointError
from cldm.io import files, locate
from cldm.io.assemble import build
from cldm.models.image_encoder import ImageEncoder
from cldm.models.t2i_adapter import StyleAdapter, StyleControl, encoder_problem

# openai/clip-vit-large-patch14's vision half (its config.json's vision_config, the A1111 extension's clip_vitl)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
               image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)  # fmt: skip
VISION_KEYS = ("vision_model.", "visual_projection.")  # a CLIPModel's vision half, as CLIPVisionModelWithProjection


def _config(folder: Path):
    """The vision config of a folder's config.json: a CLIPModel's (its vision_config) or a vision model's own."""
    from transformers import CLIPVisionConfig

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        vision = data.get("vision_config") or data.get("vision_config_dict") or data
        return CLIPVisionConfig.from_dict(vision)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder.name}/config.json is not a CLIP config ({e}).") from e


def load_clip_vision(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """The CLIP vision model in a folder (config.json + weights) or a bare weights file (ViT-L/14's config)."""
    from transformers import CLIPVisionConfig

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path.name}/ has no config.json: use the files of {locate.STYLE_ENCODER_REPO}.")
        config, state = _config(path), files.read_folder(path)
    else:
        config, state = CLIPVisionConfig(**VIT_L14), files.read_file(path)
    state = {f"clip.{k}": v for k, v in state.items() if k.startswith(VISION_KEYS) and "position_ids" not in k}
    if "clip.visual_projection.weight" not in state:
        raise CheckpointError(
            f"{path.name} holds no CLIP vision model with its projection (no vision_model.* and "
            f"visual_projection.weight keys): use the files of {locate.STYLE_ENCODER_REPO}."
        )
    # the hub's CLIPModel config keeps the projection width at its top level; the weight says it either way
    config.projection_dim = state["clip.visual_projection.weight"].shape[0]
    encoder = build(ImageEncoder, config, state, "CLIP vision model", dtype)
    encoder.reset_buffers()
    return encoder


def style_control(adapter: StyleAdapter, models_dir: str | os.PathLike | None, dtype: torch.dtype) -> StyleControl:
    """The style adapter with its CLIP vision model, from `models_dir` or the hub (`locate.locate_style_encoder`)."""
    where = locate.locate_style_encoder(models_dir)
    encoder = load_clip_vision(where, dtype)
    if (why := encoder_problem(adapter, encoder)) is not None:
        raise CheckpointError(f"{where.name} cannot feed {getattr(adapter, 'source', 'the style adapter')}: {why}.")
    return StyleControl(adapter, encoder)
