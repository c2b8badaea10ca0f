"""The PNG info tab: drop a PNG made by this app or by A1111, see its parameters, and send them to a tab (prompt,
negative prompt, sampler, steps, CFG, seed, size and each ControlNet unit with its control model)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from cldm.errors import InputError
from cldm.hints.conditions import CONDITIONS, Condition
from cldm.io.images import read_parameters
from cldm.models.family import FAMILIES
from cldm.pipeline.infotext import Infotext, UnitInfo, parse_parameters
from cldm.pipeline.request import stem
from studio.control_models import OWN_MODEL
from studio.forms import SettingsPanel, UnitPanel
from studio.handlers import friendly
from studio.service import Studio

SETTINGS_SENT = ("prompt", "negative_prompt", "sampler", "steps", "cfg", "seed", "randomize", "width", "height",
                 "denoise")  # fmt: skip
UNIT_SENT = ("preprocessor", "resolution", "scale", "start", "end", "mode", "resize", "pixel_perfect")


@dataclass
class Receivers:
    """A tab's widgets that "send to" fills: its settings and its units (a Multi tab's with on/off and condition)."""

    key: str
    label: str  # the tab's name, as "Send to" lists it
    settings: SettingsPanel
    units: list[UnitPanel]

    @property
    def outputs(self) -> list:
        """The settings, each unit's fields, then each unit's Model list (last, as the tab's form takes it)."""
        out = [self.settings.widgets[k] for k in SETTINGS_SENT]
        for u in self.units:
            out += ([u.enabled, u.choice] if u.choice is not None else []) + [getattr(u, k) for k in UNIT_SENT]
        return out + [u.model for u in self.units]


def match_condition(model: str) -> Condition | None:
    """The condition a ControlNet model name stands for: its file stem, else the longest condition key in it
    (control_sd15_canny, diffusers names ...)."""
    name = stem(model.split(" [")[0]).lower()
    for c in CONDITIONS:
        if c.stem == name:
            return c
    for c in sorted(CONDITIONS, key=lambda c: -len(c.key)):
        if c.key in name:
            return c
    return None


@dataclass
class TabBars:
    """The page's tab bars, for "Send to" to open the tab it fills: the top one, and the conditions' tabs inside its
    ControlNet tab."""

    top: gr.Tabs
    conditions_tab: str  # the top bar's tab that holds the conditions' tabs
    conditions: gr.Tabs

    def select(self, key: str) -> list:
        """Updates for (top, conditions) that open tab `key` (a condition's, or Multi)."""
        if any(c.key == key for c in CONDITIONS):
            return [gr.Tabs(selected=self.conditions_tab), gr.Tabs(selected=key)]
        return [gr.Tabs(selected=key), gr.skip()]


def _checked(widget, value, what: str):
    """`value` for `widget` (gr.skip() where the PNG says nothing), refused by name when it is outside the widget's
    range: a value the tab cannot hold is not quietly changed into one the picture was not made with."""
    if value is None:
        return gr.skip()
    lo, hi = getattr(widget, "minimum", None), getattr(widget, "maximum", None)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"The PNG's {what} is {value:g}; the tab takes {lo:g} to {hi:g}. Nothing was sent.")
    return value


def _unit_values(panel: UnitPanel, u: UnitInfo | None, cond: Condition | None) -> list:
    head = []
    if panel.choice is not None:
        if u is None or cond is None:
            return [False, gr.skip()] + [gr.skip()] * len(UNIT_SENT)
        head = [True, cond.key]
    if u is None:
        return head + [gr.skip()] * len(UNIT_SENT)
    module = u.module if cond is not None and u.module in cond.preprocessors else gr.skip()
    if panel.choice is not None and module is gr.skip() and cond is not None:
        module = cond.preprocessors[0]
    return head + [
        module, _checked(panel.resolution, u.processor_res, f"ControlNet {u.index} processor resolution"),
        _checked(panel.scale, u.scale, f"ControlNet {u.index} weight"),
        _checked(panel.start, u.start, f"ControlNet {u.index} guidance start"),
        _checked(panel.end, u.end, f"ControlNet {u.index} guidance end"), u.control_mode.value, u.resize_mode.value,
        u.pixel_perfect,
    ]  # fmt: skip


