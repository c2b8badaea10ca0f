"""The app's panels: each builder lays out one panel's widgets and returns them as a record (`forms.py`), so that
the handlers get the values back by name."""

from __future__ import annotations

from functools import partial

import gradio as gr
import numpy as np

import annotators
from cldm.adapters import few_step
from cldm.errors import InputError, MissingWeightsError
from cldm.hints.conditions import ADDED_PROMPT, NEGATIVE_PROMPT, Condition
from cldm.io.locate import IP_ADAPTERS, VAE_FROM_CHECKPOINT, list_loras, list_vaes, locate_lora
from cldm.sampling.samplers import SAMPLER_LABELS, SAMPLERS
from studio.control_models import OWN_MODEL
from studio.forms import GuidancePanel, ImagePromptPanel, PassPanel, ReferencePanel, SettingsPanel, UnitPanel
from studio.service import (
    CONTROL_MODES,
    INPAINT_MODES,
    MAX_SEED_INPUT,
    REFERENCE_PREPROCESSORS,
    RESIZE_MODES,
    UPSCALERS,
    Studio,
)  # fmt: skip
from studio.settings import MAX_UI_STEPS

MAX_UI_SIZE = 1024  # the width/height sliders' top (a hires pass may double it)

# The model lists the Refresh button fills again (found in the built page by these classes).
LORA_LIST, VAE_LIST, CONTROL_LIST = "cldm-lora-list", "cldm-vae-list", "cldm-control-list"


def upload_image(**kwargs) -> gr.Image:
    """A gr.Image whose handler gets the uploaded file's path untouched, for `cldm.io.images.load_rgb` to read.

    Gradio's own preprocessing squashes 16-bit pictures to white and answers corrupt files with its own error;
    our reader handles those (and CMYK, palette, animated, huge) with messages that say what to do. (A subclass
    would do the same, but Gradio writes a .pyi stub next to any module that subclasses a component.)
    """
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = lambda payload: None if payload is None else payload.path
    return component


