"""The measurements of `python -m cldm bench` (see command.py): each returns plain numbers (seconds, bytes, FLOP/s).

Both implementations get the same random SD1.5 weights: ours are built here and written as a diffusers folder,
which diffusers loads (the diffusers folder reader is tested to be exact). Timing is plain PyTorch: warm-up, then
`runs` timed calls, synchronised on CUDA; medians with min and max. Where ours and diffusers are compared, their
calls alternate (ours, theirs, ours, ...) and the ratio is the median of each pair's ratio: a shared VM's slow
minutes then slow both sides of a pair instead of one side of the comparison.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cldm.bench.progress import show
from cldm.io import writers
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion, random_sd
from cldm.runtime import prepack
from cldm.runtime.devices import cpu_has_bf16


@dataclass(frozen=True)
class Timing:
    median: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"median_s": self.median, "min_s": self.low, "max_s": self.high}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, runs: int = 3, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times))


def timed_pair(
    ours: Callable[[], object], theirs: Callable[[], object], device: torch.device, runs: int = 3, warmup: int = 1
) -> tuple[Timing, Timing, float]:
    """Both calls timed in turn, `runs` pairs after `warmup` of each: their timings and the median of the pairs'
    ratios (ours / theirs)."""
    for _ in range(warmup):
        ours()
        theirs()
    sync(device)
    pairs = []
    for _ in range(runs):
        pair = []
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            fn()
            sync(device)
            pair.append(time.perf_counter() - t0)
        pairs.append(pair)
    a, b = ([p[i] for p in pairs] for i in (0, 1))
    timing = [Timing(statistics.median(x), min(x), max(x)) for x in (a, b)]
    return timing[0], timing[1], statistics.median(x / y for x, y in pairs)


def peak_matmul(device: torch.device, dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """The machine's matmul rate in FLOP/s for this dtype: the best of `runs` n x n products (2 n^3 each)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    reps = 4
    best = timed(lambda: [a @ b for _ in range(reps)], device, runs=runs).low
    return 2 * n**3 * reps / best


# ------------------------------------------------------------------------------------------------ the models
def bench_config(tiny: bool) -> SDConfig:
    """SD1.5's shapes, or a tiny model of the same layout (the bench's own test)."""
    if not tiny:
        return SDConfig()
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_heads=2, context_dim=32,
                      norm_groups=8, hint_block_channels=(16, 16, 32, 32))  # fmt: skip
    vae = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
    text = TextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    return SDConfig(unet, vae, text)


def random_controlnet(sd: StableDiffusion, seed: int) -> ControlNet:
    """The base's encoder copy with random zero convs and hint output (a trained ControlNet is not zero there)."""
    cn = ControlNet.from_unet(sd.unet, sd.config.unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out", f"input_hint_block.{len(cn.input_hint_block) - 1}")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return cn.eval().requires_grad_(False)


def write_models(folder: Path, tiny: bool, controlnets: int = 3) -> dict[str, Path]:
    """The random base (diffusers folder and one original .safetensors) and ControlNets (diffusers folders and
    1.1-style .safetensors), written once and reused by every measurement."""
    from cldm.io.tokenizer import clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"base_folder": folder / "sd", "base_file": folder / "sd.safetensors"}
    paths |= {f"cn{i}_folder": folder / f"cn{i}" for i in range(controlnets)}
    paths |= {f"cn{i}_file": folder / f"control_{i}.safetensors" for i in range(controlnets)}
    if all(p.exists() for p in paths.values()):
        return paths
    sd = random_sd(bench_config(tiny), tokenizer=clip_tokenizer(), seed=0).freeze()
    writers.save_sd(sd, paths["base_folder"], fmt="diffusers")
    writers.save_sd(sd, paths["base_file"])
    for i in range(controlnets):
        cn = random_controlnet(sd, seed=i + 1)
        writers.save_controlnet(cn, paths[f"cn{i}_folder"], fmt="diffusers")
        writers.save_controlnet(cn, paths[f"cn{i}_file"])
        del cn
    del sd
    gc.collect()
    return paths


def our_manager(paths: dict[str, Path], device: torch.device, dtype: torch.dtype, prepack_cpu: bool = True, **kw):
    """A model manager on the bench's base, as the app makes it (`prepack_cpu=False`: the app's --no-prepack)."""
    from cldm.runtime.manager import ModelManager

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return ModelManager(str(paths["base_folder"]), device=str(device), dtype=name, prepack_cpu=prepack_cpu, **kw)


