"""ControlNet studio: a Gradio app with one tab per condition (built from `conditions.CONDITIONS`) and a Multi tab.

Only the layout lives here: every panel is a record of named widgets whose values come back to the handlers as
records (`studio.UnitSettings`, `studio.Settings`); what a click does is in `studio.py`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import gradio as gr

from batch_tab import batch_tab
from canvas import editor_image
from cldm.errors import CldmError, InputError
from cldm.fit import picture_size
from cldm.manager import ModelManager
from cldm.weights import DEFAULT_BASE_REPO, VAE_FROM_CHECKPOINT
from conditions import CONDITIONS, EXAMPLES_DIR, Condition
from forms import BasePanel, Form, SizePanel, UnitOptionsPanel
from gate import arrived, middleware
from handlers import friendly, session, stop_button, streamed
from launch import quiet_dependencies, read_auth
from panels import (
    LORA_LIST,
    MAX_UI_SIZE,
    VAE_LIST,
    image_prompt_panel,
    pass_panel,
    reference_panel,
    settings_panel,
    unit_panel,
)
from png_info import Receivers, png_info_tab
from studio import Limits, Studio, choose_base, condition

log = logging.getLogger("app")
MAX_UNITS = 3  # ControlNets in the Multi tab
MAX_FILE_SIZE = "20mb"
MULTI_DEFAULTS = ("canny", "depth", "openpose")  # the Multi tab's first conditions (a model card names its own)


def _example(studio: Studio, cond: Condition) -> tuple[str, str, str]:
    if studio.card is not None and cond.key in studio.card.examples:
        e = studio.card.examples[cond.key]
        return e["image"], e["preprocessor"], e["prompt"]
    return cond.example


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


def condition_tab(studio: Studio, cond: Condition, base: BasePanel) -> Receivers:
    """One tab, for any row of the condition table."""
    with gr.Row():
        with gr.Column():
            unit = unit_panel(studio, [cond], elem_id=f"{cond.key}-image")
            use_size = gr.Button("Use the picture's size", size="sm", elem_id=f"{cond.key}-size")
            settings = settings_panel(studio, cond)
            extras = pass_panel(cond, cond.key, studio.models_dir)
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
    size_button(use_size, unit.image, settings)
    size = SizePanel(settings.widgets["width"], settings.widgets["height"])
    preview_form, hint_form = Form(unit, size), Form(unit, size, UnitOptionsPanel([unit]))
    run_form = Form(unit, settings)
    gen_form = Form(unit, settings, UnitOptionsPanel([unit]), extras, ip, base)

    @friendly(studio)
    def do_preview(*values):
        u, size = preview_form.read(values)
        return studio.shown(studio.hint(u, size))

    @friendly(studio)
    def do_hint(*values):
        u, size, (options,) = hint_form.read(values)
        return studio.shown(studio.hint(replace(u, **options), size))

    @friendly(studio)
    def do_run(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        u, s = run_form.read(values)
        return studio.generate([u], s, progress, session=session(request), sent_at=arrived(request))

    @friendly(studio)
    def do_generate(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008
        u, s, (options,), more, image_prompt, base_name = gen_form.read(values)
        who, sent = session(request), arrived(request)

        def work(prog, show):
            return studio.generate([replace(u, **options)], s, prog, image_prompt, session=who, extras=more,
                                   preview=show, base=base_name, sent_at=sent)  # fmt: skip

        yield from streamed(studio, work, progress, who)

    # the buttons send everything the tab shows; `/<key>_run` and `/<key>_preview` keep the parameters API callers
    # know
    preview.click(do_hint, hint_form.inputs, hint_view, api_name=f"{cond.key}_hint")
    run.click(do_generate, gen_form.inputs, [gallery, status, files], api_name=f"{cond.key}_generate")
    api_only = gr.Button(visible=False)
    api_only.click(do_run, run_form.inputs, [gallery, status, files], api_name=f"{cond.key}_run")
    api_only.click(do_preview, preview_form.inputs, hint_view, api_name=f"{cond.key}_preview")
    stop_button(studio, stop, cond.key)
    return Receivers(cond.key, settings, [unit])


def multi_tab(studio: Studio, base: BasePanel) -> Receivers:
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
            extras = pass_panel(None, "multi", studio.models_dir)
            ip = image_prompt_panel(studio, "multi")
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column():
            gallery = gr.Gallery(label="Hints and results", columns=2, format="png")
            status = gr.Markdown()
            files = gr.Files(label="Download PNGs (with parameters)")
    form, gen_form = Form(*units, settings), Form(*units, settings, UnitOptionsPanel(units), extras, ip, base)

    def chosen_units(records, options) -> list:
        chosen = [replace(u, **o) for u, o in zip(records[: len(units)], options) if u is not None]
        if not chosen:
            raise InputError("Enable at least one ControlNet.")
        return chosen

    @friendly(studio)
    def do_run(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        records = form.read(values)
        chosen = chosen_units(records, [{}] * len(units))
        return studio.generate(chosen, records[len(units)], progress, session=session(request),
                               sent_at=arrived(request))  # fmt: skip

    @friendly(studio)
    def do_generate(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008
        records = gen_form.read(values)
        s, options, more, image_prompt, base_name = records[len(units) :]
        chosen, who, sent = chosen_units(records, options), session(request), arrived(request)

        def work(prog, show):
            return studio.generate(chosen, s, prog, image_prompt, session=who, extras=more, preview=show,
                                   base=base_name, sent_at=sent)  # fmt: skip

        yield from streamed(studio, work, progress, who)

    run.click(do_generate, gen_form.inputs, [gallery, status, files], api_name="multi_generate")
    api_only = gr.Button(visible=False)
    api_only.click(do_run, form.inputs, [gallery, status, files], api_name="multi_run")
    stop_button(studio, stop, "multi")
    return Receivers("multi", settings, units)


def picture_prompt_tab(studio: Studio, base: BasePanel) -> None:
    """Pictures from a prompt and a picture, no ControlNet: an IP-Adapter image prompt, a reference, or both."""
    with gr.Row():
        with gr.Column():
            ip = image_prompt_panel(studio, "image_prompt", open_=True)
            with gr.Accordion("Reference (reference_only, no weights needed)", open=True):
                ref = reference_panel("image_prompt")
            settings = settings_panel(studio, None, key="image_prompt")
            extras = pass_panel(None, "image_prompt", studio.models_dir)
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="image_prompt-run")
                stop = gr.Button("Stop", variant="stop", elem_id="image_prompt-stop")
        with gr.Column():
            gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id="image_prompt-gallery")
            status = gr.Markdown(elem_id="image_prompt-status")
            files = gr.Files(label="Download PNGs (with parameters)")
    form, gen_form = Form(ip, ref, settings), Form(ip, ref, settings, extras, base)

    @friendly(studio)
    def do_run(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        image_prompt, reference, s = form.read(values)
        return studio.generate([], s, progress, image_prompt, reference, session=session(request),
                               sent_at=arrived(request))  # fmt: skip

    @friendly(studio)
    def do_generate(request: gr.Request, *values, progress=gr.Progress()):  # noqa: B008
        image_prompt, reference, s, more, base_name = gen_form.read(values)
        who, sent = session(request), arrived(request)

        def work(prog, show):
            return studio.generate([], s, prog, image_prompt, reference, session=who, extras=more, preview=show,
                                   base=base_name, sent_at=sent)  # fmt: skip

        yield from streamed(studio, work, progress, who)

    # the button sends everything the tab shows (img2img, hires fix, the base); `/image_prompt_run` keeps the
    # parameters API callers know
    run.click(do_generate, gen_form.inputs, [gallery, status, files], api_name="image_prompt_generate")
    api_only = gr.Button(visible=False)
    api_only.click(do_run, form.inputs, [gallery, status, files], api_name="image_prompt_run")
    stop_button(studio, stop, "image_prompt")


def build_app(studio: Studio, banner: str = "", delete_cache: tuple[int, int] | None = (3600, 86400)) -> gr.Blocks:
    """The whole UI. Gradio's copies of uploads and results are deleted once a day old (checked hourly)."""
    with gr.Blocks(title="ControlNet studio", delete_cache=delete_cache) as demo:
        gr.Markdown("# ControlNet studio\nStable Diffusion 1.5 + ControlNet 1.1. " + banner)
        # every Generate names its base: a switch loads it (freeing the other) and the ControlNets stay
        with gr.Row():
            base = BasePanel(gr.Dropdown(list(studio.bases), value=next(iter(studio.bases)), label="Base model",
                                         allow_custom_value=True, elem_id="base-model", scale=4))  # fmt: skip
            refresh = gr.Button("↻ Refresh model lists", elem_id="refresh-models", scale=1)
        with gr.Tabs() as tabs:
            receivers = []
            for cond in CONDITIONS:
                with gr.Tab(cond.label, id=cond.key):
                    receivers.append(condition_tab(studio, cond, base))
            with gr.Tab("Multi", id="multi"):
                receivers.append(multi_tab(studio, base))
            with gr.Tab("Image prompt", id="image_prompt"):
                picture_prompt_tab(studio, base)
            with gr.Tab("Batch", id="batch"):
                batch_tab(studio, base)
            with gr.Tab("PNG info", id="png_info"):
                png_info_tab(studio, receivers, tabs)
        refresh_lists(studio, demo, base, refresh)
    return demo