def settings_panel(studio: Studio, cond: Condition | None, key: str = "") -> SettingsPanel:
    """The generation settings every tab has (a model with its own small vocabulary gets no quality words)."""
    d, c = studio.defaults, {}
    key = cond.key if cond else key or "multi"
    c["prompt"] = gr.Textbox(label="Prompt", placeholder=cond.prompt_hint if cond else "", elem_id=f"{key}-prompt")
    loras = list_loras(studio.models_dir)
    # the picker writes A1111's tag into the prompt (the models folder's loras/; the Refresh button reads it again)
    pick = gr.Dropdown(loras, value=None, label="Add a LoRA (<lora:name:weight> in the prompt)", visible=bool(loras),
                       elem_classes=[LORA_LIST])  # fmt: skip
    # a few-step LoRA (LCM, TCD, Hyper-SD, Lightning) sets the sampler, steps and guidance its card asks for
    note = gr.Markdown(visible=False, elem_id=f"{key}-lora-note")
    with gr.Accordion("Settings", open=False, elem_id=f"{key}-settings"):
        c["added_prompt"] = gr.Textbox(label="Added prompt", value=ADDED_PROMPT if d.quality_words else "")
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", value=NEGATIVE_PROMPT if d.quality_words else "")
        with gr.Row():
            c["batch"] = gr.Slider(1, 4, value=1, step=1, label="Images")
            c["width"] = gr.Slider(64, MAX_UI_SIZE, value=d.size, step=8, label="Width", elem_id=f"{key}-width")
            c["height"] = gr.Slider(64, MAX_UI_SIZE, value=d.size, step=8, label="Height", elem_id=f"{key}-height")
        with gr.Row():
            c["steps"] = gr.Slider(1, MAX_UI_STEPS, value=d.steps, step=1, label="Steps", elem_id=f"{key}-steps")
            c["cfg"] = gr.Slider(0.1, 30.0, value=d.cfg, step=0.1, label="Guidance scale")
            c["sampler"] = gr.Dropdown(
                [(SAMPLER_LABELS[k], k) for k in SAMPLERS], value=d.sampler, label="Sampler", allow_custom_value=True
            )
        with gr.Row():
            c["seed"] = gr.Number(value=12345, precision=0, minimum=0, maximum=MAX_SEED_INPUT, label="Seed")
            c["randomize"] = gr.Checkbox(value=True, label="Randomize seed")
        g = {}  # optional in the API (GuidancePanel): last in the tab's form
        with gr.Accordion("Guidance extras", open=False, elem_id=f"{key}-guidance"):
            with gr.Row():
                g["eta"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Eta (DDIM) / gamma (TCD)",
                                     info="Fresh noise kept at each step; TCD's cards use 0.3")  # fmt: skip
                g["cfg_rescale"] = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="CFG rescale (phi)",
                                             info="Pulls strong guidance back toward the prompt's own spread")  # fmt: skip
            with gr.Row():
                g["freeu"] = gr.Checkbox(False, label="FreeU (the base family's published factors)")
                g["pag_scale"] = gr.Slider(0.0, 10.0, value=0.0, step=0.1, label="PAG scale",
                                           info="Perturbed-attention guidance; 0: off (one more UNet pass per step)")  # fmt: skip
                g["pag_layers"] = gr.Textbox("mid", label="PAG layers", info="diffusers' names, comma separated")
    pick.input(partial(_add_lora, studio.models_dir), [pick, c["prompt"], c["steps"], c["cfg"], c["sampler"], g["eta"]],
               [c["prompt"], c["steps"], c["cfg"], c["sampler"], g["eta"], note], queue=False, api_name=False)  # fmt: skip
    # rendered beside the picture it applies to (the init picture, or a tile / inpaint tab's own), not in Settings
    own = "the picture" if cond and (cond.img2img or cond.inpaint) else "the init picture"
    c["denoise"] = gr.Slider(0.05, 1.0, value=1.0 if cond and cond.inpaint else 0.75, step=0.05, render=False,
                             label="Denoising strength", info=f"How far the result may move away from {own}",
                             elem_id=f"{key}-denoise")  # fmt: skip
    return SettingsPanel(c, GuidancePanel(g, optional=tuple(g)))


def _add_lora(models_dir: str | None, name: str | None, text: str, steps, cfg, sampler, eta):
    """The LoRA picker: A1111's tag into the prompt; a few-step LoRA's card's sampler, steps, guidance (and TCD's
    gamma) into the settings, and a line saying so (the user may change them back)."""
    if not name:
        return text, steps, cfg, sampler, eta, gr.update(visible=False)
    prompt = f"{text.rstrip()} <lora:{name}:1>".strip()
    try:
        proposal = few_step.proposal_for(locate_lora(name, models_dir))
    except (InputError, MissingWeightsError):  # a name that is no file here: Generate says so
        proposal = None
    if proposal is None:
        return prompt, steps, cfg, sampler, eta, gr.update(visible=False)
    line = f"{proposal.text(name)}: set in Settings (change them if you like)"
    p = proposal
    return prompt, p.steps, p.cfg_scale, p.sampler, p.eta, gr.update(value=line, visible=True)


