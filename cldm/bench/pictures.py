"""The bench's whole pictures (prompt, hint, steps, decode), ours and diffusers' generating in turn:
- generate: 20 steps of DPM++ 2M Karras with guidance 7.5, as a default user runs;
- few-step: the few-step path CPU users take (LCM, 4 steps, guidance 1: one UNet batch, no guidance pass), with the
  two pictures' difference (same weights, seed and dtype).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import torch

from cldm.bench import measure
from cldm.bench.progress import show


@dataclass(frozen=True)
class Recipe:
    """One way to make a picture, in our names and in diffusers' scheduler's."""

    sampler: str  # our key
    steps: int
    cfg: float
    scheduler: str  # diffusers' class
    scheduler_options: tuple = ()


DEFAULT = Recipe("dpmpp_2m_karras", 20, 7.5, "DPMSolverMultistepScheduler", (("use_karras_sigmas", True),))
FEW_STEP = Recipe("lcm", 4, 1.0, "LCMScheduler")
PROMPT = "a photo of a cat"


def _hint(size: int) -> np.ndarray:
    return (np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8)


def their_generation(paths: dict, device: torch.device, dtype: str, size: int, recipe: Recipe):
    """diffusers' whole generation by `recipe`, warmed up, returning its pictures (uint8); None without diffusers."""
    from PIL import Image

    pipe = measure.theirs(paths, device, getattr(torch, dtype))
    if pipe is None:
        return None
    import diffusers

    scheduler = getattr(diffusers, recipe.scheduler)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **dict(recipe.scheduler_options))
    kw = dict(prompt=PROMPT, image=Image.fromarray(_hint(size)), width=size, height=size, output_type="np",
              guidance_scale=recipe.cfg)  # fmt: skip
    pipe(**kw, num_inference_steps=1)  # warm-up

    def run() -> np.ndarray:
        out = pipe(**kw, num_inference_steps=recipe.steps, generator=torch.Generator("cpu").manual_seed(1)).images
        return (out * 255).round().astype(np.uint8)

    return run


def generation_pairs(paths: dict, device: torch.device, size: int, recipe: Recipe, no_diffusers: bool, runs: int):
    """Ours in its default dtype and diffusers in the same dtype, generating in turn; the rows and both pictures."""
    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.runtime.manager import ModelManager

    manager = ModelManager(str(paths["base_folder"]), device=str(device), dtype="auto")
    d = str(manager.dtype).removeprefix("torch.")
    units = (ControlUnit(str(paths["cn0_file"]), _hint(size)),)
    request = GenerationRequest(PROMPT, units=units, steps=recipe.steps, cfg_scale=recipe.cfg, width=size,
                                height=size, sampler=recipe.sampler, seed=1)  # fmt: skip
    manager.run(GenerationRequest("warm", steps=1, width=size, height=size, units=units))  # packs at size
    timings, pictures = {}, {}

    def ours():
        result = manager.run(request)
        timings.update(result.timings)
        pictures["ours"] = result.images

    same = None if no_diffusers else their_generation(paths, device, d, size, recipe)

    def theirs():
        pictures["diffusers"] = same()

    if same is None:
        mine, pair = measure.timed(ours, device, runs, warmup=0), None
    else:
        mine, pair, ratio = measure.timed_pair(ours, theirs, device, runs, warmup=0)
    base = {"sampler": recipe.sampler, "dtype": d, "size": size, "steps": recipe.steps, "cfg": recipe.cfg}
    rows = [{"impl": "ours", **base, "seconds": mine.median, "min_s": mine.low, "max_s": mine.high,
             "timings": timings}]  # fmt: skip
    if pair is not None:
        rows.append({"impl": "diffusers", **base, "seconds": pair.median, "min_s": pair.low, "max_s": pair.high,
                     "ours_ratio": ratio})  # fmt: skip
    return rows, pictures


def generate_rows(
    paths: dict, device: torch.device, size: int, steps: int, no_diffusers: bool, runs: int = 3
) -> list[dict]:
    """Whole generations: ours in its default dtype and diffusers in the same dtype, in turn (`runs` pairs; the
    ratio is the median of the pairs': this VM's speed drifts), then diffusers in its own default (fp32) once, where
    that differs."""
    recipe = Recipe(DEFAULT.sampler, steps, DEFAULT.cfg, DEFAULT.scheduler, DEFAULT.scheduler_options)
    rows, _ = generation_pairs(paths, device, size, recipe, no_diffusers, runs)
    for row in rows:
        show("generate", row)
    gc.collect()
    if rows[0]["dtype"] != "float32" and not no_diffusers:
        fp32 = their_generation(paths, device, "float32", size, recipe)
        if fp32 is not None:
            t = measure.timed(fp32, device, 1, warmup=0)
            rows.append({"impl": "diffusers", "sampler": recipe.sampler, "dtype": "float32", "size": size,
                         "steps": steps, "cfg": recipe.cfg, "seconds": t.median})  # fmt: skip
            show("generate", rows[-1])
    return rows


def few_step_rows(paths: dict, device: torch.device, size: int, no_diffusers: bool, runs: int = 3) -> list[dict]:
    """The few-step whole picture (LCM, 4 steps, guidance 1), ours and diffusers' in turn, and how far apart their
    pictures are (per pixel, of 255)."""
    rows, pictures = generation_pairs(paths, device, size, FEW_STEP, no_diffusers, runs)
    if "diffusers" in pictures:
        diff = np.abs(pictures["ours"].astype(np.int16) - pictures["diffusers"].astype(np.int16))
        rows[0]["vs_diffusers"] = {"mean_abs": float(diff.mean()), "max_abs": int(diff.max()),
                                   "picture_std": float(pictures["ours"].std())}  # fmt: skip
    for row in rows:
        show("few-step", row)
    gc.collect()
    return rows
