"""Hint extractors ("preprocessors") for ControlNet 1.1: one registry name -> image in, hint out.

Wraps controlnet-aux (and transformers for segmentation). Never imports cldm or gradio.
"""

from annotators.registry import (
    ANNOTATORS,
    Annotator,
    AnnotatorError,
    MissingAnnotatorWeights,
    Param,
    missing_weights,
    run,
)
from annotators.weights import WeightFile

__all__ = [
    "ANNOTATORS",
    "Annotator",
    "AnnotatorError",
    "MissingAnnotatorWeights",
    "Param",
    "WeightFile",
    "missing_weights",
    "run",
]
