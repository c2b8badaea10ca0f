"""Hints that need no network: the user's own drawing, inverted pictures, the image as it is."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from annotators.errors import AnnotatorError

# A pixel counts as a stroke when it is this far (0..255) from the background's brightness side. 127 is the split
# the ControlNet 1.1 interactive scribble demo used for a white canvas.
STROKE_THRESHOLD = 127
EMPTY_SKETCH = "The sketch is empty: draw something first"


def scribble_sketch(
    image: np.ndarray, resolution: int, models_dir: str | None, params: Mapping[str, float]
) -> np.ndarray:
    """A browser drawing -> white strokes on black, whatever the canvas colour.

    The background is whichever side of mid-grey most pixels are on: on a light canvas any pixel with a dark
    channel is ink (so coloured strokes count), on a dark canvas any pixel with a bright channel is.
    """
    grey = image.mean(axis=2)
    light_background = np.count_nonzero(grey > STROKE_THRESHOLD) * 2 >= grey.size
    if light_background:
        strokes = image.min(axis=2) < STROKE_THRESHOLD
    else:
        strokes = image.max(axis=2) > STROKE_THRESHOLD
    if not strokes.any():
        raise AnnotatorError(EMPTY_SKETCH)
    hint = np.zeros_like(image)
    hint[strokes] = 255
    return hint


def invert(image: np.ndarray, resolution: int, models_dir: str | None, params: Mapping[str, float]) -> np.ndarray:
    """255 - image: black-on-white line drawings become the white-on-black hints line models expect."""
    return 255 - image


def identity(image: np.ndarray, resolution: int, models_dir: str | None, params: Mapping[str, float]) -> np.ndarray:
    """The image itself (for users who bring a ready-made hint)."""
    return image.copy()
