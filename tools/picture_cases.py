"""The cases `tools/pictures.py` records: the inputs it draws, the `python -m cldm generate` cases, the jobs file's
rows and the app's requests (data; the recording and comparing are pictures.py's)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]  # the checkout recorded (pictures.py's --root sets it)
EXAMPLES = "assets/examples"
BASE = "assets/demo/shapes_sd.safetensors"  # relative to ROOT: the batch fingerprint hashes the base as given
DEMO = "assets/demo"
SIZE = 64  # the demo model's native size (assets/demo/model_card.json)
SHAPES_PROMPT = "a blue circle and a yellow star on a pink background"

# ---------------------------------------------------------------------------------------------------------------
# inputs: copied from assets/examples or drawn here (never made by the project's code)


def make_inputs(folder: Path, root: Path = ROOT) -> dict[str, str]:
    folder.mkdir(parents=True)
    out = {}
    for name in ("shapes", "shapes_seg", "triangle_sketch", "house"):
        shutil.copyfile(root / EXAMPLES / f"{name}.png", folder / f"{name}.png")
        out[name] = str(folder / f"{name}.png")
    edges = Image.new("RGB", (SIZE, SIZE))  # a canny-style hint: white outlines on black
    d = ImageDraw.Draw(edges)
    d.rectangle((8, 10, 30, 34), outline=(255, 255, 255))
    d.ellipse((34, 30, 58, 56), outline=(255, 255, 255))
    edges.save(folder / "edges.png")
    mask = Image.new("L", (256, 256))  # white = repaint, on shapes.png's 256 px
    ImageDraw.Draw(mask).rectangle((40, 60, 170, 200), fill=255)
    mask.save(folder / "mask.png")
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))  # the app's inpaint brush layer
    ImageDraw.Draw(layer).rectangle((40, 60, 170, 200), fill=(255, 255, 255, 255))
    layer.save(folder / "layer.png")
    out.update(edges=str(folder / "edges.png"), mask=str(folder / "mask.png"), layer=str(folder / "layer.png"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the cases: `python -m cldm generate` (after --base/--device, each case's own flags; --dtype fp32, 64 px, 6 steps,
# cfg 5 unless the case gives them)

CN = {k: f"{DEMO}/control_v11p_sd15_{k}.safetensors" for k in ("canny", "scribble", "seg")}
IP = ["--ip-adapter", f"{DEMO}/ip-adapter_sd15.safetensors", "--image-encoder", f"{DEMO}/image_encoder"]
LORA = f"{DEMO}/loras/red.safetensors"


def cli_cases(i: dict[str, str]) -> list[dict]:
    canny = ["--controlnet", CN["canny"], "--hint", i["edges"]]
    seg = ["--controlnet", CN["seg"], "--hint", i["shapes_seg"]]
    scribble = ["--controlnet", CN["scribble"], "--hint", i["triangle_sketch"]]
    # fmt: off
    return [
        dict(case="euler_a_canny", args=[*canny, "--sampler", "euler_a", "--seed", "1", "--prompt", SHAPES_PROMPT]),
        dict(case="dpmpp_2m_karras_seg_prompt_just", args=[*seg, "--sampler", "dpmpp_2m_karras", "--seed", "2",
             "--control-mode", "prompt", "--resize-mode", "just", "--prompt", SHAPES_PROMPT]),
        dict(case="ddim_scribble_control_fill", args=[*scribble, "--sampler", "ddim", "--seed", "3", "--control-mode",
             "control", "--resize-mode", "fill", "--prompt", "a green triangle on a white background"]),
        dict(case="dpmpp_sde_karras_two_controlnets", args=[*canny, *seg, "--control-scale", "0.8", "--control-scale",
             "0.5", "--control-start", "0", "--control-start", "0.2", "--control-end", "1", "--control-end", "0.8",
             "--sampler", "dpmpp_sde_karras", "--seed", "4", "--prompt", SHAPES_PROMPT, "--negative-prompt",
             "black"]),
        dict(case="unipc_img2img", args=[*canny, "--init-image", i["shapes"], "--strength", "0.6", "--sampler", "unipc",
             "--seed", "5", "--prompt", "a red circle and a yellow star on a pink background"]),
        dict(case="lms_inpaint_only", args=["--init-image", i["shapes"], "--mask", i["mask"], "--inpaint-mode", "only",
             "--mask-blur", "2", "--sampler", "lms", "--seed", "6", "--prompt", "a green square"]),
        dict(case="euler_inpaint_global", args=[*seg, "--init-image", i["shapes"], "--mask", i["mask"],
             "--inpaint-mode", "global", "--strength", "0.9", "--sampler", "euler", "--seed", "7", "--prompt",
             "a purple ring"]),
        dict(case="hires_latent", args=[*canny, "--hires-scale", "2", "--hires-steps", "3", "--hires-strength", "0.5",
             "--hires-upscaler", "latent", "--sampler", "euler_a", "--seed", "8", "--prompt", SHAPES_PROMPT]),
        dict(case="hires_lanczos", args=["--hires-scale", "1.5", "--hires-steps", "2", "--hires-upscaler", "lanczos",
             "--sampler", "ddim", "--seed", "9", "--prompt", "an orange diamond on a gray background"]),
        dict(case="lora_red", args=[*canny, "--lora", f"{LORA}:0.8", "--sampler", "dpmpp_2m", "--seed", "10",
             "--prompt", "a circle and a star on a white background"]),
        dict(case="ip_adapter", args=[*IP, "--ip-image", i["shapes"], "--ip-scale", "0.7", "--sampler", "euler_a",
             "--seed", "11", "--prompt", "a star"]),
        dict(case="reference_only", args=["--reference", i["shapes"], "--reference-mode", "only", "--style-fidelity",
             "0.5", "--sampler", "ddim", "--seed", "12", "--prompt", "a circle"]),
        dict(case="reference_adain_attn_with_controlnet", args=[*scribble, "--reference", i["house"],
             "--reference-mode", "adain+attn", "--sampler", "euler", "--seed", "13", "--prompt", "a triangle"]),
        dict(case="batch2_seed_per_picture", args=[*canny, "--batch", "2", "--seed-per-picture", "--sampler",
             "euler_a", "--seed", "14", "--prompt", SHAPES_PROMPT]),
        dict(case="batch2_one_generator", args=[*seg, "--batch", "2", "--sampler", "euler_a", "--seed", "15",
             "--prompt", SHAPES_PROMPT]),
        dict(case="clip_skip2_guess_mode", args=[*canny, "--clip-skip", "2", "--guess-mode", "--sampler",
             "dpmpp_2m_karras", "--seed", "16", "--prompt", "a yellow square"]),
        dict(case="bf16", args=[*canny, "--dtype", "bf16", "--sampler", "euler_a", "--seed", "17", "--prompt",
             SHAPES_PROMPT]),
    ]
    # fmt: on


# ---------------------------------------------------------------------------------------------------------------
# `python -m cldm batch` (and --ray): the jobs file's rows; pictures are relative to the jobs file (the inputs)

BATCH_DEFAULTS = ["--steps", "5", "--cfg", "5", "--prompt", "a {colour} circle on a white background"]
# fmt: off
JOB_ROWS = [
    dict(id="canny_image", image="shapes.png", preprocessor="canny", controlnet="canny", prompt=SHAPES_PROMPT,
         seed="21", sampler="euler_a"),
    dict(id="seg_hint_prompt_fill", hint="shapes_seg.png", controlnet="seg", prompt=SHAPES_PROMPT, seed="22",
         sampler="dpmpp_2m_karras", control_mode="prompt", resize_mode="fill"),
    dict(id="scribble_two_pictures", image="triangle_sketch.png", preprocessor="scribble_sketch", controlnet="scribble",
         prompt="a green triangle on a white background", seed="23", sampler="ddim", pictures="2", clip_skip="2"),
    dict(id="canny_img2img", hint="edges.png", controlnet="canny", prompt="a red square", seed="24", sampler="unipc",
         init_image="shapes.png", strength="0.6"),
    dict(id="seg_template", hint="shapes_seg.png", controlnet="seg", seed="25", sampler="lms", cfg="4", scale="0.6",
         start="0.1", end="0.8", colour="purple"),
    dict(id="canny_control_just", image="house.png", preprocessor="canny", controlnet="canny", prompt="a white square",
         negative_prompt="black", seed="26", sampler="dpmpp_sde_karras", control_mode="control", resize_mode="just",
         steps="4"),
]
# fmt: on


def write_jobs(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------------------------
# the app: ONE table of requests (case, api_name, positional args, server). The blocks above the table are the
# argument groups in the order the endpoints take them (see `Client.view_api()`); a refactor that renames an endpoint
# or moves an argument is adapted here. server "demo": `app.py --demo`; "inpaint": the demo model from a copy of its
# folder whose card also lists inpaint, with the canny ControlNet's weights under the inpaint ControlNet's name (the
# demo ships no inpaint ControlNet, so `--demo` refuses the Inpaint tab): the pictures exercise the inpaint code path
# (masked hint, mask, inpaint_only blending), not a trained inpaint model.


def app_cases(i: dict[str, str]) -> list[dict]:
    from gradio_client import handle_file

    def f(name: str):
        return handle_file(i[name])

    def canvas(name: str, layer: str | None = None) -> dict:
        return {"background": f(name), "layers": [f(layer)] if layer else [], "composite": f(name)}

    def settings(prompt, seed, batch=1, steps=6, sampler="ddim", cfg=5.0, denoise=0.75) -> list:
        # prompt, added prompt, negative prompt, images, width, height, steps, cfg, sampler, seed, randomize seed,
        # denoising strength (the hidden guess-mode input the page had until issue 25 came after "randomize seed")
        return [prompt, "", "", batch, SIZE, SIZE, steps, cfg, sampler, seed, False, denoise]

    def unit_options(mode="Balanced", resize="Crop and Resize", perfect=False) -> list:
        return [mode, resize, perfect]

    def passes(init=None, blur=0, inpaint="Only the painted area (inpaint_only)", hires=False, hires_scale=2.0,
               hires_steps=0, hires_strength=0.7, upscaler="Latent", seed_per_picture=True,
               clip_skip=0) -> list:  # fmt: skip
        # init picture, mask blur, inpaint mode, hires fix, upscale by, hires steps, hires strength, upscaler,
        # one seed per picture, live preview every N steps (0: off), clip skip, VAE
        return [init, blur, inpaint, hires, hires_scale, hires_steps, hires_strength, upscaler, seed_per_picture, 0,
                clip_skip, "From the checkpoint"]  # fmt: skip

    no_ip = [None, "ip-adapter_sd15", 0.6]  # image prompt, IP-Adapter, strength (the accordion on each tab)
    base = ["shapes_sd.safetensors"]

    def unit(image, preprocessor, scale=1.0, start=0.0, end=1.0) -> list:
        return [image, preprocessor, SIZE, scale, start, end]  # picture, preprocessor, resolution, strength, start, end

    # a Multi unit: on, condition, picture, preprocessor, resolution, strength, start, end, then every preprocessor's
    # sliders: canny low/high, MLSD value/distance, remove near %, remove background %, shuffle seed
    sliders = [100, 200, 0.1, 0.1, 0, 0, 0]
    off = [False, "seg", None, "seg_ade20k", SIZE, 1.0, 0.0, 1.0, *sliders]
    # fmt: off
    return [
        dict(case="canny", api_name="/canny_generate",
             args=[*unit(f("shapes"), "canny"), 100, 200, *settings(SHAPES_PROMPT, 31, sampler="euler_a"),
                   *unit_options(), *passes(), *no_ip, *base]),
        dict(case="scribble_control_just", api_name="/scribble_generate",
             args=[*unit(canvas("triangle_sketch"), "scribble_sketch"),
                   *settings("a green triangle on a white background", 32, sampler="dpmpp_2m_karras"),
                   *unit_options("ControlNet is more important", "Just Resize"), *passes(), *no_ip, *base]),
        dict(case="seg_prompt_fill_clip_skip2", api_name="/seg_generate",
             args=[*unit(f("shapes_seg"), "none", 0.8), *settings(SHAPES_PROMPT, 33, sampler="unipc"),
                   *unit_options("My prompt is more important", "Resize and Fill", True), *passes(clip_skip=2),
                   *no_ip, *base]),
        dict(case="multi_canny_scribble", api_name="/multi_generate",
             args=[True, "canny", f("shapes"), "canny", SIZE, 0.9, 0.0, 1.0, *sliders,
                   True, "scribble", f("triangle_sketch"), "scribble_sketch", SIZE, 0.5, 0.2, 0.8, *sliders, *off,
                   *settings(SHAPES_PROMPT, 34, sampler="dpmpp_sde_karras"),
                   *unit_options(), *unit_options("My prompt is more important"), *unit_options(),
                   *passes(), *no_ip, *base]),
        dict(case="inpaint", api_name="/inpaint_generate",
             args=[canvas("shapes", "layer"), "none", SIZE, 1.0, 0.0, 1.0,
                   *settings("a green square", 35, sampler="euler", denoise=1.0),
                   *unit_options(), *passes(blur=2), *no_ip, *base], server="inpaint"),
        dict(case="inpaint_global", api_name="/inpaint_generate",
             args=[canvas("shapes", "layer"), "none", SIZE, 1.0, 0.0, 1.0,
                   *settings("a purple ring", 36, sampler="lms", denoise=0.9),
                   *unit_options(), *passes(inpaint="Whole picture (inpaint_global_harmonious)"), *no_ip, *base],
             server="inpaint"),
        dict(case="image_prompt_ip_and_reference", api_name="/image_prompt_generate",
             args=[f("house"), "ip-adapter_sd15", 0.8, f("shapes"), "reference_adain+attn", 0.5, 1.0,
                   *settings("a star", 37, sampler="euler_a"), *passes(), *base]),
        dict(case="image_prompt_reference_only", api_name="/image_prompt_generate",
             args=[None, "ip-adapter_sd15", 0.6, f("shapes"), "reference_only", 0.7, 1.0,
                   *settings("a circle", 38), *passes(), *base]),
        dict(case="canny_ip_img2img", api_name="/canny_generate",
             args=[*unit(f("house"), "canny"), 100, 200, *settings("a white square", 39, sampler="ddim", denoise=0.6),
                   *unit_options(), *passes(init=f("shapes")), f("house"), "ip-adapter_sd15", 0.5, *base]),
        dict(case="seg_hires", api_name="/seg_generate",
             args=[*unit(f("shapes_seg"), "none"), *settings(SHAPES_PROMPT, 40, sampler="euler_a"), *unit_options(),
                   *passes(hires=True, hires_scale=2.0, hires_steps=3, hires_strength=0.5), *no_ip, *base]),
        dict(case="scribble_batch2", api_name="/scribble_generate",
             args=[*unit(canvas("triangle_sketch"), "scribble_sketch"),
                   *settings("a green triangle on a white background", 41, batch=2, sampler="euler_a"),
                   *unit_options(), *passes(seed_per_picture=False), *no_ip, *base]),
    ]
    # fmt: on
