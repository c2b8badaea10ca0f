"""The app's panels as records: each panel names its widgets (the names are the API's parameter names), and `read`
turns their values back into one record (`studio.UnitSettings`, `studio.Settings`), naming any value that is
missing."""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import gradio as gr

from cldm.errors import InputError
from cldm.hints.conditions import Condition
from studio.availability import TabState
from studio.control_models import chosen_model
from studio.service import (
    CONTROL_MODES,
    INPAINT_MODES,
    RESIZE_MODES,
    UPSCALERS,
    ImagePromptSettings,
    PassSettings,
    ReferenceSettings,
    Settings,
    UnitSettings,
    condition,
)  # fmt: skip
from studio.settings import GuidanceSettings


class Form:
    """Panels whose widgets a handler takes as inputs, by name (Gradio's `inputs_kwargs`: the names are the API's
    parameter names, in the panels' order); `read` gives the values back as one record per panel. `optional` names
    the parameters an API call may leave out (a panel's `optional`): put last, they keep older positional calls
    working."""

    def __init__(self, *panels):
        self.panels = panels
        self.optional = tuple(name for p in panels for name in getattr(p, "optional", ()))
        self.named: dict[str, gr.components.Component] = {}
        for p in panels:
            for name, widget in p.named.items():
                if name in self.named:
                    raise ValueError(f"two widgets named {name!r} in one form")
                self.named[name] = widget
                _pass_none(widget)

    def read(self, values: dict) -> tuple:
        it = iter([values[name] for name in self.named])
        return tuple(p.read(it) for p in self.panels)


def _pass_none(widget) -> None:
    """Let a missing value (null through the API) reach `read`, which names the field, instead of Gradio's
    preprocessing error ("Could not preprocess input component at index 14"); Gradio's own range and choice errors
    name the widget, are escaped, and print no traceback (they are the user's errors, not the server's)."""
    if getattr(widget, "_passes_none", False):
        return
    original = widget.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        try:
            return original(payload)
        except gr.Error as e:
            name = getattr(widget, "label", None) or type(widget).__name__
            lo, hi = getattr(widget, "minimum", None), getattr(widget, "maximum", None)
            why = e.message  # a number out of range is refused with the range, never clamped into it
            if lo is not None and hi is not None and isinstance(payload, (int, float)):
                why = f"{payload:g} is out of range; give a value from {lo:g} to {hi:g}."
            raise gr.Error(html.escape(f"{name}: {why}", quote=False), print_exception=False) from e

    widget.preprocess = preprocess
    widget._passes_none = True


def _numbers(values: dict, names: tuple[str, ...]) -> None:
    """Sliders and number boxes must hold finite numbers (the API may send NaN, infinity or text)."""
    for name in names:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"{name} must be a finite number (got {v!r}).")


