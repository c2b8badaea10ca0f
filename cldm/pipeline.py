"""generate(): prompt + hints -> pictures. The sampling loop, with no file or device policy of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .controlnet import ControlNet, guess_mode_scales
from .errors import InputError
from .images import image_to_tensor, mask_to_tensor, resize_rgb
from .samplers import SAMPLER_LABELS, Sampler, make_sampler
from .sd import StableDiffusion

# diffusers' guess mode spaces the 13 scales logarithmically from 0.1 to 1 instead of the original 0.825 decay.
GUESS_STYLES = ("original", "diffusers")


@dataclass
class Control:
    """One ControlNet in a request: its model, hint and schedule."""

    model: ControlNet
    hint: np.ndarray | torch.Tensor  # HxWx3 uint8, or (1, 3, H, W) float in [0, 1] (-1 marks inpaint holes)
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before which this ControlNet is off
    end: float = 1.0  # fraction of the steps after which it is off
    name: str = "controlnet"


@dataclass
class Result:
    """Pictures (b, H, W, 3) uint8, the A1111-style parameters text and timings in seconds."""

    images: np.ndarray
    parameters: str
    timings: dict[str, float] = field(default_factory=dict)


def active(i: int, n: int, start: float, end: float) -> bool:
    """diffusers' rule: ControlNet runs at step i of n unless i/n < start or (i+1)/n > end."""
    return not (i / n < start or (i + 1) / n > end)


def _check(steps: int, cfg_scale: float, width: int, height: int, batch: int, strength: float, controls) -> None:
    problems = []
    if not 1 <= steps <= 1000:
        problems.append(f"steps must be 1..1000 (got {steps})")
    if not 0 <= cfg_scale <= 100:
        problems.append(f"guidance scale must be 0..100 (got {cfg_scale})")
    if not (64 <= width <= 4096 and 64 <= height <= 4096):
        problems.append(f"size must be 64..4096 px (got {width}x{height})")
    if not 1 <= batch <= 64:
        problems.append(f"batch must be 1..64 (got {batch})")
    if not 0 < strength <= 1:
        problems.append(f"denoising strength must be in (0, 1] (got {strength})")
    for c in controls:
        if not 0 <= c.scale <= 10:
            problems.append(f"{c.name}: control scale must be 0..10 (got {c.scale})")
        if not 0 <= c.start < c.end <= 1:
            problems.append(f"{c.name}: need 0 <= start < end <= 1 (got {c.start}, {c.end})")
    if problems:
        raise InputError("; ".join(problems))


def _hint_tensor(hint, width: int, height: int, device, dtype) -> torch.Tensor:
    if isinstance(hint, torch.Tensor):
        t = hint.float()
        if t.shape[-2:] != (height, width):
            t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    else:
        t = image_to_tensor(resize_rgb(hint, width, height))  # (1, 3, H, W) in [0, 1]
    return t.to(device, dtype)


def _residuals(c: Control, emb: torch.Tensor, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, scales) -> list:
    outs = c.model(x, t, ctx, emb.expand(x.shape[0], -1, -1, -1))
    return [o * s for o, s in zip(outs, scales)]


def _parameters(prompt, negative, steps, sampler, cfg_scale, seed, width, height, model, controls, extra) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields_ = [
        f"Steps: {steps}", f"Sampler: {SAMPLER_LABELS[sampler]}", f"CFG scale: {cfg_scale}", f"Seed: {seed}",
        f"Size: {width}x{height}", f"Model: {model.source.rstrip('/').split('/')[-1]}",
    ]  # fmt: skip
    fields_ += [f"{k}: {v}" for k, v in extra.items()]
    for i, c in enumerate(controls):
        fields_.append(
            f'ControlNet {i}: "Model: {c.name}, Weight: {c.scale}, Guidance Start: {c.start}, Guidance End: {c.end}"'
        )
    lines.append(", ".join(fields_))
    return "\n".join(lines)


