"""`bench --family sdxl|sd2`: the check, the timed step and decode against diffusers, and the memory of a whole
generation in fresh processes, for the SD2.x and SDXL models of `family_models.py`."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from cldm.bench import family_models, measure
from cldm.bench.progress import PartsBar, show
from cldm.runtime import allocator
from cldm.runtime.devices import DTYPES, cpu_has_bf16, resolve_device, resolve_dtype

FAMILY_PARTS = ("peak", "step", "vae", "memory")
# The same function before it is timed (diffusers' step on our tensors against ours, at CHECK_PX): in fp32 to
# rounding; in bf16 the two orders of arithmetic differ by about 1% of the output's spread on average
CHECK_PX = 256
CHECK_MEAN_REL = {"fp32": 1e-4, "bf16": 0.05, "fp16": 0.05}


def family_dtypes(device: torch.device) -> list[str]:
    """One dtype: an SDXL step in fp32 on the CPU takes minutes and 15 GB; the app's default elsewhere."""
    if device.type == "cuda":
        return ["fp16"]
    return ["bf16"] if cpu_has_bf16() else ["fp32"]


def _params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def check_row(sd, cn, theirs: dict, size: int, d: str) -> dict:
    """Ours and diffusers on the same tensors and inputs, one step and one decode at `size` px: their differences
    (mean and largest, relative to the output's spread). Raises when the step or the decode differ beyond what the
    dtype's rounding explains: the timings would not compare like with like."""
    row = {"size": size, "dtype": d}
    for what, (ours, their) in (("step", family_models.family_steps(sd, cn, theirs, size)),
                                ("vae", family_models.family_decodes(sd, theirs, size))):  # fmt: skip
        row[what] = family_models.difference(ours(), their())
    bad = [w for w in ("step", "vae") if not row[w]["mean_rel"] <= CHECK_MEAN_REL[d]]
    if bad:
        raise RuntimeError(f"ours and diffusers differ in {', '.join(bad)} on the same weights: {json.dumps(row)}")
    return row


def run_family(a: argparse.Namespace, default_parts: tuple[str, ...]) -> dict:
    """`--family sdxl|sd2`: random full-size weights made in memory, ours and diffusers on the same tensors."""
    device = resolve_device(a.device)
    dtypes = a.dtypes or family_dtypes(device)
    cfg = family_models.family_config(a.family, a.tiny)
    out = {"machine": measure.machine(device) | {"load_average": list(os.getloadavg())}, "family": a.family,
           "config": "tiny" if a.tiny else a.family, "runs": a.runs,
           "dtype_auto": str(resolve_dtype("auto", device)).removeprefix("torch."), "results": {}}  # fmt: skip
    res = out["results"]
    parts = [p for p in a.parts if p in FAMILY_PARTS]
    if a.parts != list(default_parts) and set(a.parts) - set(parts):  # asked for by name, not by default
        print(f"--family {a.family} runs {', '.join(FAMILY_PARTS)} only; left out: "
              f"{', '.join(p for p in a.parts if p not in parts)}", flush=True)  # fmt: skip
    bar = PartsBar(parts)
    if "peak" in parts:
        bar.running("peak")
        res["peak_flops"] = {d: measure.peak_matmul(device, DTYPES[d], n=256 if a.tiny else 2048) for d in dtypes}
        show("peak matmul:", {d: f"{v / 1e9:.0f} GFLOP/s" for d, v in res["peak_flops"].items()})
    if "memory" in parts:  # first, while this process holds no model (the machine holds one SDXL at a time)
        bar.running("memory")
        res["memory"] = family_memory_rows(a, dtypes)
    bar.running(*(p for p in ("step", "vae") if p in parts))
    for d in dtypes if {"step", "vae"} & set(parts) else []:
        family_timings(a, cfg, d, device, parts, res)
        gc.collect()  # the models and the closures holding them are gone with the call
        allocator.trim()
    bar.close()
    out["machine"]["load_average_end"] = list(os.getloadavg())
    return out


