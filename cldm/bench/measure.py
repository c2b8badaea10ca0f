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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cldm.io import writers
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion, random_sd
from cldm.models.unet import UNet


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


# ---------------------------------------------------------------------------------------- SD2.x and SDXL
# `--family sdxl|sd2`: the family's full-size shapes with random weights made here, in memory (no files). Ours is held
# as the model manager holds a loaded base (the bench dtype, frozen, bf16 convolutions prepacked on the CPU);
# diffusers' UNet2DConditionModel, ControlNetModel and AutoencoderKL are built empty (meta device) and given the
# same tensors under diffusers' names (`keymaps.to_diffusers`), so both read one copy of the weights.
FAMILY_NAMES = ("sd15", "sdxl", "sd2")


def family_config(name: str, tiny: bool) -> SDConfig:
    """The bench model of a family: SD1.5 (`bench_config`), SDXL base 1.0 or SD2.1-768-v shapes; `tiny`: a small
    model of the same layout (the bench's own tests)."""
    if name == "sd15":
        return bench_config(tiny)
    scale = 0.13025 if name == "sdxl" else VAEConfig.scale_factor
    tiny_vae = VAEConfig(
        base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, scale_factor=scale
    )
    if name == "sdxl":
        if tiny:  # 16-wide heads; the context is 32 + 48 wide; y = 6 size sinusoids of 8 + the 40-wide pooled text
            unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 1, 2),
                              head_channels=16, use_linear_in_transformer=True, context_dim=80, adm_in_channels=6 * 8 + 40,
                              size_embed_dim=8, norm_groups=8, hint_block_channels=(16, 16, 32, 32))  # fmt: skip
            text = TextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
            text_2 = TextConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=3, hidden_act="gelu",
                                projection_dim=40)  # fmt: skip
            return SDConfig(unet, tiny_vae, text, text_2, family="SDXL")
        # SDXL base 1.0: no attention at the first level, 2 and 10 transformer blocks at the next two (and the
        # middle), 64-wide heads; CLIP ViT-L (768) + OpenCLIP ViT-bigG (1280) = 2048; y = 1280 pooled + 6 x 256
        unet = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 2, 10), head_channels=64,
                          use_linear_in_transformer=True, context_dim=2048, adm_in_channels=2816, size_embed_dim=256)  # fmt: skip
        text_2 = TextConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
                            projection_dim=1280)  # fmt: skip
        return SDConfig(unet, VAEConfig(scale_factor=scale), TextConfig(), text_2, family="SDXL")
    if name == "sd2":
        if tiny:
            unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), head_channels=16,
                              use_linear_in_transformer=True, upcast_attention=True, context_dim=48, norm_groups=8,
                              hint_block_channels=(16, 16, 32, 32))  # fmt: skip
            text = TextConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=3, hidden_act="gelu")
            return SDConfig(unet, tiny_vae, text, family="SD2.x", prediction="v")
        # SD2.1-768-v: SD1.5's levels with 64-wide heads, linear projections, attention upcast; OpenCLIP ViT-H as
        # diffusers keeps it (23 of 24 layers)
        unet = UNetConfig(head_channels=64, use_linear_in_transformer=True, upcast_attention=True, context_dim=1024)
        text = TextConfig(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu")
        return SDConfig(unet, VAEConfig(), text, family="SD2.x", prediction="v")
    raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILY_NAMES)}")


def native_size(name: str, tiny: bool) -> int:
    from cldm.models.family import family

    return 64 if tiny else family(name).native_size


def random_family(cfg: SDConfig, dtype: torch.dtype, seed: int = 0, prepack_cpu: bool = True):
    """Random base (both text encoders, with the offline CLIP tokenizers) and ControlNet in `dtype`, made in that dtype
    from the start (an SDXL UNet is 10 GB in fp32, 5 GB in bf16), held as the model manager holds a loaded model."""
    from cldm.io.tokenizer import clip_tokenizer
    from cldm.models.family import family
    from cldm.runtime import prepack

    pads = family(cfg.family).text_pads
    tokenizers = [clip_tokenizer(pad_token=p) for p in pads]
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        sd = random_sd(cfg, tokenizers[0], seed, tokenizers[1] if len(tokenizers) > 1 else None)
        cn = random_controlnet(sd, seed + 1)
    finally:
        torch.set_default_dtype(before)
    sd = sd.to(dtype=dtype).freeze()
    cn = cn.to(dtype=dtype)
    if prepack_cpu and dtype == torch.bfloat16:  # the manager's `_fast` (a no-op off the CPU or without oneDNN)
        for m in (sd.unet, sd.vae, cn):
            prepack.enable(m)
    return sd, cn


