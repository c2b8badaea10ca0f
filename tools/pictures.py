"""Record every picture the project makes through its outward interfaces, and compare two such records.

    python tools/pictures.py record OUT.json [--only cli,batch,ray,app] [--work DIR] [--parallel 2] [--root DIR]
    python tools/pictures.py compare A.json B.json

Meant to show that a refactor (modules moved into packages, ...) changes no picture, byte for byte: record once on
the commit before it, once after (each in its own checkout, with that checkout's .venv: the Python that runs this
script runs the project; --root names the checkout, default the one holding this script), and compare. `record`
drives only what a user drives, so it survives the move of any module:

- cli: `python -m cldm generate` on the demo model (assets/demo), one process per case (`cli_cases`), --parallel
  at a time: six samplers and more, one and two ControlNets, control and resize modes, img2img, inpaint (both
  modes), hires fix (latent, lanczos), a LoRA, IP-Adapter, reference-only, batches of 2 (with and without
  --seed-per-picture), clip skip 2 with guess mode, bf16; fp32 on the CPU otherwise, 64 px, 6 steps.
- batch: `python -m cldm batch` on a jobs CSV of six varied rows (`JOB_ROWS`), fp32.
- ray: the same jobs file with `--ray --workers 2` (an error "ray is not installed" when it is not). Its pictures
  should equal the batch's, byte for byte (same names after the part).
- app: `python app.py --demo` on a free port, driven with gradio_client (`app_cases`: ONE table of case, endpoint
  and positional arguments; adapt it there when the endpoints' names or arguments change). The two Inpaint-tab
  requests run on a second server whose model folder is the demo's plus a stand-in inpaint ControlNet (see there).

Each picture gets a name (`<part>/<case>/<index>`; `app/<case>/gallery<i>` for the app's gallery items, hints
included) and a record: the sha256 of its decoded RGB pixels, the sha256 of its PNG "parameters" text (null if none)
and of its other PNG text chunks (the batch's `cldm-job` fingerprint), and its size. The parameters text itself is
kept too, so that `compare` can show what changed in it. A case that fails is recorded as an error (and `record`
exits 1).

Determinism: fixed seeds everywhere (the app's "Randomize seed" off), live previews off, the same inputs (copied
from assets/examples or drawn here, never made by the project), and OMP/MKL threads fixed to 2 in every child (the
CPU's bf16 sums depend on the thread count; OMP_WAIT_POLICY=PASSIVE, which changes no sum, keeps a busy machine
from slowing the sampling 50-fold). The work folder has a fixed path (default /tmp/cldm-pictures, emptied
first) because the batch's `cldm-job` fingerprint hashes the absolute paths of a row's pictures: use the same
--work for both records, and do not run two records with the same --work at once. The other paths are given
relative to the checkout, so the checkout's own path does not matter.

`compare` prints each picture that differs (pixels, parameters text, other text, size), is missing on one side, or
whose case failed on one side, and exits 1 if there is any; 0 if the records agree. Only the parts both records
have are compared (with a note when they differ).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from load_test import free_port  # tools/ is this script's folder
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]  # the checkout recorded (--root)
PARTS = ("cli", "batch", "ray", "app")
DEFAULT_WORK = Path("/tmp/cldm-pictures")
MARKER = ".pictures-work"  # the work folder is only emptied when it has this file
EXAMPLES = "assets/examples"
BASE = "assets/demo/shapes_sd.safetensors"  # relative to ROOT: the batch fingerprint hashes the base as given
DEMO = "assets/demo"
SIZE = 64  # the demo model's native size (assets/demo/model_card.json)
THREADS = "2"
SHAPES_PROMPT = "a blue circle and a yellow star on a pink background"

# ---------------------------------------------------------------------------------------------------------------
# inputs: copied from assets/examples or drawn here (never made by the project's code)


def make_inputs(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    out = {}
    for name in ("shapes", "shapes_seg", "triangle_sketch", "house"):
        shutil.copyfile(ROOT / EXAMPLES / f"{name}.png", folder / f"{name}.png")
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


# ---------------------------------------------------------------------------------------------------------------
# recording


def picture_record(path: str | Path) -> dict:
    with Image.open(path) as im:
        im.load()
        text = dict(getattr(im, "text", {}) or {})
        rgb = im.convert("RGB")
    params = text.pop("parameters", None)
    return {
        "pixels": hashlib.sha256(rgb.tobytes()).hexdigest(),
        "parameters": hashlib.sha256(params.encode()).hexdigest() if params is not None else None,
        "other_text": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(text.items())},
        "size": list(rgb.size),
        "parameters_text": params,
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    # passive: threads that wait sleep instead of spinning (the same sums; 50x faster sampling on a busy machine)
    env.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, OMP_WAIT_POLICY="PASSIVE")
    return env


def run_cmd(cmd: list[str], log: Path, timeout: float) -> None:
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit {r.returncode}: {' | '.join(tail)}")


def _index(stem: str) -> int:
    m = re.search(r"-(\d+)$", stem)
    return int(m.group(1)) if m else 0


def record_cli(work: Path, inputs: dict[str, str], rec: dict, parallel: int = 2) -> None:
    """One `python -m cldm generate` process per case, `parallel` at a time (each with its fixed thread count, so
    the pictures do not depend on it)."""

    def one(c: dict) -> None:
        folder = work / "cli" / c["case"]
        folder.mkdir(parents=True)
        cmd = [sys.executable, "-m", "cldm", "generate", "--base", BASE, "--device", "cpu"]
        defaults = {"--dtype": "fp32", "--width": str(SIZE), "--height": str(SIZE), "--steps": "6", "--cfg": "5"}
        for flag, value in defaults.items():
            if flag not in c["args"]:
                cmd += [flag, value]
        cmd += [*c["args"], "--out", str(folder / "out.png")]
        t = time.perf_counter()
        try:
            run_cmd(cmd, folder / "log.txt", timeout=400)
            files = sorted(folder.glob("*.png"), key=lambda p: _index(p.stem))
            if not files:
                raise RuntimeError("no picture written")
            for n, p in enumerate(files):
                rec["pictures"][f"cli/{c['case']}/{n}"] = picture_record(p)
        except Exception as e:  # noqa: BLE001 (recorded; the other cases go on)
            rec["errors"][f"cli/{c['case']}"] = str(e)[:500]
        say(f"cli/{c['case']}: {time.perf_counter() - t:.1f}s")

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(one, cli_cases(inputs)))


def record_batch(part: str, work: Path, inputs: dict[str, str], rec: dict) -> None:
    folder = work / part
    folder.mkdir(parents=True)
    # one jobs file for batch and ray, beside the inputs: the same rows, so the same fingerprints and pictures
    jobs = Path(inputs["shapes"]).parent / "jobs.csv"
    if not jobs.exists():
        write_jobs(jobs, JOB_ROWS)
    cmd = [sys.executable, "-m", "cldm", "batch", "--base", BASE, "--jobs", str(jobs), "--out", str(folder / "out"),
           "--device", "cpu", "--dtype", "fp32", *BATCH_DEFAULTS]  # fmt: skip
    if part == "ray":
        cmd += ["--ray", "--workers", "2"]
    try:
        run_cmd(cmd, folder / "log.txt", timeout=400)
    except Exception as e:  # noqa: BLE001 (the rows that were done are still recorded)
        rec["errors"][part] = str(e)[:500]
    manifest = folder / "out" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()] if manifest.exists() else []
    for r in rows:
        if r.get("status") != "done":
            rec["errors"][f"{part}/{r.get('id')}"] = f"{r.get('status')}: {str(r.get('error'))[:300]}"
            continue
        for n, name in enumerate(r["files"]):
            rec["pictures"][f"{part}/{r['id']}/{n}"] = picture_record(folder / "out" / name)
    missing = {row["id"] for row in JOB_ROWS} - {r.get("id") for r in rows}
    for m in sorted(missing):
        rec["errors"][f"{part}/{m}"] = "not in the manifest"


def inpaint_demo(folder: Path) -> Path:
    """A copy of the demo model's folder (links) whose card lists inpaint too, with the canny ControlNet's weights
    as the inpaint ControlNet; returns its base file."""
    folder.mkdir(parents=True)
    demo = ROOT / DEMO
    for p in demo.iterdir():
        if p.name != "model_card.json":
            (folder / p.name).symlink_to(p.resolve())
    card = json.loads((demo / "model_card.json").read_text())
    card["conditions"] = [*card["conditions"], "inpaint"]
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    (folder / "control_v11p_sd15_inpaint.safetensors").symlink_to((ROOT / CN["canny"]).resolve())
    return folder / card["base"]


@contextlib.contextmanager
def serve_app(folder: Path, server: str, timeout: float = 180):
    """`python app.py --demo` (or the inpaint variant) on 127.0.0.1 in a child process; yields its url; killed (by
    its process id) on exit."""
    import httpx

    folder.mkdir(parents=True)
    model = ["--demo"] if server == "demo" else ["--base", str(inpaint_demo(folder / "model"))]
    port = free_port()
    env = dict(child_env(), GRADIO_TEMP_DIR=str(folder / "gradio-tmp"), GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "app.py", *model, "--port", str(port), "--out-dir", str(folder / "out")]
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited ({proc.returncode}); see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    break
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the app did not start in {timeout} s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def _paths(result) -> tuple[list[str], list[str]]:
    """(gallery images, files) from an endpoint's answer: the gallery is a list of {"image": ...}, the files the
    last list of paths."""
    gallery, files = [], []
    for item in result if isinstance(result, (list, tuple)) else [result]:
        if isinstance(item, list) and item and all(isinstance(x, dict) and "image" in x for x in item):
            gallery = [x["image"] if isinstance(x["image"], str) else x["image"]["path"] for x in item]
        elif isinstance(item, list) and item and all(isinstance(x, str) for x in item):
            files = item
    return gallery, files


def record_app(work: Path, inputs: dict[str, str], rec: dict) -> None:
    from gradio_client import Client

    cases = app_cases(inputs)
    for server in dict.fromkeys(c.get("server", "demo") for c in cases):
        try:
            with serve_app(work / "app" / server, server) as url:
                client = Client(url, verbose=False)
                for c in (c for c in cases if c.get("server", "demo") == server):
                    t = time.perf_counter()
                    try:
                        gallery, files = _paths(client.predict(*c["args"], api_name=c["api_name"]))
                        if not files:
                            raise RuntimeError("no files in the answer")
                        for n, p in enumerate(files):
                            rec["pictures"][f"app/{c['case']}/{n}"] = picture_record(p)
                        for n, p in enumerate(gallery):
                            rec["pictures"][f"app/{c['case']}/gallery{n}"] = picture_record(p)
                    except Exception as e:  # noqa: BLE001 (recorded; the other requests go on)
                        rec["errors"][f"app/{c['case']}"] = str(e)[:500]
                    say(f"app/{c['case']}: {time.perf_counter() - t:.1f}s")
        except Exception as e:  # noqa: BLE001
            rec["errors"][f"app ({server} server)"] = str(e)[:500]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_work(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            sys.exit(f"{work} exists and is not a pictures work folder (no {MARKER}): choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by tools/pictures.py; emptied by each record\n")


def record(out: Path, parts: list[str], work: Path, parallel: int = 2) -> int:
    from importlib.metadata import version

    prepare_work(work)
    inputs = make_inputs(work / "inputs")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec: dict = {
        "meta": {"root": str(ROOT), "commit": commit, "work": str(work), "parts": parts,
                 "python": platform.python_version(), "torch": version("torch"), "threads": THREADS,
                 "cpus": os.cpu_count(), "seconds": {}},
        "pictures": {},
        "errors": {},
    }  # fmt: skip
    t0 = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        if part == "cli":
            record_cli(work, inputs, rec, parallel)
        elif part == "app":
            record_app(work, inputs, rec)
        elif part == "ray" and subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode:
            rec["errors"]["ray"] = "ray is not installed"
        else:
            record_batch(part, work, inputs, rec)
        rec["meta"]["seconds"][part] = round(time.perf_counter() - t, 1)
        n = sum(k.startswith(part + "/") for k in rec["pictures"])
        say(f"== {part}: {n} pictures in {rec['meta']['seconds'][part]:.0f}s")
    rec["meta"]["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    rec["meta"]["counts"] = {p: sum(k.startswith(p + "/") for k in rec["pictures"]) for p in parts}
    out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    say(f"{len(rec['pictures'])} pictures {rec['meta']['counts']} in {rec['meta']['seconds']['total']:.0f}s -> {out}")
    for k, v in rec["errors"].items():
        say(f"ERROR {k}: {v}")
    return 1 if rec["errors"] else 0


FIELDS = ("pixels", "parameters", "other_text", "size")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    parts_a, parts_b = a["meta"]["parts"], b["meta"]["parts"]
    parts = [p for p in parts_a if p in parts_b]
    if parts_a != parts_b:
        print(f"note: A recorded {','.join(parts_a)}, B {','.join(parts_b)}: comparing {','.join(parts)} only")

    def ours(d: dict) -> dict:
        return {k: v for k, v in d.items() if re.split(r"[/ ]", k)[0] in parts}

    pa, pb = ours(a["pictures"]), ours(b["pictures"])
    diffs = []
    for name in sorted(set(pa) | set(pb)):
        if name not in pb:
            diffs.append(f"{name}: only in {a_path}")
        elif name not in pa:
            diffs.append(f"{name}: only in {b_path}")
        else:
            bad = [f for f in FIELDS if pa[name].get(f) != pb[name].get(f)]
            if bad:
                line = f"{name}: {', '.join(bad)} differ"
                if "parameters" in bad:
                    line += f"\n    A: {pa[name].get('parameters_text')!r}\n    B: {pb[name].get('parameters_text')!r}"
                diffs.append(line)
    ea, eb = ours(a.get("errors", {})), ours(b.get("errors", {}))
    for case in sorted(set(ea) | set(eb)):
        if ea.get(case) != eb.get(case):
            diffs.append(f"{case}: error A: {ea.get(case)!r} / B: {eb.get(case)!r}")
    for line in diffs:
        print(line)
    counts = {}
    for name in pa:
        counts[name.split("/")[0]] = counts.get(name.split("/")[0], 0) + 1
    if diffs:
        print(f"{len(diffs)} differences ({len(pa)} pictures in A, {len(pb)} in B)")
        return 1
    print(f"identical: {len(pa)} pictures {counts}, {len(ea)} errors on both sides")
    return 0


def main() -> None:
    global ROOT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="make every picture, write their hashes to OUT.json")
    r.add_argument("out", type=Path)
    r.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: {','.join(PARTS)})")
    r.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"work folder, emptied first (default: {DEFAULT_WORK})"
    )
    r.add_argument("--root", type=Path, default=ROOT, help=f"the checkout to record (default: {ROOT})")
    r.add_argument("--parallel", type=int, default=2, help="CLI processes at a time (default: 2)")
    c = sub.add_parser("compare", help="print the pictures that differ; exit 1 if any")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args()
    if a.cmd == "compare":
        sys.exit(compare(a.a, a.b))
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    ROOT = a.root.resolve()
    sys.exit(record(a.out.resolve(), parts, a.work.resolve(), a.parallel))


if __name__ == "__main__":
    main()
