"""ControlNet Union units: each unit's control type, and the units that share one Union model run as one forward.

The control type of a unit is its `control_type`, or else the one its preprocessor (or condition) names, by the
A1111 extension's rule (scripts/enums.py `ControlNetUnionControlType.from_str`, which reads the unit's control-type
tag) widened to preprocessor names:

    0 openpose   openpose*, dwpose*, dw_openpose*
    1 depth      depth*
    2 softedge   softedge*, scribble*, hed, pidi*, ted / teed (thick lines)
    3 canny      canny, lineart* (lineart_anime too), mlsd, anyline (thin lines)
    4 normal     normal* (normal_bae, normalbae)
    5 segment    seg* (seg_ade20k, segmentation)
    6 tile       tile*, blur               (ProMax only)
    7 repaint    inpaint*, outpaint        (ProMax only; holes in the hint are read as black)

The numbers are xinsir's (ControlNetPlus's README, diffusers' `control_mode`). Preprocessors that name no type
("none", "invert", "shuffle") need an explicit `control_type` on a Union unit.

Several units naming the same Union model in one request give ONE forward with one condition each, as diffusers'
ControlNetUnionModel takes a list of control images: each unit's scale (0 outside its start..end) multiplies that
condition inside the model and the residuals are not scaled again; the first unit's mode (balanced, prompt,
control) and region mask apply to the group. One unit alone is scaled like any ControlNet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Self

import torch

from cldm.models.controlnet_union import ControlNetUnion, UnionHint
from cldm.pipeline.vocabulary import Choice

if TYPE_CHECKING:
    from cldm.pipeline.request import ControlUnit


class ControlType(Choice):
    """A ControlNet Union's control type: the members in the model's index order, the values A1111's labels."""

    OPENPOSE = "OpenPose"
    DEPTH = "Depth"
    SOFTEDGE = "Soft Edge"  # hed / pidi / scribble / ted
    CANNY = "Hard Edge"  # canny / lineart / anime lineart / mlsd
    NORMAL = "Normal Map"
    SEGMENT = "Segmentation"
    TILE = "Tile"  # ProMax
    REPAINT = "Inpaint"  # ProMax: inpainting and outpainting

    @property
    def index(self) -> int:
        """The type's row in the model's `task_embedding` and its place in the one-hot vector."""
        return list(type(self)).index(self)

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"pose": "openpose", "hed": "softedge", "scribble": "softedge", "hard edge": "canny",
                "lineart": "canny", "mlsd": "canny", "normalmap": "normal", "normal map": "normal",
                "seg": "segment", "segmentation": "segment", "inpaint": "repaint", "outpaint": "repaint",
                "blur": "tile"}  # fmt: skip

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(cls):
            return list(cls)[value]  # diffusers' control_mode numbers
        return super()._missing_(value)


# name prefixes of preprocessors and conditions -> their type, in the order they are tried
_PREFIXES: tuple[tuple[tuple[str, ...], ControlType], ...] = (
    (("openpose", "dwpose", "dw_openpose"), ControlType.OPENPOSE),
    (("depth",), ControlType.DEPTH),
    (("softedge", "scribble", "hed", "pidi", "ted", "teed"), ControlType.SOFTEDGE),
    (("canny", "lineart", "mlsd", "anyline"), ControlType.CANNY),
    (("normal",), ControlType.NORMAL),
    (("seg",), ControlType.SEGMENT),
    (("tile", "blur"), ControlType.TILE),
    (("inpaint", "outpaint"), ControlType.REPAINT),
)


def type_of_preprocessor(name: str) -> ControlType | None:
    """The control type a preprocessor or condition name stands for (None: it names none)."""
    name = name.strip().lower()
    return next((t for prefixes, t in _PREFIXES if name.startswith(prefixes)), None)


def control_type_of(u: ControlUnit) -> ControlType | None:
    """The unit's control type: its own `control_type`, else its preprocessor's."""
    if u.control_type is not None:  # ControlUnit made a name or number a ControlType: anything else names none
        return u.control_type if isinstance(u.control_type, ControlType) else None
    return type_of_preprocessor(u.preprocessor)


def union_problems(units: Sequence[ControlUnit], who: Callable[[int, ControlUnit], str]) -> list[str]:
    """What stops the Union units from running: a type that cannot be told, or one the model does not have."""
    out = []
    for i, u in enumerate(units):
        if not isinstance(u.model, ControlNetUnion):
            continue
        t = control_type_of(u)
        n = u.model.union.control_types
        if not isinstance(t, ControlType):
            said = f"control_type {u.control_type!r}" if u.control_type is not None else (
                f"preprocessor {u.preprocessor!r}" if u.preprocessor else "no preprocessor")  # fmt: skip
            out.append(f"{who(i, u)} is a ControlNet Union and its {said} names no control type: give control_type, "
                       f"one of {', '.join(ControlType.keys()[:n])}")  # fmt: skip
        elif t.index >= n:
            out.append(f"{who(i, u)}: control type {t.key} needs a ProMax Union (8 types); this one has {n}: "
                       f"choose one of {', '.join(ControlType.keys()[:n])}")  # fmt: skip
    return out


def merged(
    units: Sequence[ControlUnit], hints: Sequence[torch.Tensor], is_on: Callable[[ControlUnit], bool]
) -> list[tuple[ControlUnit, object]]:
    """(unit, hint) pairs to run at one step: plain units as they are; the units of each Union model as one entry,
    its hint a `UnionHint`. A group of several whose units are all off (or at scale 0) is left out."""
    out: list[tuple[ControlUnit, object]] = []
    done: list[ControlNetUnion] = []
    for u, emb in zip(units, hints):
        if not isinstance(u.model, ControlNetUnion):
            out.append((u, emb))
            continue
        if any(u.model is m for m in done):
            continue
        done.append(u.model)
        group = [(v, e) for v, e in zip(units, hints) if v.model is u.model]
        features = tuple(e for _, e in group)
        types = tuple(control_type_of(v).index for v, _ in group)
        if len(group) == 1:
            out.append((u, UnionHint(features, types)))
            continue
        scales = tuple(float(v.scale) if is_on(v) else 0.0 for v, _ in group)
        if any(scales):  # the scales act inside the model: the group's residuals are taken at 1, at every step
            out.append((replace(u, scale=1.0, start=0.0, end=1.0), UnionHint(features, types, scales)))
    return out
