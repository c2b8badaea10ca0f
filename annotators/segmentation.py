"""Semantic segmentation (ADE20K, 150 classes) with a transformers UperNet, coloured like ControlNet's seg hints.

ControlNet 1.1's seg model was trained on maps coloured with the ADE20K palette of mmsegmentation (class 0 "wall"
= (120, 120, 120), class 1 "building" = (180, 120, 120), ...). Any ADE20K model with the standard 150-class order
gives usable hints once its labels are painted with that palette; the default is UperNet + ConvNeXt-small, the
model the diffusers ControlNet seg example uses.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from annotators.hub_models import HubModel, load_pretrained

# <models_dir>/annotators/upernet-convnext-small/config.json, the weights beside it
SEG_MODEL = HubModel("openmmlab/upernet-convnext-small", "upernet-convnext-small")
SEG_CONFIG = SEG_MODEL.config
# Normalisation of the mmsegmentation ADE20K configs (ImageNet statistics on 0..255 pixels).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# ADE20K palette, index = class id (mmsegmentation order, also used by the ControlNet seg annotator).
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120),
    (180, 120, 120),
    (6, 230, 230),
    (80, 50, 50),
    (4, 200, 3),
    (120, 120, 80),
    (140, 140, 140),
    (204, 5, 255),
    (230, 230, 230),
    (4, 250, 7),
    (224, 5, 255),
    (235, 255, 7),
    (150, 5, 61),
    (120, 120, 70),
    (8, 255, 51),
    (255, 6, 82),
    (143, 255, 140),
    (204, 255, 4),
    (255, 51, 7),
    (204, 70, 3),
    (0, 102, 200),
    (61, 230, 250),
    (255, 6, 51),
    (11, 102, 255),
    (255, 7, 71),
    (255, 9, 224),
    (9, 7, 230),
    (220, 220, 220),
    (255, 9, 92),
    (112, 9, 255),
    (8, 255, 214),
    (7, 255, 224),
    (255, 184, 6),
    (10, 255, 71),
    (255, 41, 10),
    (7, 255, 255),
    (224, 255, 8),
    (102, 8, 255),
    (255, 61, 6),
    (255, 194, 7),
    (255, 122, 8),
    (0, 255, 20),
    (255, 8, 41),
    (255, 5, 153),
    (6, 51, 255),
    (235, 12, 255),
    (160, 150, 20),
    (0, 163, 255),
    (140, 140, 140),
    (250, 10, 15),
    (20, 255, 0),
    (31, 255, 0),
    (255, 31, 0),
    (255, 224, 0),
    (153, 255, 0),
    (0, 0, 255),
    (255, 71, 0),
    (0, 235, 255),
    (0, 173, 255),
    (31, 0, 255),
    (11, 200, 200),
    (255, 82, 0),
    (0, 255, 245),
    (0, 61, 255),
    (0, 255, 112),
    (0, 255, 133),
    (255, 0, 0),
    (255, 163, 0),
    (255, 102, 0),
    (194, 255, 0),
    (0, 143, 255),
    (51, 255, 0),
    (0, 82, 255),
    (0, 255, 41),
    (0, 255, 173),
    (10, 0, 255),
    (173, 255, 0),
    (0, 255, 153),
    (255, 92, 0),
    (255, 0, 255),
    (255, 0, 245),
    (255, 0, 102),
    (255, 173, 0),
    (255, 0, 20),
    (255, 184, 184),
    (0, 31, 255),
    (0, 255, 61),
    (0, 71, 255),
    (255, 0, 204),
    (0, 255, 194),
    (0, 255, 82),
    (0, 10, 255),
    (0, 112, 255),
    (51, 0, 255),
    (0, 194, 255),
    (0, 122, 255),
    (0, 255, 163),
    (255, 153, 0),
    (0, 255, 10),
    (255, 112, 0),
    (143, 255, 0),
    (82, 0, 255),
    (163, 255, 0),
    (255, 235, 0),
    (8, 184, 170),
    (133, 0, 255),
    (0, 255, 92),
    (184, 0, 255),
    (255, 0, 31),
    (0, 184, 255),
    (0, 214, 255),
    (255, 0, 112),
    (92, 255, 0),
    (0, 224, 255),
    (112, 224, 255),
    (70, 184, 160),
    (163, 0, 255),
    (153, 0, 255),
    (71, 255, 0),
    (255, 0, 163),
    (255, 204, 0),
    (255, 0, 143),
    (0, 255, 235),
    (133, 255, 0),
    (255, 0, 235),
    (245, 0, 255),
    (255, 0, 122),
    (255, 245, 0),
    (10, 190, 212),
    (214, 255, 0),
    (0, 204, 255),
    (20, 0, 255),
    (255, 255, 0),
    (0, 153, 255),
    (0, 41, 255),
    (0, 255, 204),
    (41, 0, 255),
    (41, 255, 0),
    (173, 0, 255),
    (0, 245, 255),
    (71, 0, 255),
    (122, 0, 255),
    (0, 255, 184),
    (0, 92, 255),
    (184, 255, 0),
    (0, 133, 255),
    (255, 214, 0),
    (25, 194, 194),
    (102, 255, 0),
    (92, 0, 255),
)


def palette_array() -> np.ndarray:
    """The palette as a (150, 3) uint8 array, index = class id."""
    return np.asarray(ADE20K_PALETTE, dtype=np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 RGB with the ADE20K palette (ids beyond 149 wrap, for non-ADE models)."""
    palette = palette_array()
    return palette[np.asarray(labels, dtype=np.int64) % len(palette)]


def _prepare(image: np.ndarray, resolution: int) -> torch.Tensor:
    """RGB uint8 -> normalised 1x3xhxw float tensor at `resolution` on the short side (multiples of 64)."""
    from controlnet_aux.util import resize_image

    resized = resize_image(image, resolution)
    x = torch.from_numpy(resized).float()
    x = (x - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    return x.permute(2, 0, 1).unsqueeze(0)  # h w c -> 1 c h w


def seg_ade20k(image: np.ndarray, resolution: int, models_dir: str | None, params: Mapping[str, float]) -> np.ndarray:
    """Registry callable: ADE20K labels painted with the ControlNet seg palette, at the detection size."""
    model = load_pretrained(SEG_MODEL, "AutoModelForSemanticSegmentation", "seg_ade20k", models_dir)
    pixels = _prepare(image, resolution)
    weight = next(model.parameters())
    with torch.inference_mode():
        logits = model(pixel_values=pixels.to(weight.device, weight.dtype)).logits  # 1 x classes x h' x w'
        logits = torch.nn.functional.interpolate(logits.float(), size=pixels.shape[-2:], mode="bilinear")
        labels = logits.argmax(dim=1)[0].cpu().numpy()  # h x w class ids
    return colorize(labels)
