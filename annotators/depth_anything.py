"""Depth Anything v2 (transformers' DepthAnythingForDepthEstimation) as a depth hint, as the A1111 extension makes it.

The network reads the picture with its short side brought up to 518 px (both sides at least 518, multiples of its
14 px patches, bicubic), ImageNet-normalised; its relative depth (larger = nearer, as the depth ControlNets want) is
resized back to the detection size and stretched to 0..255: a grey map, 3 channels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import cv2
import numpy as np
import torch

from annotators.hub_models import HubModel, load_pretrained

# The checkpoints in transformers' layout (the "-hf" repos); the local folder is named after each repo.
DEPTH_ANYTHING_V2 = {
    size: HubModel(f"depth-anything/Depth-Anything-V2-{size}-hf", f"Depth-Anything-V2-{size}-hf")
    for size in ("Small", "Base", "Large")
}
NET_SIDE = 518  # the size Depth Anything was trained at
PATCH = 14  # its ViT patch: both sides must be multiples of it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def net_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the network reads: the picture scaled so that both sides reach NET_SIDE, each side rounded
    to a multiple of PATCH (up, where rounding would fall below NET_SIDE)."""
    scale = max(NET_SIDE / height, NET_SIDE / width)

    def side(length: float) -> int:
        rounded = round(length / PATCH) * PATCH
        return rounded if rounded >= NET_SIDE else math.ceil(length / PATCH) * PATCH

    return side(height * scale), side(width * scale)


def net_input(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xhxw normalised float tensor at `net_size`."""
    height, width = net_size(*image.shape[:2])
    pixels = cv2.resize(image.astype(np.float32) / 255.0, (width, height), interpolation=cv2.INTER_CUBIC)
    pixels = (pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # h w c -> 1 c h w


def depth_map(depth: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The network's 1xhxw relative depth -> HxWx3 uint8: bilinear to the size, min..max stretched to 0..255."""
    depth = torch.nn.functional.interpolate(depth[None].float(), (height, width), mode="bilinear")[0, 0]
    span = (depth.max() - depth.min()).clamp_min(1e-12)  # a flat map (no depth at all) stays black
    grey = ((depth - depth.min()) / span * 255.0).cpu().numpy().astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _depth_anything(size: str, annotator: str):
    model = DEPTH_ANYTHING_V2[size]

    def run(image: np.ndarray, resolution: int, models_dir: str | os.PathLike[str] | None,
            params: Mapping[str, float]) -> np.ndarray:  # fmt: skip
        net = load_pretrained(model, "DepthAnythingForDepthEstimation", annotator, models_dir)
        from controlnet_aux.util import resize_image  # after the weights: a missing file is said without it

        detect = resize_image(image, resolution)  # the detection size, as the other depth preprocessors use
        weight = next(net.parameters())
        with torch.inference_mode():
            depth = net(pixel_values=net_input(detect).to(weight.device, weight.dtype)).predicted_depth
        return depth_map(depth, *detect.shape[:2])

    return run


depth_anything_v2 = _depth_anything("Small", "depth_anything_v2")
depth_anything_v2_base = _depth_anything("Base", "depth_anything_v2_base")
depth_anything_v2_large = _depth_anything("Large", "depth_anything_v2_large")
