"""The page: one tab per condition (built from `cldm.hints.conditions.CONDITIONS`), a Multi tab and the others.

Only the layout lives here: every panel is a record of named widgets whose values come back to the handlers as
records (`settings.UnitSettings`, `settings.Settings`); what a click does is in `service.py`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import gradio as gr

from cldm.errors import CldmError, InputError
from cldm.hints.conditions import CONDITIONS, EXAMPLES_DIR, Condition
from cldm.io.locate import VAE_FROM_CHECKPOINT
from cldm.pipeline.fit import picture_size
from studio.availability import ready_first
from studio.batch_tab import batch_tab
from studio.canvas import editor_image
from studio.control_models import OWN_MODEL
from studio.forms import BasePanel, ControlModelPanel, Form, SizePanel, UnitOptionsPanel, tab_id, tab_note
from studio.handlers import Call, Hint, friendly, tab_endpoints
from studio.panels import (
    CONTROL_LIST,
    LORA_LIST,
    MAX_UI_SIZE,
    VAE_LIST,
    image_prompt_panel,
    image_prompt_slots,
    pass_panel,
    reference_panel,
    results_panel,
    settings_panel,
    unit_panel,
)
from studio.png_info import Receivers, TabBars, png_info_tab
from studio.service import Studio, condition

log = logging.getLogger("app")
MAX_UNITS = 3  # ControlNets in the Multi tab
IMAGE_PROMPT_SLOTS = 2  # IP-Adapters in the Image prompt tab, each with its picture, strength and region
MULTI_DEFAULTS = ("canny", "depth", "openpose")  # the Multi tab's first conditions (a model card names its own)
CONTROLNET_TAB = "controlnet"  # the tab that holds one tab per condition


def size_button(button: gr.Button, image, settings) -> None:
    """ "Use the picture's size": width and height from the picture, its aspect ratio kept, multiples of 8."""

    def use_size(value):
        img = editor_image(value)
        if img is None:
            gr.Info("Upload a picture first.")
            return gr.skip(), gr.skip()
        return picture_size(img.shape[1], img.shape[0], MAX_UI_SIZE)

    outputs = [settings.widgets["width"], settings.widgets["height"]]
    button.click(friendly_size(use_size), image, outputs, queue=False, api_name=False)


def friendly_size(fn):
    def wrapped(value):
        try:
            return fn(value)
        except CldmError as e:
            raise gr.Error(str(e), print_exception=False) from e

    return wrapped


def example_picture(studio: Studio, cond: Condition, picture: str):
    """An example's picture as its widget takes it: the file, or for a model card's inpaint example the picture with
    its painted layer (the mask), as the editor holds a painted picture."""
    example = studio.card.examples.get(cond.key, {}) if studio.card is not None else {}
    if not cond.inpaint or "mask" not in example or example["image"] != picture:
        return str(EXAMPLES_DIR / picture)
    return {"background": str(EXAMPLES_DIR / picture), "layers": [str(EXAMPLES_DIR / example["mask"])],
            "composite": str(EXAMPLES_DIR / picture)}  # fmt: skip


def condition_tab(studio: Studio, cond: Condition, base: BasePanel) -> Receivers:
    """One tab, for any row of the condition table: the prompt, the picture and its options on the left; Generate,
    Stop, the progress, the results and the hint on the right."""
    state = studio.tabs[cond.key]  # what runs here, decided at start-up (availability.py)
    live = tab_note(state, cond.key)
    with gr.Row():
        with gr.Column():
            settings = settings_panel(studio, cond)
            unit = unit_panel(studio, [cond], elem_id=f"{cond.key}-image")
            if cond.img2img or cond.inpaint:  # the tab's own picture is the init picture
                settings.widgets["denoise"].render()
            with gr.Row():
                preview = gr.Button("Preview hint", size="sm", interactive=live, elem_id=f"{cond.key}-preview")
                use_size = gr.Button("Use the picture's size", size="sm", elem_id=f"{cond.key}-size")
            extras = pass_panel(cond, cond.key, settings, studio.models_dir)
            ip = image_prompt_panel(studio, cond.key)
        with gr.Column():
            run, stop, status, gallery = results_panel(cond.key, interactive=live)
            hint_view = gr.Image(
                label="Hint", type="numpy", interactive=False, format="png", elem_id=f"{cond.key}-hint"
            )
            files = gr.Files(label="Download PNGs (with parameters)")
    if state.example is not None:  # none when no example runs here
        picture, preprocessor, prompt = state.example
        gr.Examples([[example_picture(studio, cond, picture), preprocessor, prompt]],
                    [unit.image, unit.preprocessor, settings.widgets["prompt"]], label="Example")  # fmt: skip
    size_button(use_size, unit.image, settings)
    if not live:  # a greyed tab runs with a file picked in its Model list (missing preprocessor weights are said
        # at Generate)
        unit.model.change(lambda m: [gr.update(interactive=m != OWN_MODEL)] * 2, unit.model, [run, preview],
                          queue=False, api_name=False)  # fmt: skip
    size = SizePanel(settings.widgets["width"], settings.widgets["height"])

    def hint(records) -> str:
        u, size, (options,) = records
        return studio.shown(studio.hint(replace(u, **options), size))

    def job(records, call: Call):
        u, s, (options,), more, image_prompt, base_name, (model,), guidance = records
        return generated(studio, call, [replace(u, **options, **model)], s, more, base_name, image_prompt,
                         guidance=guidance)  # fmt: skip

    # each button sends everything the tab shows, by name
    form = Form(
        unit, settings, UnitOptionsPanel([unit]), extras, ip, base, ControlModelPanel([unit]), settings.guidance
    )
    tab_endpoints(studio, cond.key, form, job, [gallery, status, files], run, stop, f"{cond.label}: pictures from the "
                  "prompt, controlled by the hint of the picture (the unit, the settings, its control options, "
                  "img2img / hires fix / preview, the image prompt, the base; then, optional, the control model file "
                  "(null: the condition's own ControlNet), the effective region and the guidance extras (eta, cfg_rescale, "
                  "freeu, pag_scale, pag_layers).",
                  hint=Hint(preview, Form(unit, size, UnitOptionsPanel([unit])), hint, hint_view))  # fmt: skip
    return Receivers(cond.key, cond.label, settings, [unit])


def generated(studio: Studio, call: Call, units: list, s, more, base_name: str | None, image_prompt=None,
              reference=None, guidance=None):  # fmt: skip
    """What a tab's Generate runs: `studio.generate` with the call's session, arrival, progress and previews."""
    return studio.generate(units, s, call.progress, image_prompt, reference, session=call.session, extras=more,
                           preview=call.preview, base=base_name, sent_at=call.sent_at, guidance=guidance)  # fmt: skip


def multi_tab(studio: Studio, base: BasePanel) -> Receivers:
    """Up to three ControlNets at once, each with the same panel as a condition tab (preprocessor sliders included)."""
    choices = [c for c in CONDITIONS if not c.inpaint]
    defaults = ready_first(studio.tabs, studio.card.conditions if studio.card else MULTI_DEFAULTS, choices)
    units = []
    with gr.Row():
        with gr.Column():
            settings = settings_panel(studio, None)
            for i in range(MAX_UNITS):
                first = condition(defaults[i % len(defaults)])
                with gr.Group():
                    enabled = gr.Checkbox(value=i < 2, label=f"ControlNet {i + 1}")
                    choice = gr.Dropdown([(c.label, c.key) for c in choices], value=first.key, label="Condition",
                                         allow_custom_value=True)  # fmt: skip
                    panel = unit_panel(studio, choices, first, label="Picture")
                    # the preprocessors follow the condition in the browser; the panel holds every one's sliders
                    choice.change(lambda k: gr.update(choices=list(condition(k).preprocessors),
                                                      value=studio.tabs[k].preprocessor), choice, panel.preprocessor,
                                  api_name=False)  # fmt: skip
                panel.enabled, panel.choice, panel.tag = enabled, choice, f"_{i + 1}"
                units.append(panel)
            extras = pass_panel(None, "multi", settings, studio.models_dir)
            ip = image_prompt_panel(studio, "multi")
        with gr.Column():
            run, stop, status, gallery = results_panel("multi", "Hints and results")
            files = gr.Files(label="Download PNGs (with parameters)")

    def job(records, call: Call):
        s, options, more, image_prompt, base_name, models, guidance = records[len(units) :]
        chosen = [replace(u, **o, **m) for u, o, m in zip(records[: len(units)], options, models) if u is not None]
        if not chosen:
            raise InputError("Enable at least one ControlNet.")
        return generated(studio, call, chosen, s, more, base_name, image_prompt, guidance=guidance)

    tab_endpoints(studio, "multi", Form(*units, settings, UnitOptionsPanel(units), extras, ip, base,
                                        ControlModelPanel(units), settings.guidance), job,
                  [gallery, status, files], run, stop, "Multi: pictures controlled by up to three ControlNets at once "
                  "(each unit's parameters end with _1, _2, _3; a unit switched off may leave its values null; each "
                  "unit's control model file and effective region, then the guidance extras, come last and may be left out).")  # fmt: skip
    return Receivers("multi", "Multi", settings, units)


def picture_prompt_tab(studio: Studio, base: BasePanel) -> None:
    """Pictures from a prompt and a picture, no ControlNet: an IP-Adapter image prompt, a reference, or both."""
    with gr.Row():
        with gr.Column():
            settings = settings_panel(studio, None, key="image_prompt")
            ips = image_prompt_slots(studio, "image_prompt", IMAGE_PROMPT_SLOTS)
            with gr.Accordion("Reference (reference_only, no weights needed)", open=True):
                ref = reference_panel("image_prompt")
            extras = pass_panel(None, "image_prompt", settings, studio.models_dir)
        with gr.Column():
            run, stop, status, gallery = results_panel("image_prompt")
            files = gr.Files(label="Download PNGs (with parameters)")

    def job(records, call: Call):
        *prompts, reference, s, more, base_name, guidance = records
        given = [p for p in prompts if p is not None]
        return generated(studio, call, [], s, more, base_name, given, reference, guidance=guidance)

    tab_endpoints(studio, "image_prompt", Form(*ips, ref, settings, extras, base, settings.guidance), job,
                  [gallery, status, files], run,
                  stop, "Image prompt: pictures from the prompt and pictures, no ControlNet (IP-Adapter image "
                  "prompts, each with an optional region mask; the second slot's parameters end with _2; a "
                  "reference; or both; the guidance extras last, optional).")  # fmt: skip


def build_app(studio: Studio, banner: str = "", delete_cache: tuple[int, int] | None = (3600, 86400)) -> gr.Blocks:
    """The whole UI. Gradio's copies of uploads and results are deleted once a day old (checked hourly)."""
    with gr.Blocks(title="ControlNet studio", delete_cache=delete_cache) as demo:
        gr.Markdown("# ControlNet studio\nStable Diffusion 1.5, 2.x and XL + ControlNet. " + banner)
        # every Generate names its base: a switch loads it (freeing the other) and the ControlNets stay
        with gr.Row():
            base = BasePanel(gr.Dropdown(list(studio.bases), value=next(iter(studio.bases)), label="Base model",
                                         allow_custom_value=True, elem_id="base-model", scale=4))  # fmt: skip
            refresh = gr.Button("↻ Refresh model lists", elem_id="refresh-models", scale=1)
        # every tab in sight: the conditions' tabs inside one ControlNet tab, both tab bars wrap rather than hide
        with gr.Tabs(overflow_behavior="wrap", elem_id="tabs") as tabs:
            receivers = []
            with gr.Tab("ControlNet", id=CONTROLNET_TAB):
                with gr.Tabs(overflow_behavior="wrap", elem_id="condition-tabs") as condition_tabs:
                    for cond in CONDITIONS:
                        with gr.Tab(cond.label, id=cond.key, elem_id=tab_id(studio.tabs[cond.key], cond.key)):
                            receivers.append(condition_tab(studio, cond, base))
            with gr.Tab("Multi", id="multi"):
                receivers.append(multi_tab(studio, base))
            with gr.Tab("Image prompt", id="image_prompt"):
                picture_prompt_tab(studio, base)
            with gr.Tab("Batch", id="batch"):
                batch_tab(studio, base)
            with gr.Tab("PNG info", id="png_info"):
                png_info_tab(studio, receivers, TabBars(tabs, CONTROLNET_TAB, condition_tabs))
        refresh_lists(studio, demo, base, refresh)
        sizes_follow_base(studio, base, receivers)
    return demo


