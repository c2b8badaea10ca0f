"""ControlNet studio: a Gradio app with one tab per condition (built from `conditions.CONDITIONS`) and a Multi tab."""

from __future__ import annotations

import argparse
import functools
import logging
import random
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import torch

import annotators
from cldm import demo_eval, weights
from cldm.errors import CldmError, InputError
from cldm.images import array_to_rgb, load_rgb, resize_rgb, save_png
from cldm.manager import ControlSpec, ModelManager
from cldm.samplers import SAMPLERS
from cldm.shapes_vocab import split_known
from cldm.weights import DEFAULT_BASE_REPO, locate_controlnet
from conditions import ADDED_PROMPT, BY_KEY, CONDITIONS, EXAMPLES_DIR, NEGATIVE_PROMPT, Condition

log = logging.getLogger("app")
MAX_SEED = 2**31 - 1
MAX_UNITS = 3  # ControlNets in the Multi tab
MAX_FILE_SIZE = "20mb"
DEMO_DIR = Path(__file__).parent / "assets" / "demo"
DEMO_BASE = "shapes_sd.safetensors"
DEMO_CONDITIONS = ("canny", "scribble", "seg")  # the ControlNets trained for the demo model
DEMO_SIZE = 64  # the demo model's training size
DEMO_CAPTION = "a blue circle and a yellow star on a pink background"  # what assets/examples/shapes.png shows
DEMO_EXAMPLES = {  # what the demo tabs offer instead of the SD1.5 examples (drawn by assets/make_examples.py)
    "canny": ("shapes.png", "canny", DEMO_CAPTION),
    "scribble": ("triangle_sketch.png", "scribble_sketch", "a green triangle on a white background"),
    "seg": ("shapes_seg.png", "none", DEMO_CAPTION),  # a map painted with the shapes palette (cldm/shapes.py)
}


def upload_image(**kwargs) -> gr.Image:
    """A gr.Image whose handler gets the uploaded file's path untouched, for `cldm.images.load_rgb` to read.

    Gradio's own preprocessing squashes 16-bit pictures to white and answers corrupt files with its own error;
    our reader handles those (and CMYK, palette, animated, huge) with messages that say what to do. (A subclass
    would do the same, but Gradio writes a .pyi stub next to any module that subclasses a component.)
    """
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = lambda payload: None if payload is None else payload.path
    return component


