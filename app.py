"""ControlNet studio: a Gradio app with one tab per condition (built from `conditions.CONDITIONS`) and a Multi tab.

Only the layout lives here: every panel is a record of named widgets whose values come back to the handlers as
records (`studio.UnitSettings`, `studio.Settings`); what a click does is in `studio.py`.
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import replace

import gradio as gr
import numpy as np
import torch

import annotators
from cldm.errors import CldmError, InputError
from cldm.manager import ModelManager
from cldm.samplers import SAMPLERS
from cldm.weights import DEFAULT_BASE_REPO, IP_ADAPTERS
from conditions import ADDED_PROMPT, CONDITIONS, EXAMPLES_DIR, NEGATIVE_PROMPT, Condition
from forms import Form, ImagePromptPanel, ModePanel, ReferencePanel, SettingsPanel, SizePanel, UnitPanel
from launch import quiet_dependencies, read_auth
from studio import CONTROL_MODES, MAX_SEED, REFERENCE_PREPROCESSORS, Limits, Studio, choose_base, condition

log = logging.getLogger("app")
MAX_UNITS = 3  # ControlNets in the Multi tab
MAX_FILE_SIZE = "20mb"
MULTI_DEFAULTS = ("canny", "depth", "openpose")  # the Multi tab's first conditions (a model card names its own)


def upload_image(**kwargs) -> gr.Image:
    """A gr.Image whose handler gets the uploaded file's path untouched, for `cldm.images.load_rgb` to read.

    Gradio's own preprocessing squashes 16-bit pictures to white and answers corrupt files with its own error;
    our reader handles those (and CMYK, palette, animated, huge) with messages that say what to do. (A subclass
    would do the same, but Gradio writes a .pyi stub next to any module that subclasses a component.)
    """
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = lambda payload: None if payload is None else payload.path
    return component


def friendly(studio: Studio):
    """Handler wrapper: our errors become a message in the UI (no server paths, HTML-escaped) and one log line;
    anything else is logged with its traceback, once, and shown only by its type."""

    def wrap(fn):
        @functools.wraps(fn)  # Gradio reads the signature (the progress parameter) through __wrapped__
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (CldmError, annotators.AnnotatorError) as e:
                message = studio.public(str(e))
                log.info("refused %s: %s", fn.__name__, message)
                raise gr.Error(message, print_exception=False) from e
            except torch.cuda.OutOfMemoryError as e:
                log.warning("out of GPU memory in %s", fn.__name__)
                message = "Out of GPU memory: lower the resolution or the number of images."
                raise gr.Error(message, print_exception=False) from e
            except Exception as e:
                log.exception("unexpected error in %s", fn.__name__)
                message = f"Internal error ({type(e).__name__}); the server log has the details."
                raise gr.Error(message, print_exception=False) from e

        return wrapped

    return wrap


# ------------------------------------------------------------------------------------------------------ UI
def settings_panel(studio: Studio, cond: Condition | None, key: str = "") -> SettingsPanel:
    """The generation settings every tab has (a model with its own small vocabulary gets no quality words)."""
    d, c = studio.defaults, {}
    key = cond.key if cond else key or "multi"
    c["prompt"] = gr.Textbox(label="Prompt", placeholder=cond.prompt_hint if cond else "", elem_id=f"{key}-prompt")
    with gr.Accordion("Settings", open=False, elem_id=f"{key}-settings"):
        c["added_prompt"] = gr.Textbox(label="Added prompt", value=ADDED_PROMPT if d.quality_words else "")
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", value=NEGATIVE_PROMPT if d.quality_words else "")
        with gr.Row():
            c["batch"] = gr.Slider(1, 4, value=1, step=1, label="Images")
            c["width"] = gr.Slider(64, 1024, value=d.size, step=64, label="Width", elem_id=f"{key}-width")
            c["height"] = gr.Slider(64, 1024, value=d.size, step=64, label="Height", elem_id=f"{key}-height")
        with gr.Row():
            c["steps"] = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id=f"{key}-steps")
            c["cfg"] = gr.Slider(0.1, 30.0, value=d.cfg, step=0.1, label="Guidance scale")
            c["sampler"] = gr.Dropdown(sorted(SAMPLERS), value=d.sampler, label="Sampler", allow_custom_value=True)
        with gr.Row():
            c["seed"] = gr.Number(value=12345, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            c["randomize"] = gr.Checkbox(value=True, label="Randomize seed")
            c["guess_mode"] = gr.Checkbox(value=False, label="Guess mode (no prompt needed)")
        c["denoise"] = gr.Slider(0.05, 1.0, value=0.75 if cond and cond.img2img else 1.0, step=0.05,
                                 label="Denoising strength", visible=bool(cond and (cond.img2img or cond.inpaint)))  # fmt: skip
    return SettingsPanel(c)


def _blank_canvas() -> dict:
    white = np.full((512, 512, 3), 255, np.uint8)
    return {"background": white, "layers": [], "composite": white}


def _picture(cond: Condition | None, size: int, label: str, elem_id: str | None):
    """The picture widget: a drawing canvas for sketches and inpainting masks, else an upload box."""
    if cond is not None and (cond.sketch or cond.inpaint):
        return gr.ImageEditor(
            label=label or ("Draw, or upload a picture" if cond.sketch else "Picture: paint the area to change"),
            type="numpy", image_mode="RGBA", canvas_size=(512, 512), elem_id=elem_id,
            # Gradio's brush size is a radius in canvas pixels (a size-8 brush leaves 16 px strokes on the 512 canvas,
            # measured): 2 px strokes once scaled down to a 64 px demo picture (what the demo scribbles were trained
            # on), 12 px (1/43 of the picture) for SD1.5
            brush=gr.Brush(colors=["#000000" if cond.sketch else "#ffffff"],
                           default_size=max(6, 512 // size) if cond.sketch else 24),
            value=_blank_canvas() if cond.sketch else None,
        )  # fmt: skip
    # a file path, so that our reader (16-bit, CMYK, palette, animated, corrupt files) handles every upload
    return upload_image(label=label or "Input picture", sources=["upload", "clipboard", "webcam"], elem_id=elem_id)


def unit_panel(
    studio: Studio, conds: list[Condition], first: Condition | None = None, label: str = "", elem_id: str | None = None
) -> UnitPanel:
    """Picture, preprocessor, its sliders and the control sliders of one ControlNet of any of `conds` (`first` is
    the one shown first). The sliders of every preprocessor of `conds` are there, in table order (the API's order),
    and only the chosen preprocessor's are visible."""
    first = first or conds[0]
    image = _picture(first if len(conds) == 1 else None, studio.size, label, elem_id)
    # a Multi panel's choices follow its condition in the browser; API callers may name any preprocessor of it
    # the handler checks the name (and says so, escaped) rather than Gradio's unescaped "not in the list of choices"
    annotator = gr.Dropdown(list(first.annotators), value=first.annotators[0], label="Preprocessor",
                            allow_custom_value=True)  # fmt: skip
    # detection at the picture size by default (512 for SD1.5; the demo model's canny edges were found at 64 px)
    resolution = gr.Slider(64, 1024, value=studio.size, step=64, label="Preprocessor resolution")
    names = list(dict.fromkeys(a for c in conds for a in c.annotators))  # every preprocessor the panel may show
    params = {
        (name, p.name): gr.Slider(p.minimum, p.maximum, value=p.default, step=p.step, label=p.label,
                                  visible=name == first.annotators[0])
        for name in names for p in annotators.ANNOTATORS[name].params
    }  # fmt: skip
    with gr.Row():
        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control strength")
        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Control start")
        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Control end")
    mode = gr.Radio(list(CONTROL_MODES), value="Balanced", label="Control mode")
    keys = list(params)
    annotator.change(lambda a: [gr.update(visible=k[0] == a) for k in keys], annotator, [params[k] for k in keys])
    return UnitPanel(image, annotator, resolution, scale, start, end, params, cond=first if len(conds) == 1 else None,
                     mode=mode)  # fmt: skip


def _example(studio: Studio, cond: Condition) -> tuple[str, str, str]:
    if studio.card is not None and cond.key in studio.card.examples:
        e = studio.card.examples[cond.key]
        return e["image"], e["preprocessor"], e["prompt"]
    return cond.example


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def stop_button(studio: Studio, stop: gr.Button, status: gr.Markdown, key: str) -> None:
    """Stop: this browser session's running generation ends at its next step boundary and frees the model lock (it
    runs outside the queue's one-at-a-time limit, so it is answered while the generation runs)."""

    def do_stop(request: gr.Request = None):
        gr.Info(studio.stop(_session(request)))

    stop.click(do_stop, None, None, api_name=f"{key}_stop", concurrency_limit=None, queue=False)


def image_prompt_panel(studio: Studio, key: str, open_: bool = False) -> ImagePromptPanel:
    """The Image prompt accordion (IP-Adapter): a picture whose look the result takes on, beside the text prompt."""
    with gr.Accordion("Image prompt (IP-Adapter)", open=open_, elem_id=f"{key}-ip"):
        image = upload_image(label="Image prompt", sources=["upload", "clipboard"], elem_id=f"{key}-ip-image")
        with gr.Row():
            adapter = gr.Dropdown(list(IP_ADAPTERS), value=IP_ADAPTERS[0], label="IP-Adapter", allow_custom_value=True)
            scale = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Image prompt strength")
    return ImagePromptPanel(image, adapter, scale)


def reference_panel(key: str) -> ReferencePanel:
    """Reference-only (no weights): the A1111 extension's reference preprocessors."""
    image = upload_image(label="Reference picture", sources=["upload", "clipboard"], elem_id=f"{key}-reference-image")
    with gr.Row():
        pre = gr.Dropdown(list(REFERENCE_PREPROCESSORS), value="reference_only", label="Preprocessor",
                          allow_custom_value=True)  # fmt: skip
        fidelity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Style fidelity")
        weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control weight")
    return ReferencePanel(image, pre, fidelity, weight)


def condition_tab(studio: Studio, cond: Condition) -> None:
    """One tab, for any row of the condition table."""
    with gr.Row():
        with gr.Column():
            unit = unit_panel(studio, [cond], elem_id=f"{cond.key}-image")
            settings = settings_panel(studio, cond)
            ip = image_prompt_panel(studio, cond.key)
            with gr.Row():
                preview = gr.Button("Preview hint", elem_id=f"{cond.key}-preview")
                run = gr.Button("Generate", variant="primary", elem_id=f"{cond.key}-run")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{cond.key}-stop")
        with gr.Column():
            hint_view = gr.Image(
                label="Hint", type="numpy", interactive=False, format="png", elem_id=f"{cond.key}-hint"
            )
            gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id=f"{cond.key}-gallery")
            status = gr.Markdown(elem_id=f"{cond.key}-status")
            files = gr.Files(label="Download PNGs (with parameters)")
    picture, annotator, prompt = _example(studio, cond)
    gr.Examples([[str(EXAMPLES_DIR / picture), annotator, prompt]], [unit.image, unit.annotator, settings.widgets["prompt"]],
                label="Example")  # fmt: skip
    preview_form = Form(unit, SizePanel(settings.widgets["width"], settings.widgets["height"]))
    run_form = Form(unit, settings)
    ip_form = Form(unit, settings, ModePanel([unit.mode]), ip)

    @friendly(studio)
    def do_preview(*values):
        u, size = preview_form.read(values)
        return studio.hint(u, size)

    @friendly(studio)
    def do_run(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        u, s = run_form.read(values)
        return studio.generate([u], s, progress, session=_session(request))

    @friendly(studio)
    def do_run_ip(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008
        u, s, (mode,), image_prompt = ip_form.read(values)
        return studio.generate([replace(u, mode=mode)], s, progress, image_prompt, session=_session(request))

    preview.click(do_preview, preview_form.inputs, hint_view, api_name=f"{cond.key}_preview")
    # the button sends everything the tab shows (control mode, image prompt); `/<key>_run` keeps the parameters API
    # callers know
    run.click(do_run_ip, ip_form.inputs, [gallery, status, files], api_name=f"{cond.key}_generate")
    api_only = gr.Button(visible=False)
    api_only.click(do_run, run_form.inputs, [gallery, status, files], api_name=f"{cond.key}_run")
    stop_button(studio, stop, status, cond.key)


def multi_tab(studio: Studio) -> None:
    """Up to three ControlNets at once, each with the same panel as a condition tab (preprocessor sliders included)."""
    choices = [c for c in CONDITIONS if not c.inpaint]
    defaults = studio.card.conditions if studio.card else MULTI_DEFAULTS
    units = []
    with gr.Row():
        with gr.Column():
            for i in range(MAX_UNITS):
                first = condition(defaults[i % len(defaults)])
                with gr.Group():
                    enabled = gr.Checkbox(value=i < 2, label=f"ControlNet {i + 1}")
                    choice = gr.Dropdown(
                        [c.key for c in choices], value=first.key, label="Condition", allow_custom_value=True
                    )
                    panel = unit_panel(studio, choices, first, label="Picture")
                    # the preprocessors follow the condition in the browser; the panel holds every one's sliders
                    choice.change(lambda k: gr.update(choices=list(condition(k).annotators),
                                                      value=condition(k).annotators[0]), choice, panel.annotator)  # fmt: skip
                panel.enabled, panel.choice = enabled, choice
                units.append(panel)
            settings = settings_panel(studio, None)
            ip = image_prompt_panel(studio, "multi")
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column():
            gallery = gr.Gallery(label="Hints and results", columns=2, format="png")
            status = gr.Markdown()
            files = gr.Files(label="Download PNGs (with parameters)")
    form, ip_form = Form(*units, settings), Form(*units, settings, ModePanel([u.mode for u in units]), ip)

    def run_units(values, progress, with_ip: bool, session: str | None):
        records = (ip_form if with_ip else form).read(values)
        modes = records[len(units) + 1] if with_ip else ["balanced"] * len(units)
        chosen = [replace(u, mode=m) for u, m in zip(records[: len(units)], modes) if u is not None]
        s, image_prompt = records[len(units)], (records[-1] if with_ip else None)
        if not chosen:
            raise InputError("Enable at least one ControlNet.")
        return studio.generate(chosen, s, progress, image_prompt, session=session)

    @friendly(studio)
    def do_run(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        return run_units(values, progress, with_ip=False, session=_session(request))

    @friendly(studio)
    def do_run_ip(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008
        return run_units(values, progress, with_ip=True, session=_session(request))

    run.click(do_run_ip, ip_form.inputs, [gallery, status, files], api_name="multi_generate")
    api_only = gr.Button(visible=False)
    api_only.click(do_run, form.inputs, [gallery, status, files], api_name="multi_run")
    stop_button(studio, stop, status, "multi")


def picture_prompt_tab(studio: Studio) -> None:
    """Pictures from a prompt and a picture, no ControlNet: an IP-Adapter image prompt, a reference, or both."""
    with gr.Row():
        with gr.Column():
            ip = image_prompt_panel(studio, "image_prompt", open_=True)
            with gr.Accordion("Reference (reference_only, no weights needed)", open=True):
                ref = reference_panel("image_prompt")
            settings = settings_panel(studio, None, key="image_prompt")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="image_prompt-run")
                stop = gr.Button("Stop", variant="stop", elem_id="image_prompt-stop")
        with gr.Column():
            gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id="image_prompt-gallery")
            status = gr.Markdown(elem_id="image_prompt-status")
            files = gr.Files(label="Download PNGs (with parameters)")
    form = Form(ip, ref, settings)

    @friendly(studio)
    def do_run(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        image_prompt, reference, s = form.read(values)
        return studio.generate([], s, progress, image_prompt, reference, session=_session(request))

    run.click(do_run, form.inputs, [gallery, status, files], api_name="image_prompt_run")
    stop_button(studio, stop, status, "image_prompt")


def build_app(studio: Studio, banner: str = "", delete_cache: tuple[int, int] | None = (3600, 86400)) -> gr.Blocks:
    """The whole UI. Gradio's copies of uploads and results are deleted once a day old (checked hourly)."""
    with gr.Blocks(title="ControlNet studio", delete_cache=delete_cache) as demo:
        gr.Markdown("# ControlNet studio\nStable Diffusion 1.5 + ControlNet 1.1. " + banner)
        with gr.Tabs():
            for cond in CONDITIONS:
                with gr.Tab(cond.label, id=cond.key):
                    condition_tab(studio, cond)
            with gr.Tab("Multi", id="multi"):
                multi_tab(studio)
            with gr.Tab("Image prompt", id="image_prompt"):
                picture_prompt_tab(studio)
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="ControlNet studio web app")
    p.add_argument("--base", default=DEFAULT_BASE_REPO, help="hub id, .safetensors/.ckpt file or diffusers folder")
    p.add_argument("--models-dir", default="models", help="local ControlNet (and annotator) weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache-gb", type=float, default=4.0, help="CPU memory for cached ControlNets")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (use it with --auth)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD", help="require a login (repeatable)")
    p.add_argument("--auth-file", help="a file of USER:PASSWORD lines (keeps passwords out of the process list)")
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--max-work", type=float, help="megapixel-steps one request may take (default: 32 on the CPU, "
                   "400 on CUDA; 512x512 x 20 steps x 1 picture is 5.2)")  # fmt: skip
    p.add_argument("--keep-outputs", type=int, default=500, help="result PNGs kept on the server (oldest go first)")
    p.add_argument("--out-dir", help="folder for result PNGs (default: a new temporary folder)")
    p.add_argument("--demo", action="store_true", help="use the small shapes model shipped in assets/demo")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_dependencies()
    auth = read_auth(a.auth, a.auth_file)
    if a.share and not auth:
        log.warning("--share without --auth: anyone with the link can use every endpoint of this server")
    base, card, banner = choose_base(a.base, a.demo)
    manager = ModelManager(base, device=a.device, dtype=a.dtype, cache_bytes=int(a.cache_gb * 1024**3))
    limits = Limits.for_device(manager.device.type)
    limits = replace(limits, keep_outputs=a.keep_outputs, **({} if a.max_work is None else {"max_work": a.max_work}))
    # a model with a card (the demo model) ships its ControlNets beside it
    studio = Studio(manager, str(card.folder) if card else a.models_dir, a.out_dir, card=card, limits=limits)
    demo = build_app(studio, banner=f"{banner} Device: {manager.device}.")
    demo.queue(max_size=a.queue_size, default_concurrency_limit=1)
    demo.launch(server_name=a.host, server_port=a.port, share=a.share, max_file_size=MAX_FILE_SIZE,
                allowed_paths=[str(studio.out_dir)], show_error=True, auth=auth or None)  # fmt: skip


if __name__ == "__main__":
    main()
