"""The registry: one name -> one hint extractor, with its sliders, and `run()` that checks inputs and sizes."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from annotators import depth_anything, detectors, dwpose, segmentation, sketch, teed
from annotators.errors import AnnotatorError, MissingAnnotatorWeights
from annotators.images import as_rgb, check_resolution, to_size
from annotators.weights import WeightFile, on_disk

__all__ = ["ANNOTATORS", "Annotator", "AnnotatorError", "MissingAnnotatorWeights", "Param", "missing_weights", "run"]

log = logging.getLogger(__name__)

# (image RGB uint8, resolution, models_dir, params with defaults filled in) -> hint at any size
DetectFn = detectors.DetectFn


@dataclass(frozen=True)
class Param:
    """One extra slider the UI shows for an annotator."""

    name: str
    label: str
    minimum: float
    maximum: float
    default: float
    step: float


@dataclass(frozen=True)
class Annotator:
    """A registry entry: name, UI label, sliders, the weight files it needs, and the function that runs it."""

    name: str
    label: str
    params: tuple[Param, ...] = ()
    weights: tuple[WeightFile, ...] = ()  # for a transformers model: its config (it finds its own weights)
    _fn: DetectFn | None = field(default=None, repr=False, compare=False)
    # Label maps (segmentation) must keep their exact palette colours when resized back to the input size.
    _nearest: bool = field(default=False, repr=False, compare=False)

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights)


_CANNY_PARAMS = (
    Param("low_threshold", "Canny low threshold", 1, 255, 100, 1),
    Param("high_threshold", "Canny high threshold", 1, 255, 200, 1),
)
_MLSD_PARAMS = (
    Param("value_threshold", "MLSD value threshold", 0.01, 2.0, 0.1, 0.01),
    Param("distance_threshold", "MLSD distance threshold", 0.01, 20.0, 0.1, 0.01),
)
_LERES_PARAMS = (
    Param("remove_near", "Remove near %", 0, 100, 0, 1),
    Param("remove_background", "Remove background %", 0, 100, 0, 1),
)
# The A1111 extension's "Safe Steps" slider of TEED and AnyLine: how many levels the edges are quantised to (0: none).
_SAFE_STEPS = (Param("safe_steps", "Safe steps", 0, 10, teed.DEFAULT_SAFE_STEPS, 1),)


def _entries() -> tuple[Annotator, ...]:
    d, seg, da, dw, pose = detectors, segmentation, depth_anything, dwpose, dwpose.DWPOSE_FILES
    body, hand, face = d.OPENPOSE_BODY_FILE, d.OPENPOSE_HAND_FILE, d.OPENPOSE_FACE_FILE
    return (
        Annotator("none", "None (use the image as the hint)", _fn=sketch.identity),
        Annotator("invert", "Invert (black-on-white drawing)", _fn=sketch.invert),
        Annotator("scribble_sketch", "Sketch (your drawing)", _fn=sketch.scribble_sketch, _nearest=True),
        Annotator("canny", "Canny edges", _CANNY_PARAMS, _fn=d.canny),
        Annotator("shuffle", "Content shuffle", (Param("seed", "Shuffle seed", 0, 2**31 - 1, 0, 1),), _fn=d.shuffle),
        Annotator("mlsd", "M-LSD straight lines", _MLSD_PARAMS, (d.MLSD_FILE,), _fn=d.mlsd),
        Annotator("depth_midas", "Depth (MiDaS)", (), (d.MIDAS_FILE,), _fn=d.depth_midas),
        Annotator("depth_zoe", "Depth (ZoeDepth)", (), (d.ZOE_FILE,), _fn=d.depth_zoe),
        Annotator("depth_leres", "Depth (LeReS)", _LERES_PARAMS, (d.LERES_FILE,), _fn=d.depth_leres),
        Annotator("normal_bae", "Normal map (BAE)", (), (d.NORMAL_BAE_FILE,), _fn=d.normal_bae),
        Annotator(
            "seg_ade20k", "Segmentation (ADE20K, UperNet)", (), (seg.SEG_CONFIG,), _fn=seg.seg_ade20k, _nearest=True
        ),
        Annotator("openpose", "OpenPose (body)", (), (body,), _fn=d.openpose),
        Annotator("openpose_hand", "OpenPose (body + hands)", (), (body, hand), _fn=d.openpose_hand),
        Annotator("openpose_face", "OpenPose (body + face)", (), (body, face), _fn=d.openpose_face),
        Annotator("openpose_full", "OpenPose (body + hands + face)", (), (body, hand, face), _fn=d.openpose_full),
        Annotator("scribble_hed", "Scribble from HED", (), (d.HED_FILE,), _fn=d.scribble_hed),
        Annotator("scribble_pidinet", "Scribble from PiDiNet", (), (d.PIDINET_FILE,), _fn=d.scribble_pidinet),
        Annotator("softedge_hed", "Soft edges (HED)", (), (d.HED_FILE,), _fn=d.softedge_hed),
        Annotator("softedge_hedsafe", "Soft edges (HED, safe)", (), (d.HED_FILE,), _fn=d.softedge_hedsafe),
        Annotator("softedge_pidinet", "Soft edges (PiDiNet)", (), (d.PIDINET_FILE,), _fn=d.softedge_pidinet),
        Annotator("softedge_pidisafe", "Soft edges (PiDiNet, safe)", (), (d.PIDINET_FILE,), _fn=d.softedge_pidisafe),
        Annotator("lineart", "Line art (fine)", (), (d.LINEART_FILE,), _fn=d.lineart),
        Annotator("lineart_coarse", "Line art (coarse)", (), (d.LINEART_COARSE_FILE,), _fn=d.lineart_coarse),
        Annotator("lineart_anime", "Line art (anime)", (), (d.LINEART_ANIME_FILE,), _fn=d.lineart_anime),
        Annotator("depth_anything_v2", "Depth (Depth Anything v2, small)", (),
                  (da.DEPTH_ANYTHING_V2["Small"].config,), _fn=da.depth_anything_v2),
        Annotator("depth_anything_v2_base", "Depth (Depth Anything v2, base)", (),
                  (da.DEPTH_ANYTHING_V2["Base"].config,), _fn=da.depth_anything_v2_base),
        Annotator("depth_anything_v2_large", "Depth (Depth Anything v2, large)", (),
                  (da.DEPTH_ANYTHING_V2["Large"].config,), _fn=da.depth_anything_v2_large),
        Annotator("softedge_teed", "Soft edges (TEED)", _SAFE_STEPS, (teed.TEED_FILE,), _fn=teed.softedge_teed),
        Annotator("softedge_anyline", "AnyLine (line art for MistoLine)", _SAFE_STEPS, (teed.MTEED_FILE,),
                  _fn=teed.softedge_anyline),
        Annotator("dw_openpose", "DWPose (body)", (), pose, _fn=dw.dw_openpose),
        Annotator("dw_openpose_hand", "DWPose (body + hands)", (), pose, _fn=dw.dw_openpose_hand),
        Annotator("dw_openpose_face", "DWPose (body + face)", (), pose, _fn=dw.dw_openpose_face),
        Annotator("dw_openpose_full", "DWPose (body + hands + face)", (), pose, _fn=dw.dw_openpose_full),
    )  # fmt: skip


ANNOTATORS: dict[str, Annotator] = {a.name: a for a in _entries()}


def _check_params(annotator: Annotator, given: Mapping[str, object]) -> dict[str, float]:
    """Fill defaults and refuse unknown names, non-numbers and values outside a slider's range."""
    known = {p.name: p for p in annotator.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise AnnotatorError(f"Unknown parameter(s) for '{annotator.name}': {', '.join(unknown)} (allowed: {allowed}).")
    values: dict[str, float] = {}
    for name, param in known.items():
        value = given.get(name, param.default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise AnnotatorError(f"'{name}' of '{annotator.name}' must be a number, got {value!r}.")
        value = float(value)
        if not math.isfinite(value) or not (param.minimum <= value <= param.maximum):
            raise AnnotatorError(
                f"'{name}' of '{annotator.name}' must be between {param.minimum:g} and {param.maximum:g}, got {value:g}."
            )
        values[name] = value
    return values


def missing_weights(name: str, models_dir: str | os.PathLike[str] | None) -> tuple[WeightFile, ...]:
    """The weight files the preprocessor `name` needs that are neither in the local folder nor in the Hugging Face
    cache: what it would have to download (nothing is looked up on the network)."""
    annotator = ANNOTATORS.get(name)
    if annotator is None:
        raise AnnotatorError(f"Unknown preprocessor '{name}'. Known: {', '.join(sorted(ANNOTATORS))}.")
    return tuple(item for item in annotator.weights if not on_disk(item, models_dir))


def run(
    name: str,
    image: np.ndarray,
    resolution: int = 512,
    models_dir: str | os.PathLike[str] | None = None,
    size: tuple[int, int] | None = None,
    **params: float,
) -> np.ndarray:
    """Extract the hint `name` from `image` (HxWx3 uint8 RGB) and return it as HxWx3 uint8 RGB.

    Detection runs at `resolution` pixels on the short side (as the ControlNet 1.1 apps do), then the hint is
    resized to `size` (height, width) when given (the picture to generate), else back to the input's size.
    Weights are taken from `<models_dir>/annotators/` first, then from the Hugging Face cache/hub. Raises AnnotatorError for an unknown name, a bad image or parameter, and
    MissingAnnotatorWeights (a subclass) naming the file to download and where to put it.
    """
    annotator = ANNOTATORS.get(name)
    if annotator is None or annotator._fn is None:
        raise AnnotatorError(f"Unknown preprocessor '{name}'. Known: {', '.join(sorted(ANNOTATORS))}.")
    values = _check_params(annotator, params)
    rgb = as_rgb(image)
    detect = check_resolution(resolution)
    height, width = rgb.shape[:2]
    log.debug("annotator %s on %dx%d at %d px %s", name, width, height, detect, values)
    hint = annotator._fn(rgb, detect, models_dir, values)
    if size is not None:  # straight from the detection size to the picture size: one resize, as the 1.1 apps do
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise AnnotatorError(f"size must be positive, got {size}.")
    return to_size(hint, height, width, nearest=annotator._nearest)
