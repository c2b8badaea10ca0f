"""The CUDA path on a GPU machine, in one run: ours against diffusers on the same tiny weights (fp32 and fp16, with
and without low VRAM, two samplers), ours on CUDA against ours on the CPU, and a 512 px 20-step ControlNet picture
at SD1.5 size (random weights) for its time and peak VRAM: ours, ours with low VRAM, diffusers, diffusers with
`enable_model_cpu_offload()`, each in a fresh process.

    python tools/cuda_check.py [--out DIR] [--models DIR]

Writes DIR/cuda_check.json. Needs diffusers (the test-only reference) and a CUDA device; the bench itself is
`python -m cldm bench --device cuda` (fp16 and bf16 steps, VAE, memory) and `--family sdxl`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMPLS = ("ours", "ours-lowvram", "diffusers", "diffusers-offload")


def parity() -> dict:
    """Max pixel difference (of 255) of ours against diffusers on CUDA, on the tests' tiny weights."""
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.runtime.manager import ModelManager
    from tests import tiny

    sd_dir, cn_dir = tiny.make_diffusers_pipeline(Path(tempfile.mkdtemp()))
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[16:48, 16:48] = 255
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            sd_dir, controlnet=ControlNetModel.from_pretrained(cn_dir), safety_checker=None,
            requires_safety_checker=False, torch_dtype=dtype,
        ).to("cuda")  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        ddim = pipe.scheduler
        for sampler in ("ddim", "dpmpp_2m_karras"):
            pipe.scheduler = ddim if sampler == "ddim" else DPMSolverMultistepScheduler.from_config(
                ddim.config, use_karras_sigmas=True)  # fmt: skip
            ref = pipe("a red square", negative_prompt="blurry", image=Image.fromarray(hint), num_inference_steps=10,
                       guidance_scale=6.0, controlnet_conditioning_scale=0.8, width=64, height=64,
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images  # fmt: skip
            ref = (ref * 255).round().astype(np.int16)
            for low in (False, True):
                manager = ModelManager(str(sd_dir), device="cuda", dtype=name, low_vram=low)
                r = GenerationRequest("a red square", "blurry", (ControlUnit(str(cn_dir), hint, 0.8),), steps=10,
                                      cfg_scale=6.0, width=64, height=64, seed=3, sampler=sampler)  # fmt: skip
                got = manager.run(r).images.astype(np.int16)
                out[f"{name} {sampler} low_vram={low}"] = int(np.abs(got - ref).max())
                print(f"{name} {sampler} low_vram={low}: {out[f'{name} {sampler} low_vram={low}']}/255", flush=True)
    r = GenerationRequest("a red square", units=(ControlUnit(str(cn_dir), hint),), steps=10, width=64, height=64)
    pictures = [
        ModelManager(str(sd_dir), device=d, dtype="fp32").run(r).images.astype(np.int16) for d in ("cpu", "cuda")
    ]
    out["ours cuda fp32 vs ours cpu fp32"] = int(np.abs(pictures[0] - pictures[1]).max())
    return out


def picture(models: Path, impl: str) -> dict:
    """One configuration's 512 px, 20-step fp16 picture: seconds (the best of 2 after a warm-up) and peak VRAM."""
    hint = (np.random.RandomState(0).rand(512, 512, 3) * 255).astype(np.uint8)
    torch.cuda.reset_peak_memory_stats()
    if impl.startswith("ours"):
        from cldm.pipeline.request import ControlUnit, GenerationRequest
        from cldm.runtime.manager import ModelManager

        manager = ModelManager(str(models / "sd"), device="cuda", dtype="fp16", low_vram=impl == "ours-lowvram")
        r = GenerationRequest("a photo of a cat", units=(ControlUnit(str(models / "control_0.safetensors"), hint),),
                              steps=20, width=512, height=512, sampler="dpmpp_2m_karras", seed=1)  # fmt: skip
        run = lambda: manager.run(r)  # noqa: E731
    else:
        from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
        from PIL import Image

        cn = ControlNetModel.from_pretrained(str(models / "cn0"), torch_dtype=torch.float16)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(str(models / "sd"), controlnet=cn,
                                                                 torch_dtype=torch.float16, safety_checker=None,
                                                                 requires_safety_checker=False)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
        pipe.enable_model_cpu_offload() if impl == "diffusers-offload" else pipe.to("cuda")

        def run():
            return pipe("a photo of a cat", image=Image.fromarray(hint), num_inference_steps=20, width=512,
                        height=512, generator=torch.Generator("cpu").manual_seed(1))  # fmt: skip

    run()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {
        "impl": impl,
        "seconds": round(min(times), 3),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--models", default=None, help="the bench's random SD1.5 weights (written there if missing)")
    p.add_argument("--picture", choices=IMPLS, help=argparse.SUPPRESS)  # one configuration, in a child process
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    from cldm.bench import measure

    models = Path(a.models or tempfile.mkdtemp(prefix="cldm-cuda-"))
    if a.picture:
        print(json.dumps(picture(models, a.picture)))
        return
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parity_max_diff": parity()}
    measure.write_models(models, tiny=False, controlnets=1)
    report["pictures_512px_20_steps_fp16"] = []
    for impl in IMPLS:  # each in a fresh process: peak VRAM is per process
        cmd = [sys.executable, __file__, "--models", str(models), "--picture", impl]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        row = (
            json.loads(done.stdout.strip().splitlines()[-1])
            if done.returncode == 0
            else {"impl": impl, "error": done.stderr[-500:]}
        )
        report["pictures_512px_20_steps_fp16"].append(row)
        print(row, flush=True)
    Path(a.out, "cuda_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