def _empty_then(cls, config: dict, state: dict[str, torch.Tensor]):
    """A diffusers/transformers model built on the meta device and given `state`'s tensors themselves."""
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise RuntimeError(f"{cls.__name__}: keys not taken {unexpected[:5]}, left empty {left[:5]}")
    return model.eval().requires_grad_(False)


def as_diffusers(sd: StableDiffusion, cn: ControlNet) -> dict:
    """diffusers' UNet, ControlNet and VAE on our tensors (no copy: the VAE's attention 1x1 convolutions become
    Linear weights as views)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from cldm.io import keymaps
    from cldm.io import model_configs as mc

    c = sd.config
    unet = _empty_then(UNet2DConditionModel, mc.unet_config_to_diffusers(c.unet, controlnet=False),
                       keymaps.to_diffusers(sd.unet.state_dict(), keymaps.unet_modules(c.unet)))  # fmt: skip
    control = _empty_then(ControlNetModel, mc.unet_config_to_diffusers(cn.cfg, controlnet=True),
                          keymaps.to_diffusers(cn.state_dict(), keymaps.controlnet_modules(cn.cfg)))  # fmt: skip
    vae = _empty_then(AutoencoderKL, mc.vae_config_to_diffusers(c.vae),
                      keymaps.to_diffusers(sd.vae.state_dict(), keymaps.vae_modules(c.vae)))  # fmt: skip
    return {"unet": unet, "controlnet": control, "vae": vae}


def family_inputs(cfg: SDConfig, size: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """One step's inputs at `size` px, the guidance batch of 2: latents, timestep, text context, hint picture and,
    for SDXL, the pooled text and the size numbers (ours join them into y as the pipeline does)."""
    gen = torch.Generator().manual_seed(seed)
    f, u = cfg.vae.downsample_factor, cfg.unet
    x = torch.randn(2, u.in_channels, size // f, size // f, generator=gen)
    inputs = {"x": x, "t": torch.tensor(500), "ctx": torch.randn(2, 77, u.context_dim, generator=gen),
              "hint": torch.rand(1, 3, size, size, generator=gen)}  # fmt: skip
    if u.adm_in_channels:
        from cldm.pipeline.conditioning import size_embedding

        pooled = torch.randn(2, u.adm_in_channels - 6 * u.size_embed_dim, generator=gen)
        inputs["pooled"] = pooled
        inputs["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        inputs["y"] = torch.cat([pooled, size_embedding(size, size, 2, u.size_embed_dim)], dim=-1)
    return {k: v.to(device, dtype) if v.is_floating_point() and k != "time_ids" else v.to(device)
            for k, v in inputs.items()}  # fmt: skip


def family_steps(sd: StableDiffusion, cn: ControlNet, theirs: dict | None, size: int):
    """Our step and diffusers' on the same inputs: ControlNet + UNet at batch 2 (ours embeds the hint once, before,
    as our pipeline does; diffusers' ControlNet embeds it on every call, as its pipeline does)."""
    i = family_inputs(sd.config, size, sd.device, sd.dtype)
    x, t, ctx, y = i["x"], i["t"], i["ctx"], i.get("y")
    emb = cn.embed_hint(i["hint"]).expand(2, -1, -1, -1)

    @torch.no_grad()
    def ours():
        return sd.unet(x, t, ctx, control=cn(x, t, ctx, emb, y), y=y)

    if theirs is None:
        return ours, None
    added = {"text_embeds": i["pooled"], "time_ids": i["time_ids"]} if "pooled" in i else None
    hint = i["hint"].expand(2, -1, -1, -1)

    @torch.no_grad()
    def their():
        down, mid = theirs["controlnet"](x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                                         added_cond_kwargs=added, return_dict=False)  # fmt: skip
        return theirs["unet"](x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                              down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip

    return ours, their


def family_decodes(sd: StableDiffusion, theirs: dict | None, size: int):
    """Our VAE decode of one picture and diffusers' on the same latent (ours takes it scaled, as the sampler ends)."""
    f = sd.latent_factor
    z = torch.randn(1, sd.config.vae.z_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
    z = z.to(sd.device, sd.dtype)

    @torch.no_grad()
    def ours():
        return sd.vae.decode(z)

    if theirs is None:
        return ours, None
    unscaled = z / sd.config.vae.scale_factor

    @torch.no_grad()
    def their():
        return theirs["vae"].decode(unscaled).sample

    return ours, their


def set_upcast(modules, on: bool) -> int:
    """Turn SD2.1's attention upcast (scores in fp32 for half-precision models; ours honours it on the CPU, diffusers'
    SDPA processor does not) on or off in our attention layers; returns how many were set."""
    from cldm.models.attention import CrossAttention

    layers = [m for module in modules for m in module.modules() if isinstance(m, CrossAttention)]
    for m in layers:
        m.upcast = on
    return len(layers)


def difference(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """How far two outputs are apart, against the size of the output: largest and mean absolute difference,
    divided by the reference's standard deviation."""
    a, b = ours.float(), theirs.float()
    d = (a - b).abs()
    scale = float(b.std())
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_std": scale,
            "max_rel": float(d.max()) / scale if scale else float("inf"),
            "mean_rel": float(d.mean()) / scale if scale else float("inf")}  # fmt: skip


def meta_step_flops(cfg: SDConfig, size: int) -> int:
    """FLOPs of our step at `size` px counted on the meta device (no arithmetic done: a 1024 px SDXL step counted
    in well under a second instead of a minute)."""
    with torch.device("meta"):
        unet = UNet(cfg.unet)
        cn = ControlNet(cfg.unet)
    i = family_inputs(cfg, size, torch.device("meta"), torch.float32)
    emb = cn.embed_hint(i["hint"]).expand(2, -1, -1, -1)
    x, t, ctx, y = i["x"], i["t"], i["ctx"], i.get("y")
    return step_flops(lambda: unet(x, t, ctx, control=cn(x, t, ctx, emb, y), y=y))


def _their_text(encoder):
    """transformers' text model for diffusers' pipeline, on our tensors: our CLIPTextModel itself, or (SDXL's second
    encoder) a CLIPTextModelWithProjection given its tensors and our projection."""
    if encoder.text_projection is None:
        return encoder.clip
    from transformers import CLIPTextModelWithProjection

    state = {"text_model." + k: v for k, v in encoder.clip.state_dict().items()}
    state["text_projection.weight"] = encoder.text_projection.weight
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(encoder.clip.config)
    model.load_state_dict(state, strict=False, assign=True)
    emb = model.text_model.embeddings  # a buffer no file holds
    emb.register_buffer("position_ids", torch.arange(emb.position_embedding.weight.shape[0])[None], persistent=False)
    return model.eval().requires_grad_(False)


def their_pipeline(sd: StableDiffusion, cn: ControlNet):
    """diffusers' ControlNet pipeline of the family (SDXL's or SD's), on our tensors, with a DDIM schedule."""
    import diffusers

    parts = as_diffusers(sd, cn)
    sched = dict(writers.SD15_SCHEDULER, prediction_type="v_prediction" if sd.config.prediction == "v" else "epsilon")
    scheduler = diffusers.DDIMScheduler.from_config(sched)
    if sd.text_2 is not None:
        pipe = diffusers.StableDiffusionXLControlNetPipeline(
            vae=parts["vae"], text_encoder=_their_text(sd.text), text_encoder_2=_their_text(sd.text_2),
            tokenizer=sd.text.tokenizer, tokenizer_2=sd.text_2.tokenizer, unet=parts["unet"],
            controlnet=parts["controlnet"], scheduler=scheduler, add_watermarker=False,
        )  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(
            vae=parts["vae"], text_encoder=_their_text(sd.text), tokenizer=sd.text.tokenizer, unet=parts["unet"],
            controlnet=parts["controlnet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