def ours(
    paths: dict[str, Path], device: torch.device, dtype: torch.dtype, prepack_cpu: bool = True
) -> tuple[StableDiffusion, ControlNet]:
    """The base and ControlNet 0 as the model manager serves them (with its CPU bf16 convolution packing unless
    `prepack_cpu=False`)."""
    manager = our_manager(paths, device, dtype, prepack_cpu)
    sd = manager.sd
    cn = manager.controlnet(str(paths["cn0_file"])).to(device)
    return sd, cn.eval().requires_grad_(False)


def theirs(paths: dict[str, Path], device: torch.device, dtype: torch.dtype):
    """diffusers' StableDiffusionControlNetPipeline on the same weights (None when diffusers is not installed)."""
    try:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    except ImportError:
        return None
    cn = ControlNetModel.from_pretrained(paths["cn0_folder"], torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        paths["base_folder"], controlnet=cn, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------- one step
def step_inputs(sd: StableDiffusion, size: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The guidance batch of 2 at `size` px: latents, timestep, text context, hint picture."""
    gen = torch.Generator().manual_seed(seed)
    f, c = sd.latent_factor, sd.config.unet
    x = torch.randn(2, c.in_channels, size // f, size // f, generator=gen).to(device, dtype)
    ctx = torch.randn(2, 77, c.context_dim, generator=gen).to(device, dtype)
    hint = torch.rand(1, 3, size, size, generator=gen).to(device, dtype)
    return x, torch.tensor(500, device=device), ctx, hint


def our_step(sd: StableDiffusion, cn: ControlNet, size: int):
    """A closure running one sampling step's networks as our pipeline does (the hint embedded once, before)."""
    x, t, ctx, hint = step_inputs(sd, size, sd.device, sd.dtype)
    emb = cn.embed_hint(hint).expand(2, -1, -1, -1)

    @torch.no_grad()
    def step():
        return sd.unet(x, t, ctx, control=cn(x, t, ctx, emb))

    return step


def their_step(pipe, sd_cfg: SDConfig, size: int):
    """The same step through diffusers' ControlNetModel and UNet2DConditionModel, as its pipeline calls them
    (its ControlNet embeds the hint picture on every call)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    gen = torch.Generator().manual_seed(0)
    f, c = 2 ** (len(sd_cfg.vae.channel_mult) - 1), sd_cfg.unet
    x = torch.randn(2, c.in_channels, size // f, size // f, generator=gen).to(device, dtype)
    ctx = torch.randn(2, 77, c.context_dim, generator=gen).to(device, dtype)
    hint = torch.rand(1, 3, size, size, generator=gen).to(device, dtype).expand(2, -1, -1, -1)
    t = torch.tensor(500, device=device)

    @torch.no_grad()
    def step():
        down, mid = pipe.controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        return pipe.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample  # fmt: skip

    return step


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call (torch's flop counter: matmuls, convolutions and attention, 2 per multiply-add). The
    counter knows the CUDA attention kernels but not the CPU one (`_scaled_dot_product_flash_attention_for_cpu`),
    which is given its formula here: without it a 512 px step missed its 0.3 TFLOP of attention."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def attention(q, k, v, *args, out_shape=None, **kwargs) -> int:  # given shapes, as the counter's own formulas
        return sdpa_flop_count(q, k, v)

    extra = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        extra[cpu_attention] = attention
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        step()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- memory
def rss_peak() -> int:
    """This process's peak resident memory in bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_now() -> int:
    """This process's resident memory now, in bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_rss_peak() -> bool:
    """Start the peak (`rss_peak`) again from the memory resident now, so a phase's own peak can be read (Linux
    4.0+: /proc/self/clear_refs); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def drop_file_cache(path: Path) -> bool:
    """Ask the kernel to forget a file's cached pages (a cold read next time); False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# ------------------------------------------------------------------------------------------- the machine
def packs(d: str, device: torch.device) -> bool:
    """Whether the manager packs the convolutions for this dtype on this device (bf16 on the CPU)."""
    return d == "bf16" and device.type == "cpu" and prepack.available()


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
            "cpu_bf16": cpu_has_bf16(), "python": platform.python_version()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def child_row(cmd: list[str], label: str) -> dict | None:
    """Run one memory child (`python -m cldm bench ... --memory-child ...`) in a fresh process: its last JSON line,
    or None (with the reason printed) when it failed."""
    import json
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        show(f"memory {label}:", f"failed: {done.stderr[-500:]}")
        return None
    show("memory", lines[-1])
    return json.loads(lines[-1])