def model_choice(u: UnitInfo | None, cond: Condition | None, names: list[str]):
    """The Model list's value for a unit of the PNG: the listed file it names (by stem, as A1111 writes it), else
    the condition's own ControlNet (also when the file is not here); gr.skip() when the PNG has no such unit."""
    if u is None:
        return gr.skip()
    own = {w.stem for f in FAMILIES if cond is not None and (w := cond.weights(f)) is not None}
    if u.model in own:
        return OWN_MODEL
    return next((n for n in names if stem(n) == u.model), OWN_MODEL)


def send_values(info: Infotext, r: Receivers, names: list[str]) -> list:
    """The values for `r.outputs` (gr.skip() where the picture says nothing), the units' models found among the
    Model list's `names`; InputError naming the first value outside its widget's range."""
    w = r.settings.widgets
    values = [info.prompt, info.negative_prompt, info.sampler or gr.skip(), _checked(w["steps"], info.steps, "Steps"),
              _checked(w["cfg"], info.cfg_scale, "CFG scale"), _checked(w["seed"], info.seed, "Seed"),
              False if info.seed is not None else gr.skip(), _checked(w["width"], info.width, "width"),
              _checked(w["height"], info.height, "height"),
              _checked(w["denoise"], info.denoising_strength, "Denoising strength")]  # fmt: skip
    models = []
    for i, panel in enumerate(r.units):
        u = info.units[i] if i < len(info.units) else None
        cond = (match_condition(u.model) if u is not None else None) if panel.cond is None else panel.cond
        values += _unit_values(panel, u, cond)
        models.append(model_choice(u, cond, names))
    return values + models


def suggested_tab(info: Infotext) -> str:
    if len(info.units) > 1:
        return "multi"
    cond = match_condition(info.units[0].model) if info.units else None
    return cond.key if cond is not None else CONDITIONS[0].key


def summary(info: Infotext) -> dict:
    out = {"prompt": info.prompt, "negative prompt": info.negative_prompt, "steps": info.steps,
           "sampler": info.sampler or info.sampler_label, "CFG scale": info.cfg_scale, "seed": info.seed,
           "size": f"{info.width}x{info.height}" if info.width else None}  # fmt: skip
    for u in info.units:
        out[f"ControlNet {u.index}"] = {"model": u.model, "module": u.module, "weight": u.scale, "start": u.start,
                                        "end": u.end, "control mode": u.control_mode.key, "resize mode": u.resize_mode.key,
                                        "pixel perfect": u.pixel_perfect}  # fmt: skip
    return out


def png_info_tab(studio: Studio, receivers: list[Receivers], tabs: TabBars) -> None:
    by_key = {r.key: r for r in receivers}
    with gr.Row():
        with gr.Column():
            png = gr.File(label="A PNG made by this app or by A1111", file_types=[".png"], type="filepath",
                          elem_id="png_info-file")  # fmt: skip
            target = gr.Dropdown([(r.label, r.key) for r in receivers], value=receivers[0].key, label="Send to",
                                 elem_id="png_info-target")  # fmt: skip
            send = gr.Button("Send to tab", variant="primary", elem_id="png_info-send")
        with gr.Column():
            fields = gr.JSON(label="Parameters")
            raw = gr.Textbox(label="Parameters text", lines=6, elem_id="png_info-text")

    def infotext(path) -> tuple[str, Infotext]:
        """The PNG's parameters text (read once: only its text chunks, never its pixels) and what it says."""
        if path is None:
            raise gr.Error("Drop a PNG first.", print_exception=False)
        text = read_parameters(path) or ""
        return text, parse_parameters(text)

    @friendly(studio)
    def do_read(path):
        if path is None:
            return None, "", gr.skip()
        text, info = infotext(path)
        return summary(info), text, suggested_tab(info)

    @friendly(studio)
    def do_send(path, key):
        if key not in by_key:
            raise InputError(f"Unknown tab {key!r}; send to one of {', '.join(by_key)}.")
        _, info = infotext(path)
        values = []
        for r in receivers:
            values += send_values(info, r, studio.control_models()) if r.key == key else [gr.skip()] * len(r.outputs)
        return [*values, *tabs.select(key)]

    png.change(do_read, png, [fields, raw, target], api_name="png_info_read")
    send.click(do_send, [png, target], [o for r in receivers for o in r.outputs] + [tabs.top, tabs.conditions],
               api_name="png_info_send")  # fmt: skip