def family_timings(a: argparse.Namespace, cfg, d: str, device: torch.device, parts: list[str], res: dict) -> None:
    """Build ours and diffusers' modules in dtype `d`, check they agree, time the step and the decode in pairs."""
    t = time.perf_counter()
    sd, cn = family_models.random_family(cfg, DTYPES[d])
    sd.to(device), cn.to(device)
    theirs = None
    if not a.no_diffusers:
        try:
            theirs = family_models.as_diffusers(sd, cn)
        except ImportError:
            pass
    res.setdefault("build", []).append(
        {
            "dtype": d,
            "seconds": time.perf_counter() - t,
            "params": {
                "unet": _params(sd.unet),
                "controlnet": _params(cn),
                "vae": _params(sd.vae),
                "text": _params(*sd.texts),
            },
        }
    )
    show("build", res["build"][-1])
    if theirs is not None:
        res.setdefault("check", []).append(check_row(sd, cn, theirs, 64 if a.tiny else CHECK_PX, d))
        show("check", res["check"][-1])
    if "step" in parts:
        for size in a.sizes:
            ours, their = family_models.family_steps(sd, cn, theirs, size)
            row = {"size": size, "dtype": d, "flops": family_models.meta_step_flops(cfg, size)}
            if their is None:
                row["ours"] = measure.timed(ours, device, a.runs).as_dict()
            else:
                mine, other, ratio = measure.timed_pair(ours, their, device, a.runs)
                row.update(ours=mine.as_dict(), diffusers=other.as_dict(), ratio=ratio)
            if cfg.unet.upcast_attention and d != "fp32" and their is not None:
                # SD2.1's upcast, which diffusers' attention processor leaves out: ours without it, in pairs again
                family_models.set_upcast([sd.unet, cn], False)
                try:
                    plain, _, ratio = measure.timed_pair(ours, their, device, a.runs)
                finally:
                    family_models.set_upcast([sd.unet, cn], True)
                row.update(ours_no_upcast=plain.as_dict(), no_upcast_ratio=ratio)
            res.setdefault("step", []).append(row)
            show("step", row)
    if "vae" in parts:
        size = max(a.sizes)
        ours, their = family_models.family_decodes(sd, theirs, size)
        f = sd.latent_factor
        row = {"size": size, "dtype": d, "tiled": sd.vae.wants_tiles((size // f, size // f))}
        if their is None:
            row["ours"] = measure.timed(ours, device, a.runs).as_dict()
        else:
            mine, other, ratio = measure.timed_pair(ours, their, device, a.runs)
            row.update(ours=mine.as_dict(), diffusers=other.as_dict(), ratio=ratio)
        res.setdefault("vae", []).append(row)
        show("vae", row)


def family_memory_rows(a: argparse.Namespace, dtypes: list[str]) -> list[dict]:
    """Each implementation in a fresh process, one after the other (peak memory is per process)."""
    rows = []
    for d in dtypes:
        plain = ["ours-no-prepack"] if measure.packs(d, resolve_device(a.device)) else []
        impls = ["ours"] if getattr(a, "quick", False) else ["ours", *plain] + ([] if a.no_diffusers else ["diffusers"])
        for impl in impls:
            cmd = [sys.executable, "-m", "cldm", "bench", "--family", a.family, "--device", a.device,
                   "--sizes", str(max(a.sizes)), "--memory-child", impl, d, "1"] + (["--tiny"] if a.tiny else [])  # fmt: skip
            if (row := measure.child_row(cmd, f"{impl} {d}")) is not None:
                rows.append(row)
    return rows


def family_memory_child(a: argparse.Namespace) -> dict:
    """One whole generation at the largest size (1 step with guidance, one ControlNet, the VAE decode), the base
    with both full-size text encoders, as the app runs it (ours) or as diffusers' ControlNet pipeline runs it on
    the same tensors; prints and returns the process's peak memory as JSON."""
    import numpy as np

    impl, d = a.memory_child[0], a.memory_child[1]
    device, dtype = resolve_device(a.device), DTYPES[d]
    cfg = family_models.family_config(a.family, a.tiny)
    size = max(a.sizes)
    hint = (np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8)
    t = time.perf_counter()
    sd, cn = family_models.random_family(cfg, dtype, prepack_cpu=impl == "ours")
    sd.to(device), cn.to(device)
    built = time.perf_counter() - t
    cuda = device.type == "cuda"
    # each phase's own peak: building, then the text encoders + hint + the step, then the decode (the VAE alone)
    phases = {"held_after_build": torch.cuda.memory_allocated(device) if cuda else measure.rss_now()}

    def phase(name: str) -> None:
        measure.sync(device)
        phases[name] = torch.cuda.max_memory_allocated(device) if cuda else measure.rss_peak()
        torch.cuda.reset_peak_memory_stats(device) if cuda else measure.reset_rss_peak()

    phase("build")
    t = time.perf_counter()
    if impl.startswith("ours"):
        from cldm.pipeline.request import ControlUnit, GenerationRequest
        from cldm.pipeline.stages import generate

        r = GenerationRequest("a photo of a cat", units=(ControlUnit(cn, hint),), steps=1, width=size, height=size,
                              seed=1)  # fmt: skip
        timings = generate(sd, r, callback=lambda k, n: phase("encode_and_step")).timings
    else:
        pipe = family_models.their_pipeline(sd, cn)
        del sd, cn  # the pipeline holds the same tensors
        gc.collect()
        from PIL import Image

        def step_end(pipeline, i, t, kwargs):
            phase("encode_and_step")
            return kwargs

        pipe(prompt="a photo of a cat", image=Image.fromarray(hint), width=size, height=size, num_inference_steps=1,
             output_type="np", generator=torch.Generator().manual_seed(1), callback_on_step_end=step_end)  # fmt: skip
        timings = {}
    phase("decode")
    peak = max(v for k, v in phases.items() if k != "held_after_build")
    row = {"impl": impl, "dtype": d, "controlnets": 1, "size": size, "peak_bytes": peak, "phases": phases,
           "build_s": built, "generate_s": time.perf_counter() - t, "timings": timings,
           "kind": "vram" if cuda else "rss"}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row