class Studio:
    """What the handlers share: the model manager, the models folder and where results are written."""

    def __init__(self, manager: ModelManager, models_dir: str | None, out_dir: str | None = None, demo: bool = False):
        self.manager = manager
        self.models_dir = models_dir
        self.demo = demo  # the small shapes model: only its conditions work, at its size
        self.size = DEMO_SIZE if demo else 512
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="cldm-out-"))

    # ------------------------------------------------------------------------------------------------ hints
    def hint(self, cond: Condition, image, annotator: str, resolution: int, params: dict, size: tuple[int, int]):
        """The hint for one ControlNet, at the size of the pictures to generate (height, width)."""
        img = editor_image(image)
        if img is None:
            raise InputError("Upload an image (or draw on the canvas) first.")
        if annotator not in cond.annotators:
            raise InputError(f"{annotator!r} is not a preprocessor for {cond.label}.")
        return annotators.run(
            annotator, img, resolution=int(resolution), models_dir=self.models_dir, size=size, **params
        )

    # --------------------------------------------------------------------------------------------- generate
    def generate(self, units: list[tuple[Condition, object, str, int, dict, float, float, float]], s: dict, progress):
        """units: (condition, image, annotator, resolution, params, scale, start, end); s: shared settings."""
        seed = random.randint(0, MAX_SEED) if s["randomize"] else int(s["seed"])
        w, h = int(s["width"]), int(s["height"])
        specs, hints, init, mask, strength, clip_skip = [], [], None, None, 1.0, 1
        for cond, image, annotator, res, params, scale, start, end in units:
            if self.demo and cond.key not in DEMO_CONDITIONS:
                raise InputError(
                    f"The demo model only has ControlNets for {', '.join(DEMO_CONDITIONS)}. For {cond.label}, start "
                    f"the app with SD1.5 weights (python app.py --base <file or folder>) and put {cond.model_file} "
                    f"in the models folder (it is downloaded from {cond.diffusers_repo} when the hub can be reached)."
                )
            img = editor_image(image)
            if img is None:
                raise InputError(f"{cond.label}: upload an image (or draw on the canvas) first.")
            progress(0, desc=f"{cond.label}: preparing the hint")
            if cond.inpaint:
                init, mask, hint = inpaint_hint(image, w, h)
                strength = float(s["denoise"])
            else:
                hint = self.hint(cond, image, annotator, res, params, (h, w))
                if cond.img2img:
                    init, strength = img, float(s["denoise"])
            hints.append(
                hint if isinstance(hint, np.ndarray) else ((hint[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy())
            )
            clip_skip = max(clip_skip, cond.clip_skip)
            path = locate_controlnet(cond.stem, cond.diffusers_repo, self.models_dir)
            specs.append(ControlSpec(str(path), hint, scale, start, end, cond.global_average_pooling or None))
        prompt = ", ".join(p for p in (s["prompt"].strip(), s["added_prompt"].strip()) if p)
        negative, note = s["negative_prompt"], ""
        if self.demo:  # words outside the demo vocabulary would reach the model as letters it never saw
            (prompt, unknown), (negative, unknown_neg) = split_known(prompt), split_known(negative)
            if unknown or unknown_neg:
                note = f" | left out (not in the demo model's vocabulary): {', '.join(unknown + unknown_neg)}"
        t0 = time.perf_counter()
        result = self.manager.run(
            prompt,
            specs,
            negative_prompt=negative,
            steps=int(s["steps"]),
            cfg_scale=float(s["cfg"]),
            sampler=s["sampler"],
            seed=seed,
            width=w,
            height=h,
            batch=int(s["batch"]),
            guess_mode=bool(s["guess_mode"]),
            clip_skip=clip_skip,
            init_image=init,
            strength=strength,
            mask=mask,
            callback=lambda i, n: progress(i / n, desc=f"sampling {i}/{n}"),
        )
        files = []
        for img in result.images:
            path = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{seed}-{uuid.uuid4().hex[:6]}.png"
            save_png(img, path, result.parameters)
            files.append(str(path))
        t = result.timings
        names = ", ".join(s.path.rstrip("/").split("/")[-1] for s in specs)
        status = (
            f"Base: {self.manager.sd.source.rstrip('/').split('/')[-1]} | ControlNet: {names} | seed {seed} | "
            f"swap {t['swap']:.2f}s, sampling {t['sampling']:.2f}s, decode {t['decode']:.2f}s, "
            f"total {time.perf_counter() - t0:.1f}s on {self.manager.device}{note}"
        )
        return [(hh, "hint") for hh in hints] + [(f, f"seed {seed}") for f in files], status, files


def editor_image(value) -> np.ndarray | None:
    """Image or ImageEditor value -> HxWx3 uint8 (None when nothing was given). Drawn strokes are composited."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return load_rgb(value)
    if isinstance(value, dict):
        value = value.get("composite") if value.get("composite") is not None else value.get("background")
        if value is None:
            return None
    return array_to_rgb(np.asarray(value))


def inpaint_hint(value, width: int, height: int):
    """ImageEditor (background + painted layers) -> init picture, mask (255 = repaint) and the inpaint hint."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise InputError("Inpaint: upload a picture, then paint over the area to change.")
    init = resize_rgb(array_to_rgb(np.asarray(value["background"])), width, height)
    mask = np.zeros(init.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        alpha = (
            layer[..., 3]
            if layer.ndim == 3 and layer.shape[2] == 4
            else layer.max(axis=-1)
            if layer.ndim == 3
            else layer
        )
        mask |= resize_rgb(array_to_rgb(alpha), width, height)[..., 0] > 127
    if not mask.any():
        raise InputError("Inpaint: paint over the area to change (the mask is empty).")
    hint = init.astype(np.float32) / 255.0
    hint[mask] = -1.0  # the inpaint ControlNet reads -1 as "to be filled"
    return init, mask.astype(np.uint8) * 255, torch.from_numpy(hint).permute(2, 0, 1)[None]


def friendly(fn):
    """Handler wrapper: our errors become a message in the UI; anything else is logged, never shown raw."""

    @functools.wraps(fn)  # Gradio reads the signature (the progress parameter) through __wrapped__
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CldmError, annotators.AnnotatorError) as e:
            raise gr.Error(str(e)) from e
        except torch.cuda.OutOfMemoryError as e:
            raise gr.Error("Out of GPU memory: lower the resolution or the number of images.") from e
        except Exception as e:
            log.exception("unexpected error")
            raise gr.Error(f"Internal error ({type(e).__name__}); the server log has the details.") from e

    return wrapped


# ------------------------------------------------------------------------------------------------------ UI
def settings_panel(cond: Condition | None, size: int = 512, demo: bool = False) -> dict:
    """The generation settings every tab has (the demo model knows no quality words: no added/negative prompt)."""
    c: dict = {}
    key = cond.key if cond else "multi"
    c["prompt"] = gr.Textbox(label="Prompt", placeholder=cond.prompt_hint if cond else "", elem_id=f"{key}-prompt")
    with gr.Accordion("Settings", open=False, elem_id=f"{key}-settings"):
        c["added_prompt"] = gr.Textbox(label="Added prompt", value="" if demo else ADDED_PROMPT)
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", value="" if demo else NEGATIVE_PROMPT)
        with gr.Row():
            c["batch"] = gr.Slider(1, 4, value=1, step=1, label="Images")
            c["width"] = gr.Slider(64, 1024, value=size, step=64, label="Width", elem_id=f"{key}-width")
            c["height"] = gr.Slider(64, 1024, value=size, step=64, label="Height", elem_id=f"{key}-height")
        with gr.Row():
            # the demo model starts with the settings its report measures (demo_eval), SD1.5 with A1111-like ones
            steps = demo_eval.STEPS if demo else 20
            c["steps"] = gr.Slider(1, 100, value=steps, step=1, label="Steps", elem_id=f"{key}-steps")
            c["cfg"] = gr.Slider(0.1, 30.0, value=demo_eval.CFG if demo else 7.5, step=0.1, label="Guidance scale")
            c["sampler"] = gr.Dropdown(
                sorted(SAMPLERS), value=demo_eval.SAMPLER if demo else "dpmpp_2m_karras", label="Sampler"
            )
        with gr.Row():
            c["seed"] = gr.Number(value=12345, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            c["randomize"] = gr.Checkbox(value=True, label="Randomize seed")
            c["guess_mode"] = gr.Checkbox(value=False, label="Guess mode (no prompt needed)")
        c["denoise"] = gr.Slider(0.05, 1.0, value=0.75 if cond and cond.img2img else 1.0, step=0.05,
                                 label="Denoising strength", visible=bool(cond and (cond.img2img or cond.inpaint)))  # fmt: skip
    return c


def _blank_canvas() -> dict:
    white = np.full((512, 512, 3), 255, np.uint8)
    return {"background": white, "layers": [], "composite": white}


def unit_panel(cond: Condition, label: str = "", size: int = 512) -> dict:
    """Image, preprocessor and control sliders of one ControlNet."""
    c: dict = {}
    if cond.sketch or cond.inpaint:
        canvas = gr.ImageEditor(
            label=label or ("Draw, or upload a picture" if cond.sketch else "Picture: paint the area to change"),
            type="numpy", image_mode="RGBA", canvas_size=(512, 512), elem_id=f"{cond.key}-image",
            # Gradio's brush size is a radius in canvas pixels (a size-8 brush leaves 16 px strokes on the 512 canvas,
            # measured): 2 px strokes once scaled down to a 64 px demo picture (what the demo scribbles were trained
            # on), 12 px (1/43 of the picture) for SD1.5
            brush=gr.Brush(colors=["#000000" if cond.sketch else "#ffffff"],
                           default_size=max(6, 512 // size) if cond.sketch else 24),
            value=_blank_canvas() if cond.sketch else None,
        )  # fmt: skip
        c["image"] = canvas
    else:
        # a file path, so that our reader (16-bit, CMYK, palette, animated, corrupt files) handles every upload
        c["image"] = upload_image(
            label=label or "Input picture",
            sources=["upload", "clipboard", "webcam"],
            elem_id=f"{cond.key}-image",
        )
    c["annotator"] = gr.Dropdown(list(cond.annotators), value=cond.annotators[0], label="Preprocessor")
    # detection at the picture size by default (512 for SD1.5; the demo model's canny edges were found at 64 px)
    c["resolution"] = gr.Slider(64, 1024, value=size, step=64, label="Preprocessor resolution")
    c["params"] = {}
    for name in cond.annotators:
        for p in annotators.ANNOTATORS[name].params:
            key = (name, p.name)
            c["params"][key] = gr.Slider(p.minimum, p.maximum, value=p.default, step=p.step, label=p.label,
                                         visible=name == cond.annotators[0])  # fmt: skip
    with gr.Row():
        c["scale"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control strength")
        c["start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Control start")
        c["end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Control end")
    keys = list(c["params"])
    c["annotator"].change(
        lambda a: [gr.update(visible=k[0] == a) for k in keys], c["annotator"], [c["params"][k] for k in keys]
    )
    return c


SETTING_KEYS = ("prompt", "added_prompt", "negative_prompt", "batch", "width", "height", "steps", "cfg", "sampler",
                "seed", "randomize", "guess_mode", "denoise")  # fmt: skip
UNIT_KEYS = ("image", "annotator", "resolution", "scale", "start", "end")


def _unit_values(cond: Condition, unit: dict, values: list):
    """Split a flat list of values (UNIT_KEYS + params) back into one unit's arguments."""
    fixed = dict(zip(UNIT_KEYS, values[: len(UNIT_KEYS)]))
    params = dict(zip(unit["params"], values[len(UNIT_KEYS) :]))
    chosen = {k[1]: v for k, v in params.items() if k[0] == fixed["annotator"]}
    return (
        cond,
        fixed["image"],
        fixed["annotator"],
        fixed["resolution"],
        chosen,
        fixed["scale"],
        fixed["start"],
        fixed["end"],
    )


def _unit_inputs(unit: dict) -> list:
    return [unit[k] for k in UNIT_KEYS] + list(unit["params"].values())


def condition_tab(studio: Studio, cond: Condition) -> None:
    """One tab, for any row of the condition table."""
    with gr.Row():
        with gr.Column():
            unit = unit_panel(cond, size=studio.size)
            settings = settings_panel(cond, studio.size, studio.demo)
            with gr.Row():
                preview = gr.Button("Preview hint", elem_id=f"{cond.key}-preview")
                run = gr.Button("Generate", variant="primary", elem_id=f"{cond.key}-run")
        with gr.Column():
            hint_view = gr.Image(
                label="Hint", type="numpy", interactive=False, format="png", elem_id=f"{cond.key}-hint"
            )
            gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id=f"{cond.key}-gallery")
            status = gr.Markdown(elem_id=f"{cond.key}-status")
            files = gr.Files(label="Download PNGs (with parameters)")
    n_unit = len(_unit_inputs(unit))
    picture, annotator, prompt = DEMO_EXAMPLES.get(cond.key, cond.example) if studio.demo else cond.example
    gr.Examples([[str(EXAMPLES_DIR / picture), annotator, prompt]], [unit["image"], unit["annotator"], settings["prompt"]],
                label="Example")  # fmt: skip

    @friendly
    def do_preview(*values):
        u = _unit_values(cond, unit, list(values[:n_unit]))
        height, width = int(values[n_unit + 1]), int(values[n_unit])
        return studio.hint(cond, u[1], u[2], u[3], u[4], (height, width))

    @friendly
    def do_run(*values, progress=gr.Progress()):  # noqa: B008 (Gradio's way to ask for a progress bar)
        u = _unit_values(cond, unit, list(values[:n_unit]))
        s = dict(zip(SETTING_KEYS, values[n_unit:]))
        return studio.generate([u], s, progress)

    inputs = _unit_inputs(unit)
    preview.click(
        do_preview, inputs + [settings["width"], settings["height"]], hint_view, api_name=f"{cond.key}_preview"
    )
    run.click(
        do_run, inputs + [settings[k] for k in SETTING_KEYS], [gallery, status, files], api_name=f"{cond.key}_run"
    )


def multi_tab(studio: Studio) -> None:
    """Two or three ControlNets at once, each with its own image, preprocessor, strength and start/end."""
    units, conds = [], []
    defaults = DEMO_CONDITIONS if studio.demo else ("canny", "depth", "openpose")
    with gr.Row():
        with gr.Column():
            for i in range(MAX_UNITS):
                with gr.Group():
                    enabled = gr.Checkbox(value=i < 2, label=f"ControlNet {i + 1}")
                    cond = gr.Dropdown([c.key for c in CONDITIONS if not c.inpaint], value=defaults[i],
                                       label="Condition")  # fmt: skip
                    image = upload_image(label="Picture")
                    # choices follow the condition in the browser; API callers may name any of its preprocessors
                    annotator = gr.Dropdown(list(BY_KEY[cond.value].annotators), value=BY_KEY[cond.value].annotators[0],
                                            label="Preprocessor", allow_custom_value=True)  # fmt: skip
                    cond.change(lambda k: gr.update(choices=list(BY_KEY[k].annotators), value=BY_KEY[k].annotators[0]),
                                cond, annotator)  # fmt: skip
                    with gr.Row():
                        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength")
                        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Start")
                        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="End")
                units.append([enabled, cond, image, annotator, scale, start, end])
                conds.append(cond)
            settings = settings_panel(None, studio.size, studio.demo)
            run = gr.Button("Generate", variant="primary")
        with gr.Column():
            gallery = gr.Gallery(label="Hints and results", columns=2, format="png")
            status = gr.Markdown()
            files = gr.Files(label="Download PNGs (with parameters)")

    @friendly
    def do_run(*values, progress=gr.Progress()):  # noqa: B008 (Gradio's way to ask for a progress bar)
        per = 7
        chosen = []
        for i in range(MAX_UNITS):
            enabled, key, image, annotator, scale, start, end = values[i * per : (i + 1) * per]
            if enabled:
                if key not in BY_KEY or annotator not in annotators.ANNOTATORS:
                    raise InputError(f"ControlNet {i + 1}: unknown condition {key!r} or preprocessor {annotator!r}.")
                cond = BY_KEY[key]
                defaults = {p.name: p.default for p in annotators.ANNOTATORS[annotator].params}
                chosen.append((cond, image, annotator, studio.size, defaults, scale, start, end))
        if not chosen:
            raise InputError("Enable at least one ControlNet.")
        s = dict(zip(SETTING_KEYS, values[MAX_UNITS * per :]))
        return studio.generate(chosen, s, progress)

    inputs = [c for u in units for c in u] + [settings[k] for k in SETTING_KEYS]
    run.click(do_run, inputs, [gallery, status, files], api_name="multi_run")


def build_app(studio: Studio, banner: str = "") -> gr.Blocks:
    with gr.Blocks(title="ControlNet studio") as demo:
        gr.Markdown("# ControlNet studio\nStable Diffusion 1.5 + ControlNet 1.1. " + banner)
        with gr.Tabs():
            for cond in CONDITIONS:
                with gr.Tab(cond.label, id=cond.key):
                    condition_tab(studio, cond)
            with gr.Tab("Multi", id="multi"):
                multi_tab(studio)
    return demo


def choose_base(base: str, demo: bool) -> tuple[str, bool, str]:
    """(base, demo?, banner): the demo model when asked for, or when the SD1.5 weights cannot be had."""
    if not demo and weights.base_available(base):
        return base, False, f"Base model: `{base}`."
    if not (DEMO_DIR / DEMO_BASE).is_file():
        return base, False, f"Base model: `{base}` (not available here, and the demo model is missing too)."
    why = "as asked (--demo)" if demo else f"because `{base}` is not on this machine and the hub cannot be reached"
    banner = (
        f"**Demo model** ({why}): a small model trained by this project on pictures of coloured shapes, "
        f"{DEMO_SIZE} px. The {', '.join(DEMO_CONDITIONS)} tabs run on it (an early model: shapes follow the hint loosely), e.g. a sketched triangle with "
        '"a green triangle on a white background". The other tabs need SD1.5 weights: `python app.py --base FILE`.'
    )
    return str(DEMO_DIR / DEMO_BASE), True, banner


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="ControlNet studio web app")
    p.add_argument("--base", default=DEFAULT_BASE_REPO, help="hub id, .safetensors/.ckpt file or diffusers folder")
    p.add_argument("--models-dir", default="models", help="local ControlNet (and annotator) weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache-gb", type=float, default=4.0, help="CPU memory for cached ControlNets")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="make a public gradio.live link")
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--demo", action="store_true", help="use the small shapes model shipped in assets/demo")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base, demo_mode, banner = choose_base(a.base, a.demo)
    manager = ModelManager(base, device=a.device, dtype=a.dtype, cache_bytes=int(a.cache_gb * 1024**3))
    studio = Studio(manager, str(DEMO_DIR) if demo_mode else a.models_dir, demo=demo_mode)
    demo = build_app(studio, banner=f"{banner} Device: {manager.device}.")
    demo.queue(max_size=a.queue_size, default_concurrency_limit=1)
    demo.launch(server_name=a.host, server_port=a.port, share=a.share, max_file_size=MAX_FILE_SIZE,
                allowed_paths=[str(studio.out_dir)], show_error=True)  # fmt: skip


if __name__ == "__main__":
    main()