def sizes_follow_base(studio: Studio, base: BasePanel, receivers: list[Receivers]) -> None:
    """Picking a base of another family sets every tab's width and height to the new base's native size (SD1.5 512,
    SD2 768-v 768, SDXL 1024), as A1111 users reset them by hand; sizes are left alone while the family stays."""
    sliders = [r.settings.widgets[k] for r in receivers for k in ("width", "height")]
    last = {"size": studio.size}  # what the sliders start at

    def on_base(name):
        try:
            size = studio.native_size(name)
        except CldmError as e:  # a hub id not downloaded yet: its size is known once it is loaded
            log.info("no native size for %s yet (%s)", name, e)
            return [gr.update() for _ in sliders]
        if size == last["size"]:
            return [gr.update() for _ in sliders]
        last["size"] = size
        gr.Info(f"{name}: {studio.family_of(studio.base_for(name))} base, pictures of {size} x {size} px")
        return [gr.update(value=size) for _ in sliders]  # one update each: Gradio consumes what it is given

    base.choice.change(friendly(studio)(on_base), base.choice, sliders, api_name=False)


def refresh_lists(studio: Studio, demo: gr.Blocks, base: BasePanel, button: gr.Button) -> None:
    """The Refresh button: the models folder read again (bases, control models, LoRAs, VAEs, embeddings) into every
    list on the page, without a restart; the choices made stay where they still exist."""
    tagged = lambda cls: [b for b in demo.blocks.values() if cls in (getattr(b, "elem_classes", None) or [])]  # noqa: E731
    loras, vaes, controls = tagged(LORA_LIST), tagged(VAE_LIST), tagged(CONTROL_LIST)

    def do_refresh():
        lists = studio.refresh_models()
        gr.Info(f"Found {lists.summary}.")
        return (gr.update(choices=lists.bases), *[gr.update(choices=lists.loras, visible=bool(lists.loras)) for _ in loras],
                *[gr.update(choices=[VAE_FROM_CHECKPOINT, *lists.vaes]) for _ in vaes],
                *[gr.update(choices=[OWN_MODEL, *lists.control_models]) for _ in controls])  # fmt: skip

    button.click(friendly(studio)(do_refresh), None, [base.choice, *loras, *vaes, *controls], api_name="refresh_models")
