"""TEED soft edges and AnyLine line art: controlnet-aux's TEED network, with the steps around it written here so
that the hint comes back at the detection size (the registry then makes one resize to the picture).

TEED ("softedge_teed", the A1111 extension's name) averages the network's edge maps, squashes them with a sigmoid
and quantises them into `safe_steps` levels. AnyLine ("softedge_anyline", the extension's name; made for MistoLine)
runs the same network with the MTEED weights and blends, as a screen, the line art of "lineart_standard" (the
darkness of each pixel against its blurred surroundings) over it, after dropping that line art's specks: the
combination of TheMistoAI's ComfyUI-Anyline node, here in floats in 0..1 as that node computes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from annotators.cache import cached_load
from annotators.weights import WeightFile

# Where the extension downloads them from (TEED: the authors' checkpoint 7; MTEED: MistoLine's AnyLine weights).
TEED_FILE = WeightFile("bdsqlsz/qinglong_controlnet-lllite", "7_model.pth", subfolder="Annotators")
MTEED_FILE = WeightFile("TheMistoAI/MistoLine", "MTEED.pth", subfolder="Anyline")
DEFAULT_SAFE_STEPS = 2
# lineart_standard as AnyLine calls it: blur sigma, and the darkness below which pixels do not count for the median
LINEART_SIGMA = 2.0
LINEART_THRESHOLD = 3
LINEART_MEDIAN_FLOOR = 16  # the median darkness never divides by less (flat pictures would turn noise into lines)
LINEART_GAIN = 127  # the median line darkness maps to this grey
# AnyLine drops line-art specks of fewer than 36 voxels of its 3-channel map, i.e. fewer than 12 pixels.
SPECK_PIXELS = 36 // 3


def _build(paths: list[Path]) -> Any:
    from controlnet_aux.teed.ted import TED

    model = TED()
    model.load_state_dict(torch.load(paths[0], map_location="cpu", weights_only=True))
    return model.eval()


def teed_edges(model: torch.nn.Module, image: np.ndarray, safe_steps: int) -> np.ndarray:
    """HxW edge strength in 0..1 for an HxWx3 uint8 picture: the mean of TEED's maps through a sigmoid, quantised
    to `safe_steps` levels (0: continuous)."""
    from controlnet_aux.util import safe_step

    height, width = image.shape[:2]
    weight = next(model.parameters())
    with torch.inference_mode():
        pixels = torch.from_numpy(image).to(weight.device, weight.dtype).permute(2, 0, 1)[None]  # 1 3 h w, 0..255
        maps = [m[0, 0].float().cpu().numpy() for m in model(pixels)]
    maps = [cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps]
    edge = 1.0 / (1.0 + np.exp(-np.mean(maps, axis=0, dtype=np.float64)))
    return safe_step(edge, safe_steps) if safe_steps else edge


def to_uint8(strength: np.ndarray) -> np.ndarray:
    """0..1 strength -> uint8 (truncated, as the extension and controlnet-aux write TEED's map)."""
    return (strength * 255.0).clip(0, 255).astype(np.uint8)


def lineart_standard(image: np.ndarray) -> np.ndarray:
    """HxW line darkness in 0..1: how much darker each pixel is than its blurred surroundings (the darkest channel),
    scaled so that the median line reaches LINEART_GAIN, as uint8 steps (the node reads the uint8 map)."""
    x = image.astype(np.float32)
    dark = np.min(cv2.GaussianBlur(x, (0, 0), LINEART_SIGMA) - x, axis=2).clip(0, 255)
    lines = dark[dark > LINEART_THRESHOLD]
    dark /= max(LINEART_MEDIAN_FLOOR, float(np.median(lines)) if lines.size else 0.0)
    return (dark * LINEART_GAIN).clip(0, 255).astype(np.uint8) / 255.0


def anyline_map(mteed: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """Screen blend of the line art (specks dropped) over the MTEED edges, both HxW in 0..1."""
    from skimage.morphology import remove_small_objects

    kept = remove_small_objects(lines > 0, max_size=SPECK_PIXELS - 1, connectivity=1)
    lines = lines * kept
    return 1.0 - (1.0 - lines) * (1.0 - mteed)


def _resized(image: np.ndarray, resolution: int) -> np.ndarray:
    from controlnet_aux.util import resize_image

    return resize_image(image, resolution)


def softedge_teed(image: np.ndarray, resolution: int, models_dir: str | os.PathLike[str] | None,
                  params: Mapping[str, float]) -> np.ndarray:  # fmt: skip
    model = cached_load("teed", (TEED_FILE,), _build, models_dir, "softedge_teed")
    return to_uint8(teed_edges(model, _resized(image, resolution), int(params["safe_steps"])))


def softedge_anyline(image: np.ndarray, resolution: int, models_dir: str | os.PathLike[str] | None,
                     params: Mapping[str, float]) -> np.ndarray:  # fmt: skip
    model = cached_load("mteed", (MTEED_FILE,), _build, models_dir, "softedge_anyline")
    detect = _resized(image, resolution)
    mteed = to_uint8(teed_edges(model, detect, int(params["safe_steps"]))) / 255.0  # the node reads the uint8 map
    return to_uint8(anyline_map(mteed, lineart_standard(detect)))