def results_panel(key: str, label: str = "Results", run_label: str = "Generate", columns: int = 2,
                  interactive: bool = True):  # fmt: skip
    """The top of a tab's right column, where A1111 has them: Generate and Stop, the status line (the progress while
    a job runs), then the gallery (the live previews, then the results). (run, stop, status, gallery); Generate is
    off (`interactive` False) on a tab that cannot run here."""
    with gr.Row():
        run = gr.Button(run_label, variant="primary", scale=3, interactive=interactive, elem_id=f"{key}-run")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id=f"{key}-stop")
    status = gr.Markdown(elem_id=f"{key}-status", min_height=48)
    gallery = gr.Gallery(label=label, columns=columns, format="png", elem_id=f"{key}-gallery")
    return run, stop, status, gallery


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
    start = studio.tabs[first.key].preprocessor  # one that runs here (availability.py)
    with gr.Row():
        preprocessor = gr.Dropdown(list(first.preprocessors), value=start, label="Preprocessor",
                                   allow_custom_value=True)  # fmt: skip
        # the A1111 extension's Model list: the condition's own ControlNet, or any control model file of the models
        # folder (the Refresh button reads it again; the handler checks the name)
        model = gr.Dropdown([OWN_MODEL, *studio.control_models()], value=OWN_MODEL, label="Model",
                            allow_custom_value=True, elem_classes=[CONTROL_LIST])  # fmt: skip
    # detection at the picture size by default (512 for SD1.5; the demo model's canny edges were found at 64 px)
    # pixel perfect (on by default) sets the resolution from the picture: the slider is greyed out while it is on
    resolution = gr.Slider(64, 1024, value=studio.size, step=64, label="Preprocessor resolution", interactive=False,
                           info="Set from the picture while pixel perfect is on")  # fmt: skip
    names = list(dict.fromkeys(a for c in conds for a in c.preprocessors))  # every preprocessor the panel may show
    params = {
        (name, p.name): gr.Slider(p.minimum, p.maximum, value=p.default, step=p.step, label=p.label,
                                  visible=name == start)
        for name in names for p in annotators.ANNOTATORS[name].params
    }  # fmt: skip
    with gr.Row():
        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control strength")
        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Control start")
        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Control end")
    mode = gr.Radio(list(CONTROL_MODES), value="Balanced", label="Control mode")
    with gr.Row():
        resize = gr.Radio(list(RESIZE_MODES), value="Crop and Resize", label="Resize mode")
        perfect = gr.Checkbox(value=True, label="Pixel perfect (preprocessor resolution from the picture and size)")
    with gr.Accordion("Effective region (optional)", open=False):
        region = upload_image(label="Region: white where this unit acts, black where it does not",
                              sources=["upload", "clipboard"])  # fmt: skip
    perfect.change(lambda on: gr.update(interactive=not on), perfect, resolution, queue=False, api_name=False)
    keys = list(params)
    preprocessor.change(lambda a: [gr.update(visible=k[0] == a) for k in keys], preprocessor, [params[k] for k in keys],
                     api_name=False)  # fmt: skip
    return UnitPanel(image, preprocessor, resolution, scale, start, end, params, cond=first if len(conds) == 1 else None,
                     mode=mode, resize=resize, pixel_perfect=perfect, model=model, region=region)  # fmt: skip


def pass_panel(cond: Condition | None, key: str, settings: SettingsPanel, models_dir: str | None = None) -> PassPanel:
    """img2img (an optional init picture, with the settings' denoising strength beside it, on tabs whose picture is
    not already one), the inpaint options, the hires fix, one seed per picture and the live preview."""
    c = {}
    own_init = bool(cond and (cond.img2img or cond.inpaint))
    with gr.Accordion("img2img, hires fix, clip skip, preview", open=False, elem_id=f"{key}-pass"):
        c["init_image"] = upload_image(label="Init picture (img2img: the result starts from it; optional)",
                                       sources=["upload", "clipboard"], visible=not own_init, elem_id=f"{key}-init")  # fmt: skip
        if not own_init:  # a tile or inpaint tab's own picture is the init picture: the slider is under that
            settings.widgets["denoise"].render()
        inpaint = bool(cond and cond.inpaint)
        with gr.Row(visible=inpaint):
            c["mask_blur"] = gr.Slider(0, 64, value=5 if inpaint else 0, step=0.5, label="Mask blur (px)")
            c["inpaint_mode"] = gr.Radio(list(INPAINT_MODES), value=next(iter(INPAINT_MODES)), label="Inpaint")
        with gr.Row():
            c["hires"] = gr.Checkbox(value=False, label="Hires fix", elem_id=f"{key}-hires")
            c["hires_scale"] = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by")
            c["hires_upscaler"] = gr.Dropdown(list(UPSCALERS), value="Latent", label="Upscaler")
        with gr.Row():
            c["hires_steps"] = gr.Slider(0, MAX_UI_STEPS, value=0, step=1, label="Hires steps (0: as the first pass)")
            c["hires_strength"] = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Hires denoising strength")
        with gr.Row():
            c["seed_per_picture"] = gr.Checkbox(value=True, label="One seed per picture (seed + i, as A1111)")
            c["preview_every"] = gr.Slider(0, 50, value=5, step=1, label="Live preview every N steps (0: off)")
            c["clip_skip"] = gr.Slider(0, 12, value=0, step=1, label="Clip skip (0: the condition's own; 2: anime)")
        c["vae"] = gr.Dropdown([VAE_FROM_CHECKPOINT, *list_vaes(models_dir)], value=VAE_FROM_CHECKPOINT, label="VAE",
                               allow_custom_value=True, elem_classes=[VAE_LIST])  # fmt: skip
    return PassPanel(c)


