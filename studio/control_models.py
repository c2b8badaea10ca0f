"""Which control model a unit runs, and where: the condition's own ControlNet (the default, found through the
condition table) or a file of the models folder picked in the unit's Model list, as in the A1111 extension's unit;
and the unit's effective region.

A picked file may be any kind the library loads (ControlNet, T2I-Adapter, ControlNet Union / ProMax, Control-LoRA):
the list knows the files by name only, and the model manager reads each one's kind and family from its content when
it is used, refusing one that does not fit the base with a message that says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cldm.io import locate
from cldm.pipeline.union import ControlType, type_of_preprocessor
from studio.canvas import editor_image
from studio.settings import UnitSettings

OWN_MODEL = "The condition's own"  # the Model list's first choice, the default


def control_model_names(models_dir: str | os.PathLike | None, bases: Iterable[str]) -> list[str]:
    """The Model list's files: the models folder's control models, less the base files the page lists (the demo
    model's base sits beside its ControlNets)."""
    folder = Path(models_dir or "models")
    taken = {Path(b).resolve() for b in bases}
    return [n for n in locate.list_control_models(models_dir) if (folder / n).resolve() not in taken]


def chosen_model(value: object) -> str | None:
    """A Model list's value as a unit holds it: None for the condition's own (or nothing sent through the API)."""
    return None if value in (None, "", OWN_MODEL) else str(value)


def model_path(unit: UnitSettings, family: str, models_dir: str | None) -> Path:
    """The weights the unit runs: its picked file, else its condition's ControlNet for a base of `family` (one that
    `availability.controlnet_problem` finds none for is refused before this)."""
    if unit.model is not None:
        return locate.locate_control_model(unit.model, models_dir)
    weights = unit.cond.weights(family)
    return locate.locate_controlnet(weights.stem, weights.repo, models_dir, weights.file)


def control_type(unit: UnitSettings, preprocessor: str) -> ControlType | None:
    """The control type a picked file takes should it be a ControlNet Union: None where the preprocessor names one
    (the library reads it there, A1111's rule), else the one the unit's condition names (a "none" or "invert"
    preprocessor on the Depth tab: depth; inpaint: repaint). The condition's own ControlNet, never a Union, gets
    None; other kinds of model ignore it."""
    if unit.model is None or type_of_preprocessor(preprocessor) is not None:
        return None
    return type_of_preprocessor(unit.cond.key)


def region_mask(unit: UnitSettings) -> np.ndarray | None:
    """The unit's effective region as a picture (HxWx3 uint8; the library reads its first channel, white = acts)."""
    return editor_image(unit.region)