def refresh_lists(studio: Studio, demo: gr.Blocks, base: BasePanel, button: gr.Button) -> None:
    """The Refresh button: the models folder read again (bases, LoRAs, VAEs, embeddings) into every list on the page,
    without a restart; the choices made stay where they still exist."""
    tagged = lambda cls: [b for b in demo.blocks.values() if cls in (getattr(b, "elem_classes", None) or [])]  # noqa: E731
    loras, vaes = tagged(LORA_LIST), tagged(VAE_LIST)

    def do_refresh():
        lists = studio.refresh_models()
        gr.Info(f"Found {lists.summary}.")
        return (gr.update(choices=lists.bases), *[gr.update(choices=lists.loras, visible=bool(lists.loras))] * len(loras),
                *[gr.update(choices=[VAE_FROM_CHECKPOINT, *lists.vaes])] * len(vaes))  # fmt: skip

    button.click(friendly(studio)(do_refresh), None, [base.choice, *loras, *vaes], api_name="refresh_models")


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
    p.add_argument("--low-vram", action="store_true", help="keep only the running module on the GPU (slower; for "
                   "4-6 GB cards)")  # fmt: skip
    p.add_argument("--no-prepack", action="store_true", help="bf16 on the CPU without the prepacked convolutions "
                   "(about 2 GiB less memory with one ControlNet; slower steps)")  # fmt: skip
    p.add_argument("--no-trim-memory", action="store_true", help="leave freed memory with the allocator after each "
                   "request (the server's RSS then creeps up; see docs on the load test)")  # fmt: skip
    g = p.add_argument_group("serving on Ray (pip install -r requirements-scale.txt)")
    g.add_argument("--serve-replicas", type=int, default=0, metavar="N",
                   help="run the model as a Ray Serve deployment of N replicas (one per GPU); N requests at once")  # fmt: skip
    g.add_argument("--ray", default="local", metavar="ADDRESS", help="with --serve-replicas: the Ray cluster to "
                   "join (auto, ray://host:10001); default: start a local one")  # fmt: skip
    g.add_argument("--cpus-per-replica", type=float, default=1.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_dependencies()
    auth = read_auth(a.auth, a.auth_file)
    if a.share and not auth:
        log.warning("--share without --auth: anyone with the link can use every endpoint of this server")
    base, card, banner = choose_base(a.base, a.demo)
    # textual inversions in <models>/embeddings, used by file name in any prompt (as A1111's embeddings folder)
    embeddings_dir = Path(str(card.folder) if card else a.models_dir) / "embeddings"
    if a.serve_replicas > 0:
        from scale.serve import start

        manager = start(base, a.serve_replicas, a.ray, a.device, a.dtype, int(a.cache_gb * 1024**3),
                        str(embeddings_dir), a.cpus_per_replica)  # fmt: skip
    else:
        manager = ModelManager(base, device=a.device, dtype=a.dtype, cache_bytes=int(a.cache_gb * 1024**3),
                               low_vram=a.low_vram, prepack_cpu=not a.no_prepack,
                               trim_memory=not a.no_trim_memory)  # fmt: skip
    log.warning("running on %s in %s%s", manager.device, str(manager.dtype).removeprefix("torch."),
                " (prepacked bf16 convolutions)" if manager.prepack_cpu else "")  # fmt: skip
    for name, why in manager.load_embeddings(embeddings_dir).items():
        log.warning("embedding %s left out: %s", name, why)
    limits = Limits.for_device(manager.device.type)
    limits = replace(limits, keep_outputs=a.keep_outputs, **({} if a.max_work is None else {"max_work": a.max_work}))
    # a model with a card (the demo model) ships its ControlNets beside it
    studio = Studio(manager, str(card.folder) if card else a.models_dir, a.out_dir, card=card, limits=limits)
    where = f"{a.serve_replicas} Ray Serve replicas on {manager.device}" if a.serve_replicas else manager.device
    demo = build_app(studio, banner=f"{banner} Device: {where}.")
    demo.queue(max_size=a.queue_size, default_concurrency_limit=max(1, a.serve_replicas))  # one per replica
    serve(demo, server_name=a.host, server_port=a.port, share=a.share, allowed_paths=[str(studio.out_dir)],
          auth=auth or None)  # fmt: skip


def serve(demo: gr.Blocks, **options):
    """`demo.launch(**options)` with the gate (`gate.py`) in front of every route and the upload size cap.

    Errors Gradio raises itself before a handler runs are not shown (they name server paths, e.g. "Cannot move
    /srv/app/file:/etc/passwd ..."); every handler's own error is a gr.Error, which Gradio always shows."""
    return demo.launch(
        app_kwargs={"middleware": middleware()}, max_file_size=MAX_FILE_SIZE, show_error=False, **options
    )


if __name__ == "__main__":
    main()