def image_prompt_panel(studio: Studio, key: str, open_: bool = False) -> ImagePromptPanel:
    """The Image prompt accordion (IP-Adapter): a picture whose look the result takes on, beside the text prompt."""
    with gr.Accordion("Image prompt (IP-Adapter)", open=open_, elem_id=f"{key}-ip"):
        image = upload_image(label="Image prompt", sources=["upload", "clipboard"], elem_id=f"{key}-ip-image")
        with gr.Row():
            adapter = gr.Dropdown(list(IP_ADAPTERS), value=IP_ADAPTERS[0], label="IP-Adapter", allow_custom_value=True)
            scale = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Image prompt strength", elem_id=f"{key}-ip-scale")
    return ImagePromptPanel(image, adapter, scale)


def image_prompt_slots(studio: Studio, key: str, slots: int) -> list[ImagePromptPanel]:
    """Several image prompts (IP-Adapters), each with its picture, adapter, strength and region mask; the first
    slot's names and element ids are those of `image_prompt_panel`, the others' end with _2, _3 (-2, -3)."""
    panels = []
    for i in range(slots):
        tag, el = ("", "") if i == 0 else (f"_{i + 1}", f"-{i + 1}")
        with gr.Accordion(f"Image prompt {i + 1} (IP-Adapter)", open=i == 0, elem_id=f"{key}-ip{el}"):
            with gr.Row():
                image = upload_image(
                    label="Image prompt", sources=["upload", "clipboard"], elem_id=f"{key}-ip-image{el}"
                )
                mask = upload_image(label="Region (optional): white where it acts", sources=["upload", "clipboard"],
                                    elem_id=f"{key}-ip-mask{el}")  # fmt: skip
            with gr.Row():
                adapter = gr.Dropdown(list(IP_ADAPTERS), value=IP_ADAPTERS[0], label="IP-Adapter",
                                      allow_custom_value=True)  # fmt: skip
                scale = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Image prompt strength",
                                  elem_id=f"{key}-ip-scale{el}")  # fmt: skip
        panels.append(ImagePromptPanel(image, adapter, scale, mask, tag))
    return panels


def reference_panel(key: str) -> ReferencePanel:
    """Reference-only (no weights): the A1111 extension's reference preprocessors."""
    image = upload_image(label="Reference picture", sources=["upload", "clipboard"], elem_id=f"{key}-reference-image")
    with gr.Row():
        pre = gr.Dropdown(list(REFERENCE_PREPROCESSORS), value="reference_only", label="Preprocessor",
                          allow_custom_value=True)  # fmt: skip
        fidelity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Style fidelity")
        weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control weight")
    return ReferencePanel(image, pre, fidelity, weight)