@torch.no_grad()
def generate(
    model: StableDiffusion,
    prompt: str,
    negative_prompt: str = "",
    controls: Sequence[Control] = (),
    steps: int = 20,
    cfg_scale: float = 7.5,
    sampler: str = "ddim",
    eta: float = 0.0,
    seed: int = 0,
    width: int = 512,
    height: int = 512,
    batch: int = 1,
    guess_mode: bool = False,
    guess_style: str = "original",
    clip_skip: int = 1,
    init_image: np.ndarray | None = None,
    strength: float = 1.0,
    mask: np.ndarray | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Result:
    """Generate `batch` pictures for one prompt, steered by zero or more ControlNets.

    Classifier-free guidance runs the negative and positive prompt in one batch (off when cfg_scale <= 1).
    Guess mode runs ControlNets on the conditional half only, with the residual scales of `guess_style`;
    a ControlNet with global average pooling (shuffle) always runs on the conditional half only.
    `init_image` (HxWx3 uint8) with `strength` < 1 is img2img; adding `mask` (HxW, 1 = repaint) inpaints and keeps
    the unmasked pixels. The first latent is `torch.randn((batch, 4, H/8, W/8), generator=Generator("cpu").manual_seed(seed))`,
    as diffusers draws it, so seeds mean the same pictures there and here.
    """
    _check(steps, cfg_scale, width, height, batch, strength, controls)
    if guess_style not in GUESS_STYLES:
        raise InputError(f"guess_style must be one of {GUESS_STYLES}")
    f = model.latent_factor
    if width % f or height % f:
        raise InputError(f"width and height must be multiples of {f} (got {width}x{height})")
    if mask is not None and init_image is None:
        raise InputError("inpainting needs an init image as well as the mask")
    device, dtype = model.device, model.dtype
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(int(seed))
    use_cfg = cfg_scale > 1.0

    ctx = model.text.encode([negative_prompt, prompt], clip_skip=clip_skip).to(dtype)  # (2, 77 * chunks, w) for SD1.5
    uncond, cond = (c.expand(batch, -1, -1) for c in ctx.chunk(2))
    full_ctx = torch.cat([uncond, cond]) if use_cfg else cond
    hints = [c.model.embed_hint(_hint_tensor(c.hint, width, height, device, dtype)) for c in controls]
    timings["encode"] = time.perf_counter() - t0

    s: Sampler = make_sampler(sampler, steps, eta)
    shape = (batch, model.config.unet.in_channels, height // f, width // f)
    start, x0, latent_mask = 0, None, None
    if init_image is not None:
        image = image_to_tensor(resize_rgb(init_image, width, height)).to(device, dtype) * 2 - 1
        x0 = model.vae.encode(image.expand(batch, -1, -1, -1), generator)
        start = steps - min(int(steps * strength), steps)
        if start >= steps:
            raise InputError("denoising strength too low: no step would run. Raise it or add steps.")
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    # img2img noises the init latent even at strength 1 (diffusers, A1111); inpainting at strength 1 starts from
    # pure noise (diffusers' inpaint pipeline), the mask blend brings the known area back.
    from_noise = x0 is None or (mask is not None and strength >= 1)
    x = s.init_noise(noise) if from_noise else s.add_noise(x0, noise, start)
    if mask is not None:
        latent_mask = F.interpolate(mask_to_tensor(mask, width, height), size=shape[-2:], mode="nearest").to(
            device, dtype
        )

    n = steps - start
    t1 = time.perf_counter()
    for k, i in enumerate(range(start, steps)):
        t = s.timesteps[i].to(device)
        x_in = s.scale_input(x, i)
        x_full = torch.cat([x_in, x_in]) if use_cfg else x_in
        control = None
        for c, emb in zip(controls, hints):
            if not active(k, n, c.start, c.end):
                continue
            cond_only = use_cfg and (guess_mode or c.model.cfg.global_average_pooling)
            n_res = len(c.model.zero_convs) + 1  # 13 for SD1.5
            if guess_mode and not c.model.cfg.global_average_pooling:
                scales = guess_mode_scales(c.scale, n_res, style=guess_style)
            else:
                scales = [c.scale] * n_res
            if cond_only:
                res = _residuals(c, emb, x_in, t, cond, scales)
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            else:
                res = _residuals(c, emb, x_full, t, full_ctx, scales)
            control = res if control is None else [a + b for a, b in zip(control, res)]
        eps = model.unet(x_full, t, full_ctx, control=control)
        if use_cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + cfg_scale * (e_c - e_u)
        x = s.step(x, eps, i, generator)
        if latent_mask is not None:
            known = s.add_noise(x0, noise, i + 1) if i + 1 < steps else x0
            x = (1 - latent_mask) * known + latent_mask * x
        if callback is not None:
            callback(k + 1, n)
    timings["sampling"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    images = []
    for b in range(batch):  # one at a time: the VAE decoder is the memory peak at large sizes
        img = model.vae.decode(x[b : b + 1]).float()
        images.append(((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy())
    out = np.stack(images)
    if mask is not None:
        keep = mask_to_tensor(mask, width, height)[0, 0].numpy()[..., None]
        original = resize_rgb(init_image, width, height)
        out = (original * (1 - keep) + out * keep).round().astype(np.uint8)
    timings["decode"] = time.perf_counter() - t2
    extra = {}
    if init_image is not None:
        extra["Denoising strength"] = strength
    if clip_skip > 1:
        extra["Clip skip"] = clip_skip
    if guess_mode:
        extra["Guess mode"] = "True"
    params = _parameters(
        prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height, model, controls, extra
    )
    return Result(out, params, timings)
