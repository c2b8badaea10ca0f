"""The hint for a picture to generate, as the app and the batch make it: the preprocessor runs at the chosen
resolution (or A1111's pixel-perfect one), its output is resized once to the mode's scaled size and then cut or
padded to the picture size (`cldm.pipeline.fit`)."""

from __future__ import annotations

import os

import numpy as np

import annotators
from annotators.images import MAX_RESOLUTION, MIN_RESOLUTION
from cldm.pipeline.fit import fit_rgb, geometry, pixel_perfect_resolution
from cldm.pipeline.vocabulary import ResizeMode


def pixel_perfect(img: np.ndarray, width: int, height: int, resize_mode: ResizeMode | str) -> int:
    """A1111's pixel-perfect preprocessor resolution for this picture and size, within the preprocessors' range."""
    res = pixel_perfect_resolution(img.shape[1], img.shape[0], width, height, resize_mode)
    return min(MAX_RESOLUTION, max(MIN_RESOLUTION, res))


def fitted_hint(
    preprocessor: str,
    img: np.ndarray,
    width: int,
    height: int,
    resize_mode: ResizeMode | str = ResizeMode.CROP,
    resolution: int | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    **params: float,
) -> np.ndarray:
    """`preprocessor` (an `annotators` name: "canny", "depth_midas", "scribble_sketch", ...) on `img` (HxWx3 uint8)
    at `resolution` (None: A1111's pixel-perfect one), as a width x height RGB hint fitted by `resize_mode`;
    `params` are the preprocessor's sliders (canny: low_threshold, high_threshold). Weights the preprocessor needs
    come from `models_dir/annotators/` or the Hugging Face cache."""
    if resolution is None:
        resolution = pixel_perfect(img, width, height, resize_mode)
    w, h, _, _ = geometry(img.shape[1], img.shape[0], width, height, resize_mode)
    hint = annotators.run(preprocessor, img, resolution=resolution, models_dir=models_dir, size=(h, w), **params)
    return fit_rgb(hint, width, height, resize_mode)
