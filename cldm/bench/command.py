"""`python -m cldm bench`: our model beside diffusers on the same random SD1.5 weights, in one run.

Parts (all by default; `--parts` picks some):
- peak: the machine's matmul rate per dtype (the physical limit the step's FLOPs are measured against);
- step: one sampling step (ControlNet + UNet, guidance batch 2) per size and dtype, with its FLOPs, beside
  diffusers and, on a CPU with the openvino package, OpenVINO (openvino_step.py);
- quality: the same picture (256 px, 20 steps, a ControlNet) in fp32 and in `--dtype auto`, pixel differences;
- vae: the VAE decode of one 512 px (or the largest size's) picture;
- generate: a whole generation (20 steps + decode) at the largest size, in our default mode and diffusers' fp32;
- few-step: the whole few-step picture (LCM, 4 steps, guidance 1) beside diffusers' LCM pipeline (pictures.py);
- load: a ControlNet from .safetensors, cold and warm, against diffusers' `from_pretrained`; the base;
- switch: changing ControlNets in a running model manager (warm: from its cache);
- memory: peak resident memory (peak VRAM on CUDA) with the base and 1 or 3 ControlNets, each in a fresh process.
Writes `<out>/bench.json` and `<out>/bench.md` (the README's table).

`--family sdxl` / `--family sd2`: the family's full-size shapes with random weights, parts peak, step, vae and memory
at its native size (`family_run.py`); writes `<out>/bench-<family>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cldm.bench import family_models, family_run, measure, openvino_step, pictures
from cldm.bench.progress import PartsBar, show
from cldm.io import checkpoints
from cldm.runtime.devices import DTYPES, cpu_has_bf16, resolve_device, resolve_dtype

PARTS = ("peak", "step", "quality", "vae", "generate", "few-step", "load", "switch", "memory")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--family", choices=family_models.FAMILY_NAMES, default="sd15",
        help="the model family's full-size shapes: sd15 (every part), sdxl or sd2 (peak, step, vae, memory; written "
        "to bench-<family>.json/.md)",
    )  # fmt: skip
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None,
        help="picture sizes for the step (px); default 256 512 for sd15, the family's native size otherwise",
    )  # fmt: skip
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="default: fp32 and bf16 on a CPU with bf16; fp16, bf16 on CUDA (sdxl/sd2: bf16, fp16 on CUDA)",
    )
    p.add_argument(
        "--runs", type=int, default=None, help="timed runs after one warm-up (default 3; 2 for sdxl and sd2)"
    )
    p.add_argument("--steps", type=int, default=20, help="steps of the whole generation")
    p.add_argument("--device", default="auto")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", default="docs/bench", help="folder for bench.json and bench.md")
    p.add_argument(
        "--models", default=None, help="folder for the random weights (kept between runs); default: a temp folder"
    )
    p.add_argument("--no-diffusers", action="store_true", help="ours only")
    p.add_argument("--no-openvino", action="store_true",
                   help="leave out the OpenVINO step (measured on a CPU when the openvino package is installed)")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help="one timed run (pair) after the warm-up unless --runs says otherwise; sdxl/sd2: the memory part for ours "
        "only (about half of a whole SDXL run's 10-18 minutes on 2 cores)",
    )  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same layout (checks the bench itself)")
    p.add_argument("--memory-child", nargs=3, metavar=("IMPL", "DTYPE", "N"), help=argparse.SUPPRESS)


def default_dtypes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    return ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]


def run(a: argparse.Namespace) -> dict:
    device = resolve_device(a.device)
    dtypes = a.dtypes or default_dtypes(device)
    folder = Path(a.models or tempfile.mkdtemp(prefix="cldm-bench-"))
    t = time.perf_counter()
    paths = measure.write_models(folder, a.tiny)
    print(f"random {'tiny' if a.tiny else 'SD1.5'} weights in {folder} ({time.perf_counter() - t:.0f}s)", flush=True)
    cfg = measure.bench_config(a.tiny)
    out = {"machine": measure.machine(device), "config": "tiny" if a.tiny else "sd15", "runs": a.runs, "dtype_auto": str(
        resolve_dtype("auto", device)).removeprefix("torch."), "results": {}}  # fmt: skip
    res, bar = out["results"], PartsBar(a.parts)
    if "peak" in a.parts:
        bar.running("peak")
        res["peak_flops"] = {d: measure.peak_matmul(device, DTYPES[d], n=256 if a.tiny else 2048) for d in dtypes}
        show("peak matmul:", {d: f"{v / 1e9:.0f} GFLOP/s" for d, v in res["peak_flops"].items()})
    bar.running(*(p for p in ("step", "vae") if p in a.parts))
    for d in dtypes:
        dtype = DTYPES[d]
        need_models = any(p in a.parts for p in ("step", "vae"))
        if not need_models:
            break
        sd, cn = measure.ours(paths, device, dtype)
        pipe = None if a.no_diffusers else measure.theirs(paths, device, dtype)
        # What the packing gives: a second manager without it (the app's --no-prepack), stepping in turn with ours.
        plain = (
            measure.ours(paths, device, dtype, prepack_cpu=False)
            if "step" in a.parts and measure.packs(d, device)
            else None
        )
        # OpenVINO compiles our fp32 modules (unpacked) with the dtype's precision hint
        fp32 = None
        if "step" in a.parts and not a.no_openvino and device.type == "cpu" and openvino_step.available():
            fp32 = (sd, cn) if dtype == torch.float32 and plain is None and not measure.packs(d, device) else (
                measure.ours(paths, device, torch.float32, prepack_cpu=False))  # fmt: skip
        if "step" in a.parts:
            for size in a.sizes:
                step = measure.our_step(sd, cn, size)
                plain_step = None if plain is None else measure.our_step(*plain, size)
                row = {"size": size, "dtype": d}
                if pipe is None:
                    row["ours"] = measure.timed(step, device, a.runs).as_dict()
                else:
                    mine, theirs, ratio = measure.timed_pair(step, measure.their_step(pipe, cfg, size), device, a.runs)
                    row.update(ours=mine.as_dict(), diffusers=theirs.as_dict(), ratio=ratio)
                # torch's flop counter does not see the packed convolutions: it counts the plain manager's step
                row["flops"] = measure.step_flops(step if plain_step is None else plain_step)
                if plain_step is not None:
                    _, unpacked, ratio = measure.timed_pair(step, plain_step, device, a.runs)
                    row.update(ours_unpacked=unpacked.as_dict(), packed_ratio=ratio)
                if fp32 is not None and (ov := openvino_step.openvino_step(*fp32, size, dtype)) is not None:
                    _, theirs, ratio = measure.timed_pair(step, ov, device, a.runs)
                    row.update(openvino=theirs.as_dict(), openvino_ratio=ratio)
                    del ov
                if "peak" in a.parts:  # this VM's speed drifts: the peak is the best seen, measured again here
                    again = measure.peak_matmul(device, dtype, n=256 if a.tiny else 2048)
                    res["peak_flops"][d] = max(res["peak_flops"].get(d, 0), again)
                res.setdefault("step", []).append(row)
                show("step", row)
        if "vae" in a.parts:
            res.setdefault("vae", []).append(vae_row(sd, pipe, max(a.sizes), d, device, a.runs))
            show("vae", res["vae"][-1])
        del sd, cn, pipe, plain, fp32
        gc.collect()
    later = {
        "quality": lambda: quality_row(paths, device, 64 if a.tiny else 256),
        "generate": lambda: pictures.generate_rows(paths, device, max(a.sizes), a.steps, a.no_diffusers, a.runs),
        "few-step": lambda: pictures.few_step_rows(paths, device, max(a.sizes), a.no_diffusers, a.runs),
        "load": lambda: load_rows(paths, device, a.no_diffusers, a.runs),
        "switch": lambda: switch_rows(paths, device),
        "memory": lambda: memory_rows(folder, a, dtypes),
    }  # the parts after the models' timings, in this order
    for part in [p for p in later if p in a.parts]:
        bar.running(part)
        res[part] = later[part]()
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------------- parts
def vae_row(sd, pipe, size: int, d: str, device: torch.device, runs: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    f = sd.latent_factor
    z = torch.randn(1, sd.config.vae.z_channels, size // f, size // f, generator=gen).to(device, sd.dtype)
    row = {"size": size, "dtype": d}
    with torch.no_grad():
        if pipe is None:
            row["ours"] = measure.timed(lambda: sd.vae.decode(z), device, runs).as_dict()
        else:
            scaled = z / pipe.vae.config.scaling_factor
            mine, theirs, ratio = measure.timed_pair(
                lambda: sd.vae.decode(z), lambda: pipe.vae.decode(scaled), device, runs
            )
            row.update(ours=mine.as_dict(), diffusers=theirs.as_dict(), ratio=ratio)
    return row


def quality_row(paths: dict, device: torch.device, size: int) -> dict:
    """How far `--dtype auto`'s pictures are from fp32's: one request, both dtypes, the same seed."""
    import numpy as np

    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.runtime.manager import ModelManager

    hint = (np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8)
    r = GenerationRequest("a photo of a cat", units=(ControlUnit(str(paths["cn0_file"]), hint),), steps=20,
                          width=size, height=size, sampler="dpmpp_2m_karras", seed=1)  # fmt: skip
    pictures = {}
    for d in ("fp32", "auto"):
        manager = ModelManager(str(paths["base_folder"]), device=str(device), dtype=d)
        pictures[d] = manager.run(r).images.astype(np.float64)
        name = str(manager.dtype).removeprefix("torch.")
        del manager
        gc.collect()
    diff = np.abs(pictures["fp32"] - pictures["auto"])
    row = {"size": size, "auto": name, "mean_abs": float(diff.mean()), "p99_abs": float(np.percentile(diff, 99)),
           "max_abs": float(diff.max()), "fp32_std": float(pictures["fp32"].std())}  # fmt: skip
    show("quality", row)
    return row


def load_rows(paths: dict, device: torch.device, no_diffusers: bool, runs: int) -> list[dict]:
    """ControlNet loading: cold (the file's pages dropped from the OS cache first) and warm; then the base."""
    rows = []
    dtype = resolve_dtype("auto", device)
    d = str(dtype).removeprefix("torch.")

    def ours_cn(i):
        return checkpoints.load_controlnet(paths[f"cn{i}_file"], dtype=dtype).to(device)

    def theirs_cn(i):
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(paths[f"cn{i}_folder"], torch_dtype=dtype).to(device)

    impls = [("ours", ours_cn, "cn{}_file")] + ([] if no_diffusers else [("diffusers", theirs_cn, "cn{}_folder")])
    for name, load, key in impls:
        cold = []
        for i in range(min(runs, 3)):
            dropped = measure.drop_file_cache(Path(paths[key.format(i)]))
            t = time.perf_counter()
            load(i)
            measure.sync(device)
            cold.append(time.perf_counter() - t)
        warm = measure.timed(lambda load=load: load(0), device, runs)
        rows.append({"what": "controlnet", "impl": name, "dtype": d, "cold_s": sorted(cold)[len(cold) // 2],
                     "cold_dropped_cache": dropped, "warm": warm.as_dict()})  # fmt: skip
        show("load", rows[-1])

    def ours_base():
        return checkpoints.load_sd(paths["base_file"], dtype=dtype).to(device)

    def theirs_base():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(paths["base_folder"], torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)  # fmt: skip

    bases = [("base (.safetensors)", "ours", ours_base, "base_file")]
    bases += [] if no_diffusers else [("base (folder)", "diffusers", theirs_base, "base_folder")]
    for what, name, load, key in bases:
        dropped = measure.drop_file_cache(Path(paths[key]))
        t = time.perf_counter()
        model = load()
        cold = time.perf_counter() - t
        del model
        gc.collect()
        t = time.perf_counter()
        model = load()
        rows.append({"what": what, "impl": name, "dtype": d, "cold_s": cold, "cold_dropped_cache": dropped,
                     "warm_s": time.perf_counter() - t})  # fmt: skip
        del model
        gc.collect()
        show("load", rows[-1])
    gc.collect()
    return rows


def switch_rows(paths: dict, device: torch.device) -> list[dict]:
    """The `swap` timing of a running manager: a ControlNet loaded for the first time, then one from its cache."""
    import numpy as np

    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.runtime.manager import ModelManager

    manager = ModelManager(str(paths["base_file"]), device=str(device), dtype="auto")
    hint = np.zeros((64, 64, 3), np.uint8)
    swaps = {}
    for label, i in (("first", 0), ("cold", 1), ("warm", 0), ("warm again", 1)):
        r = GenerationRequest("x", units=(ControlUnit(str(paths[f"cn{i}_file"]), hint),), steps=1, width=64, height=64)
        swaps[label] = manager.run(r).timings["swap"]
    row = {"cold_s": swaps["cold"], "warm_s": min(swaps["warm"], swaps["warm again"]), "dtype": str(manager.dtype)}
    show("switch", row)
    return [row]


def memory_rows(folder: Path, a: argparse.Namespace, dtypes: list[str]) -> list[dict]:
    """Each configuration in a fresh process (peak memory is per process)."""
    rows = []
    for d in dtypes:
        plain = ["ours-no-prepack"] if measure.packs(d, resolve_device(a.device)) else []
        impls = ["ours", *plain] + ([] if a.no_diffusers else ["diffusers"])
        for n in (1, 3):
            for impl in impls:
                cmd = [sys.executable, "-m", "cldm", "bench", "--models", str(folder), "--device", a.device,
                       "--memory-child", impl, d, str(n)] + (["--tiny"] if a.tiny else [])  # fmt: skip
                if (row := measure.child_row(cmd, f"{impl} {d} {n}")) is not None:
                    rows.append(row)
    return rows


def memory_child(a: argparse.Namespace) -> None:
    """Hold the base and N ControlNets and run one 256 px step with each; print the peak as JSON."""
    impl, d, n = a.memory_child[0], a.memory_child[1], int(a.memory_child[2])
    device, dtype = resolve_device(a.device), DTYPES[d]
    paths = measure.write_models(Path(a.models), a.tiny)
    size = 64 if a.tiny else 256
    # both sides hold exactly N ControlNets, ours in the manager's cache (packed for bf16 on the CPU, as the app has
    # them unless it runs with --no-prepack)
    if impl.startswith("ours"):
        manager = measure.our_manager(
            paths, device, dtype, prepack_cpu=impl == "ours", cache_bytes=1 << 50
        )  # all N stay
        cns = [manager.controlnet(str(paths[f"cn{i}_file"])).to(device).eval() for i in range(n)]
        for cn in cns:
            measure.our_step(manager.sd, cn, size)()
    else:
        from diffusers import ControlNetModel

        pipe = measure.theirs(paths, device, dtype)
        more = [ControlNetModel.from_pretrained(paths[f"cn{i}_folder"], torch_dtype=dtype) for i in range(1, n)]
        cns = [pipe.controlnet, *(c.to(device) for c in more)]
        for cn in cns:
            pipe.controlnet = cn
            measure.their_step(pipe, measure.bench_config(a.tiny), size)()
    measure.sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else measure.rss_peak()
    print(json.dumps({"impl": impl, "dtype": d, "controlnets": n, "peak_bytes": peak,
                      "kind": "vram" if device.type == "cuda" else "rss"}))  # fmt: skip


def _defaults(a: argparse.Namespace) -> None:
    if a.runs is None:
        a.runs = 1 if getattr(a, "quick", False) else 3 if a.family == "sd15" else 2
    if a.sizes is None:
        a.sizes = [256, 512] if a.family == "sd15" else [family_models.native_size(a.family, a.tiny)]


def cmd_bench(a: argparse.Namespace) -> None:
    _defaults(a)
    if a.memory_child:
        memory_child(a) if a.family == "sd15" else family_run.family_memory_child(a)
        return
    from cldm.bench.report import markdown

    out = run(a) if a.family == "sd15" else family_run.run_family(a, PARTS)
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    name = "bench" if a.family == "sd15" else f"bench-{a.family}"
    (folder / f"{name}.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    table = markdown(out)
    (folder / f"{name}.md").write_text(table, encoding="utf-8")
    print(table)