def _flags(values: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(values[name], bool):
            raise InputError(f"{name} must be true or false (got {values[name]!r}).")


def missing_value(names: list[str]) -> InputError:
    """The error for values that came as null through the API, naming them."""
    return InputError(f"Missing value for {', '.join(names)}: give a value (null is not one).")


def _take(it: Iterator, names: list[str], optional: tuple[str, ...] = (), tag: str = "") -> dict:
    """The next len(names) values by name; a missing one (None through the API) is named in the error (with the
    panel's `tag`, as the API names it)."""
    got = list(itertools.islice(it, len(names)))
    if len(got) != len(names):
        raise InputError(f"Missing values for this endpoint: expected {', '.join(n + tag for n in names)}.")
    missing = [n + tag for n, v in zip(names, got) if v is None and n not in optional]
    if missing:
        raise missing_value(missing)
    return dict(zip(names, got))


@dataclass
class SettingsPanel:
    """The shared generation settings: one widget per field of `studio.Settings`."""

    widgets: dict[str, gr.components.Component]
    guidance: GuidancePanel | None = None  # rendered in the Settings accordion, taken last in the tab's form

    @property
    def named(self) -> dict:
        return {f.name: self.widgets[f.name] for f in fields(Settings)}

    def read(self, it: Iterator) -> Settings:
        v = _take(it, [f.name for f in fields(Settings)])
        _numbers(v, ("batch", "width", "height", "steps", "cfg", "seed", "denoise"))
        _flags(v, ("randomize",))
        return Settings(**v)


@dataclass
class SizePanel:
    """Width and height only (what the hint preview needs of the settings)."""

    width: gr.Slider
    height: gr.Slider

    @property
    def named(self) -> dict:
        return {"width": self.width, "height": self.height}

    def read(self, it: Iterator) -> tuple[int, int]:
        v = _take(it, ["width", "height"])
        return int(v["width"]), int(v["height"])


UNIT_FIELDS = ("image", "preprocessor", "resolution", "scale", "start", "end")


@dataclass
class UnitPanel:
    """One ControlNet's widgets: picture, preprocessor with its sliders, resolution, strength, start and end.

    A condition tab's panel has one condition; the Multi tab's panels add an on/off box and a condition choice, and
    a `tag` ("_1", "_2", ...) that their parameter names end with.
    """

    image: gr.components.Component
    preprocessor: gr.Dropdown
    resolution: gr.Slider
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    params: dict[tuple[str, str], gr.Slider] = field(default_factory=dict)  # (preprocessor, parameter) -> slider
    cond: Condition | None = None  # fixed condition (a condition tab)
    # the control mode, resize mode and pixel perfect (read through a UnitOptionsPanel, not with the unit)
    mode: gr.Radio | None = None
    resize: gr.Radio | None = None
    pixel_perfect: gr.Checkbox | None = None
    enabled: gr.Checkbox | None = None  # Multi
    choice: gr.Dropdown | None = None  # Multi: the condition
    tag: str = ""  # Multi: "_1", "_2", ... after each parameter name
    # the control model and the effective region (read through a ControlModelPanel, last in the form)
    model: gr.Dropdown | None = None
    region: gr.components.Component | None = None

    @property
    def named(self) -> dict:
        head = {} if self.choice is None else {"enabled": self.enabled, "condition": self.choice}
        own = {**head, **{k: getattr(self, k) for k in UNIT_FIELDS}}
        own.update((f"{a}_{p}", w) for (a, p), w in self.params.items())
        return {name + self.tag: w for name, w in own.items()}

    def read(self, it: Iterator) -> UnitSettings | None:
        """The unit's settings, or None for a Multi unit that is switched off (its other values may be anything)."""
        head = {} if self.choice is None else _take(it, ["enabled", "condition"], ("condition",), self.tag)
        off = bool(head) and not head["enabled"]
        names = [*UNIT_FIELDS, *(f"{a}_{p}" for a, p in self.params)]
        # no picture is not an error here: the handler says to upload one; of the sliders, only the chosen
        # preprocessor's are needed
        v = _take(it, names, tuple(names) if off else ("image", *names[len(UNIT_FIELDS) :]), self.tag)
        if off:
            return None
        if head and head["condition"] is None:
            raise missing_value(["condition" + self.tag])
        cond = self.cond or condition(head["condition"])
        chosen = {p: v[f"{a}_{p}"] for a, p in self.params if a == v["preprocessor"]}
        missing = [f"{v['preprocessor']}_{p}{self.tag}" for p, value in chosen.items() if value is None]
        if missing:
            raise missing_value(missing)
        return UnitSettings(
            cond, v["image"], v["preprocessor"], v["resolution"], chosen, v["scale"], v["start"], v["end"]
        )


def _choice(value, labels: dict[str, str], what: str) -> str:
    if value not in labels:
        raise InputError(f"Unknown {what} {value!r}; choose one of {', '.join(labels)}.")
    return labels[value]


@dataclass
class UnitOptionsPanel:
    """Each unit's control mode, resize mode and pixel perfect (widgets inside each unit panel, taken after the
    settings, every unit's in turn): a dict of UnitSettings fields per unit."""

    units: list[UnitPanel]

    @property
    def named(self) -> dict:
        widgets = lambda u: {"control_mode": u.mode, "resize_mode": u.resize, "pixel_perfect": u.pixel_perfect}  # noqa: E731
        return {name + u.tag: w for u in self.units for name, w in widgets(u).items()}

    def read(self, it: Iterator) -> list[dict]:
        out = []
        for u in self.units:
            v = _take(it, ["control_mode", "resize_mode", "pixel_perfect"], tag=u.tag)
            mode, resize, perfect = v.values()
            out.append({"mode": _choice(mode, CONTROL_MODES, "control mode"),
                        "resize_mode": _choice(resize, RESIZE_MODES, "resize mode"), "pixel_perfect": bool(perfect)})  # fmt: skip
        return out


@dataclass
class ControlModelPanel:
    """Each unit's control model (the Model list) and effective region, taken last in a tab's form, every unit's in
    turn, so that the endpoints' earlier parameters keep their places: both may be left out (the condition's own
    ControlNet, acting everywhere). A dict of UnitSettings fields per unit."""

    units: list[UnitPanel]

    @property
    def named(self) -> dict:
        return {name + u.tag: w for u in self.units for name, w in (("control_model", u.model), ("region", u.region))}

    @property
    def optional(self) -> tuple[str, ...]:
        """The parameters an API call may leave out (None)."""
        return tuple(self.named)

    def read(self, it: Iterator) -> list[dict]:
        out = []
        for u in self.units:
            v = _take(it, ["control_model", "region"], ("control_model", "region"), u.tag)
            out.append({"model": chosen_model(v["control_model"]), "region": v["region"]})
        return out


PASS_FIELDS = ("init_image", "mask_blur", "inpaint_mode", "hires", "hires_scale", "hires_steps", "hires_strength",
               "hires_upscaler", "seed_per_picture", "preview_every", "clip_skip", "vae")  # fmt: skip


@dataclass
class PassPanel:
    """Around the units: an init picture (img2img on any tab), the inpaint options, the hires fix, one seed per
    picture and the live preview; one widget per field of `studio.PassSettings`."""

    widgets: dict[str, gr.components.Component]

    @property
    def named(self) -> dict:
        return {k: self.widgets[k] for k in PASS_FIELDS}

    def read(self, it: Iterator) -> PassSettings:
        v = _take(it, list(PASS_FIELDS), optional=("init_image",))
        _numbers(v, ("mask_blur", "hires_scale", "hires_steps", "hires_strength", "preview_every", "clip_skip"))
        _flags(v, ("hires", "seed_per_picture"))
        v["inpaint_mode"] = _choice(v["inpaint_mode"], INPAINT_MODES, "inpaint mode")
        v["hires_upscaler"] = _choice(v["hires_upscaler"], UPSCALERS, "hires upscaler")
        return PassSettings(**v)


@dataclass
class BasePanel:
    """The base-model choice at the top of the page (a name of `Studio.bases`; null: the page's first base)."""

    choice: gr.Dropdown

    @property
    def named(self) -> dict:
        return {"base": self.choice}

    def read(self, it: Iterator) -> str | None:
        return _take(it, ["base"], optional=("base",))["base"]


@dataclass
class ImagePromptPanel:
    """One image-prompt slot: picture (optional), adapter, scale and, where the page has one, a region mask; `tag`
    ends the names of the slots after the first ("_2")."""

    image: gr.components.Component
    adapter: gr.Dropdown
    scale: gr.Slider
    mask: gr.components.Component | None = None
    tag: str = ""

    @property
    def _names(self) -> list[str]:
        return ["image_prompt", "ip_adapter", "ip_scale", *(["ip_mask"] if self.mask is not None else [])]

    @property
    def named(self) -> dict:
        widgets = [self.image, self.adapter, self.scale, self.mask]
        return {name + self.tag: w for name, w in zip(self._names, widgets)}

    def read(self, it: Iterator) -> ImagePromptSettings | None:
        v = _take(it, self._names, optional=tuple(self._names), tag=self.tag)
        if v["image_prompt"] is None:
            return None
        missing = [k + self.tag for k in ("ip_adapter", "ip_scale") if v[k] is None]
        if missing:
            raise missing_value(missing)
        return ImagePromptSettings(v["image_prompt"], v["ip_adapter"], v["ip_scale"], v.get("ip_mask"))


@dataclass
class ReferencePanel:
    """Reference-only: picture, preprocessor (reference_only / reference_adain / reference_adain+attn), fidelity,
    weight."""

    image: gr.components.Component
    preprocessor: gr.Dropdown
    style_fidelity: gr.Slider
    weight: gr.Slider

    @property
    def named(self) -> dict:
        return {"reference": self.image, "reference_preprocessor": self.preprocessor,
                "style_fidelity": self.style_fidelity, "reference_weight": self.weight}  # fmt: skip

    def read(self, it: Iterator) -> ReferenceSettings | None:
        v = _take(it, list(self.named), optional=("reference",))
        if v["reference"] is None:
            return None
        return ReferenceSettings(
            v["reference"], v["reference_preprocessor"], v["style_fidelity"], v["reference_weight"]
        )


@dataclass
class FieldsPanel:
    """Widgets whose values a handler takes as they are, by name (the Batch tab's: the batch checks them itself);
    none may be missing but those named `optional`."""

    widgets: dict[str, gr.components.Component]
    optional: tuple[str, ...] = ()

    @property
    def named(self) -> dict:
        return dict(self.widgets)

    def read(self, it: Iterator) -> dict:
        return _take(it, list(self.widgets), self.optional)


@dataclass
class GuidancePanel(FieldsPanel):
    """The sampling extras (eta / gamma, CFG rescale, FreeU, PAG), taken last in a tab's form so that the earlier
    parameters keep their places: an API call may leave each out (then it is off)."""

    def read(self, it: Iterator) -> GuidanceSettings:
        given = {k: x for k, x in _take(it, list(self.widgets), tuple(self.widgets)).items() if x is not None}
        _numbers(given, tuple(k for k in ("eta", "cfg_rescale", "pag_scale") if k in given))
        _flags(given, tuple(k for k in ("freeu",) if k in given))
        return GuidanceSettings(**given)


NOTE_CLASS = "cldm-tab-note"  # launch.PAGE_CSS sets it off from the tab's widgets


def tab_note(state: TabState, key: str) -> bool:
    """The one line at the top of a condition tab that misses a file here (which file to get, where to put it),
    nothing for a tab that has them all; True when the tab can run (else its Generate and Preview hint are off)."""
    if state.note:
        gr.Markdown(state.note, elem_id=f"{key}-note", elem_classes=[NOTE_CLASS])
    return state.ready


def tab_id(state: TabState, key: str) -> str:
    """The condition tab's element id; one that cannot run ends in "-off", which greys its name in the tab bar."""
    return f"{key}-tab" + ("" if state.ready else "-off")
