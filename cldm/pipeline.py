"""generate(model, request): prompt + hints -> pictures, in named stages. No file or device policy of its own.

check -> encode prompts -> embed hints -> prepare latents -> denoise (ControlNet residuals, UNet, guidance,
sampler step, inpaint blend) -> decode -> parameters
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .attention import PromptContext
from .controlnet import ControlNet, fit_problem, guess_mode_scales
from .errors import InputError
from .images import image_to_tensor, mask_to_tensor, resize_rgb
from .ip_adapter import image_prompt_problem, layer_scales, prompt_tokens
from .reference import ReferenceState, noised_reference
from .request import ControlUnit, GenerationRequest
from .samplers import SAMPLER_LABELS, Sampler, alphas_cumprod, make_sampler
from .sd import StableDiffusion

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
CONTROL_MODE_LABELS = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "control": "ControlNet is more important",
}  # A1111's names, as its PNG parameters write them


@dataclass
class Result:
    """Pictures (b, H, W, 3) uint8, the A1111-style parameters text and timings in seconds."""

    images: np.ndarray
    parameters: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Conditioning:
    """The text context: the negative and positive halves (batch-sized) and what the UNet reads."""

    uncond: torch.Tensor
    cond: torch.Tensor
    full: torch.Tensor  # [uncond, cond] with guidance, cond alone without (what the ControlNets read)
    unet: torch.Tensor | PromptContext | None = None  # `full`, plus the image-prompt tokens with an IP-Adapter


@dataclass
class Latents:
    """The starting point of the loop and what inpainting needs to put the known area back after each step."""

    x: torch.Tensor
    start: int  # first step index (img2img skips the first steps)
    noise: torch.Tensor
    x0: torch.Tensor | None = None  # the init picture's latent (img2img, inpaint)
    mask: torch.Tensor | None = None  # latent-sized, 1 = repaint


def active(i: int, n: int, start: float, end: float) -> bool:
    """diffusers' rule: ControlNet runs at step i of n unless i/n < start or (i+1)/n > end."""
    return not (i / n < start or (i + 1) / n > end)


# -------------------------------------------------------------------------------------------------- stages
def check(model: StableDiffusion, request: GenerationRequest) -> None:
    """Refuse a bad request before any work: field values, then ControlNets that do not fit the base."""
    request.validate(model.latent_factor)
    problems = []
    if request.clip_skip > model.config.text.num_layers:
        problems.append(f"clip_skip must be 1..{model.config.text.num_layers} for this text encoder")
    for i, u in enumerate(request.units):
        if not isinstance(u.model, ControlNet):
            problems.append(f"ControlNet {i + 1} ({u.label}) is not loaded (the model manager loads files)")
        elif (why := fit_problem(u.model, model.config.unet, model.latent_factor)) is not None:
            problems.append(f"ControlNet {i + 1} ({u.label}) does not fit this base model: {why}. "
                            "Use a ControlNet made for this base (SD1.5 ControlNets for SD1.5 models).")  # fmt: skip
    if request.image_prompt is not None and (why := image_prompt_problem(request.image_prompt, model.unet)):
        problems.append(why)
    if problems:
        raise InputError("; ".join(problems))


def encode_prompts(model: StableDiffusion, r: GenerationRequest) -> Conditioning:
    """The text context, and with an image prompt the IP-Adapter's tokens beside it (for the UNet only)."""
    ctx = model.text.encode([r.negative_prompt, r.prompt], clip_skip=r.clip_skip).to(model.dtype)  # (2, 77*k, w)
    uncond, cond = (c.expand(r.batch, -1, -1) for c in ctx.chunk(2))
    full = torch.cat([uncond, cond]) if r.use_cfg else cond
    unet: torch.Tensor | PromptContext = full
    if r.image_prompt is not None:
        ip = r.image_prompt
        tokens = prompt_tokens(ip, r.batch, r.use_cfg)
        unet = ip.adapter.context(full, tokens, layer_scales(ip.scale, len(model.unet.cross_attentions())))
    return Conditioning(uncond, cond, full, unet)


def _hint_tensor(hint, width: int, height: int, device, dtype) -> torch.Tensor:
    if isinstance(hint, torch.Tensor):
        t = hint.float()
        if t.shape[-2:] != (height, width):
            t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    else:
        t = image_to_tensor(resize_rgb(hint, width, height))  # (1, 3, H, W) in [0, 1]
    return t.to(device, dtype)


def embed_hints(model: StableDiffusion, r: GenerationRequest) -> list[torch.Tensor]:
    """Each unit's hint at the picture size through its hint block: once per generation, not per step."""
    return [u.model.embed_hint(_hint_tensor(u.hint, r.width, r.height, model.device, model.dtype)) for u in r.units]


def prepare_latents(model: StableDiffusion, r: GenerationRequest, s: Sampler, generator: torch.Generator) -> Latents:
    """Pure noise, or the init picture's latent noised to the first step that runs (img2img, inpaint).

    The noise is `torch.randn((batch, 4, H/8, W/8), generator=Generator("cpu").manual_seed(seed))`, as diffusers
    draws it, so seeds mean the same pictures there and here (the VAE encode of img2img draws first, as there).
    """
    f, device, dtype = model.latent_factor, model.device, model.dtype
    shape = (r.batch, model.config.unet.in_channels, r.height // f, r.width // f)
    start, x0 = 0, None
    if r.init_image is not None:
        image = image_to_tensor(resize_rgb(r.init_image, r.width, r.height)).to(device, dtype) * 2 - 1
        # encoded once and repeated for the batch, as diffusers does (one posterior sample, not one per picture)
        x0 = model.vae.encode(image, generator).expand(r.batch, -1, -1, -1)
        start = r.steps - min(int(r.steps * r.strength), r.steps)
        if start >= r.steps:
            raise InputError("strength (denoising strength) too low: no step would run. Raise it or add steps.")
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    # img2img noises the init latent even at strength 1 (diffusers, A1111); inpainting at strength 1 starts from
    # pure noise (diffusers' inpaint pipeline), the mask blend brings the known area back.
    from_noise = x0 is None or (r.mask is not None and r.strength >= 1)
    x = s.init_noise(noise) if from_noise else s.add_noise(x0, noise, start)
    mask = None
    if r.mask is not None:
        mask = F.interpolate(mask_to_tensor(r.mask, r.width, r.height), size=shape[-2:], mode="nearest")
        mask = mask.to(device, dtype)
    return Latents(x, start, noise, x0, mask)


def control_residuals(
    r: GenerationRequest, hints: list[torch.Tensor], x_in: torch.Tensor, x_full: torch.Tensor, t: torch.Tensor,
    ctx: Conditioning, k: int, n: int,
) -> list[torch.Tensor] | None:  # fmt: skip
    """The summed residuals of the units active at loop step k of n (None when none is).

    Guess mode, a ControlNet with global average pooling (shuffle) and control mode "control" run on the conditional
    half only; guess mode and control mode "prompt" decay the residual scales (0.825 ** (12 - i)).
    """
    total = None
    for u, emb in zip(r.units, hints):
        if not active(k, n, u.start, u.end):
            continue
        cn: ControlNet = u.model
        pooled = cn.cfg.global_average_pooling
        n_res = len(cn.zero_convs) + 1  # 13 for SD1.5
        if r.guess_mode and not pooled:
            scales = guess_mode_scales(u.scale, n_res, style=r.guess_style)
        elif u.mode == "prompt":  # A1111's soft injection, on every ControlNet, both halves
            scales = guess_mode_scales(u.scale, n_res)
        else:
            scales = [u.scale] * n_res
        if r.use_cfg and (r.guess_mode or pooled or u.mode == "control"):
            res = _residuals(cn, emb, x_in, t, ctx.cond, scales)
            res = [torch.cat([torch.zeros_like(a), a]) for a in res]
        else:
            res = _residuals(cn, emb, x_full, t, ctx.full, scales)
        total = res if total is None else [a + b for a, b in zip(total, res)]
    return total


def _residuals(cn: ControlNet, emb: torch.Tensor, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, scales):
    outs = cn(x, t, ctx, emb.expand(x.shape[0], -1, -1, -1))
    return [o * s for o, s in zip(outs, scales)]


def denoise(
    model: StableDiffusion, r: GenerationRequest, s: Sampler, ctx: Conditioning, hints: list[torch.Tensor],
    lat: Latents, generator: torch.Generator, callback: StepCallback | None = None,
) -> torch.Tensor:  # fmt: skip
    """The sampling loop: ControlNet residuals, UNet, guidance, sampler step, inpaint blend."""
    x, n = lat.x, r.steps - lat.start
    ref = reference_latent(model, r)
    for k, i in enumerate(range(lat.start, r.steps)):
        t = s.timesteps[i].to(model.device)
        x_in = s.scale_input(x, i)
        x_full = torch.cat([x_in, x_in]) if r.use_cfg else x_in  # the guidance batch: [uncond, cond]
        control = control_residuals(r, hints, x_in, x_full, t, ctx, k, n)
        context = ctx.unet if ref is None else reference_pass(model, r, ref, x_full, t, ctx, k, n)
        eps = model.unet(x_full, t, context, control=control)
        if r.use_cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + r.cfg_scale * (e_c - e_u)
        x = s.step(x, eps, i, generator)
        if lat.mask is not None:  # inpainting: the known area, noised to the next step, goes back in
            known = s.add_noise(lat.x0, lat.noise, i + 1) if i + 1 < r.steps else lat.x0
            x = (1 - lat.mask) * known + lat.mask * x
        if callback is not None:
            callback(k + 1, n)
    return x


def reference_latent(model: StableDiffusion, r: GenerationRequest):
    """(the reference picture's latent, its own noise generator, the noise schedule), or None without one."""
    if r.reference is None:
        return None
    generator = torch.Generator("cpu").manual_seed(int(r.seed))  # apart from the main stream
    image = image_to_tensor(resize_rgb(r.reference.image, r.width, r.height)).to(model.device, model.dtype) * 2 - 1
    return model.vae.encode(image, generator), generator, alphas_cumprod()


def reference_pass(model, r: GenerationRequest, ref, x_full: torch.Tensor, t, ctx: Conditioning, k: int, n: int):
    """Run the noised reference through the UNet ("write"), and return the context for the real call ("read")."""
    u = r.reference
    if not active(k, n, u.start, u.end):
        return ctx.unet
    x0, generator, schedule = ref
    state = ReferenceState(u.mode, u.style_fidelity, u.weight, uncond=x_full.shape[0] // 2 if r.use_cfg else 0)
    base = ctx.unet if isinstance(ctx.unet, PromptContext) else PromptContext(ctx.unet)
    noised = noised_reference(x0, t, schedule, generator).expand_as(x_full)
    model.unet(noised, t, replace(base, reference=state))
    state.writing = False
    return replace(base, reference=state)


def decode(model: StableDiffusion, r: GenerationRequest, x: torch.Tensor) -> np.ndarray:
    """Latents -> (b, H, W, 3) uint8; inpainting puts the unmasked pixels of the init picture back exactly."""
    images = []
    for b in range(r.batch):  # one at a time: the VAE decoder is the memory peak at large sizes
        img = model.vae.decode(x[b : b + 1]).float()
        images.append(((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy())
    out = np.stack(images)
    if r.mask is not None:
        keep = mask_to_tensor(r.mask, r.width, r.height)[0, 0].numpy()[..., None]
        original = resize_rgb(r.init_image, r.width, r.height)
        out = (original * (1 - keep) + out * keep).round().astype(np.uint8)
    return out


def parameters(model: StableDiffusion, r: GenerationRequest) -> str:
    """The A1111 'parameters' text (its PNG Info tab reads it)."""
    lines = [r.prompt]
    if r.negative_prompt:
        lines.append(f"Negative prompt: {r.negative_prompt}")
    fields_ = [
        f"Steps: {r.steps}", f"Sampler: {SAMPLER_LABELS[r.sampler]}", f"CFG scale: {r.cfg_scale}", f"Seed: {r.seed}",
        f"Size: {r.width}x{r.height}", f"Model: {model.source.rstrip('/').split('/')[-1]}",
    ]  # fmt: skip
    if r.init_image is not None:
        fields_.append(f"Denoising strength: {r.strength}")
    if r.clip_skip > 1:
        fields_.append(f"Clip skip: {r.clip_skip}")
    if r.guess_mode:
        fields_.append("Guess mode: True")
    if r.reference is not None:
        u = r.reference
        fields_.append(f'Reference: "Mode: {u.mode}, Weight: {u.weight}, Style fidelity: {u.style_fidelity}, '
                       f'Guidance Start: {u.start}, Guidance End: {u.end}"')  # fmt: skip
    if r.image_prompt is not None:
        scale = r.image_prompt.scale if not isinstance(r.image_prompt.scale, dict) else "per block"
        fields_.append(
            f'IP-Adapter: "Model: {r.image_prompt.label}, Weight: {scale}, Images: {len(r.image_prompt.images)}"'
        )
    for i, u in enumerate(r.units):
        fields_.append(
            f'ControlNet {i}: "Model: {u.label}, Weight: {u.scale}, Guidance Start: {u.start}, Guidance End: {u.end}'
            + (f', Control Mode: {CONTROL_MODE_LABELS[u.mode]}"' if u.mode != "balanced" else '"')
        )
    lines.append(", ".join(fields_))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the whole
@torch.no_grad()
def generate(model: StableDiffusion, request: GenerationRequest, callback: StepCallback | None = None) -> Result:
    """Generate `request.batch` pictures for one prompt, steered by the request's ControlNet units.

    Every unit's `model` must be a loaded ControlNet that fits `model` (the ModelManager loads files); the request is
    checked first, so nothing runs for a bad one. `callback(done, total)` is called after every step.
    """
    check(model, request)
    r, timings = request, {}
    t0 = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(int(r.seed))
    ctx = encode_prompts(model, r)
    hints = embed_hints(model, r)
    timings["encode"] = time.perf_counter() - t0
    s = make_sampler(r.sampler, r.steps, r.eta)
    lat = prepare_latents(model, r, s, generator)
    t1 = time.perf_counter()
    x = denoise(model, r, s, ctx, hints, lat, generator, callback)
    timings["sampling"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    images = decode(model, r, x)
    timings["decode"] = time.perf_counter() - t2
    return Result(images, parameters(model, r), timings)


__all__ = ["ControlUnit", "GenerationRequest", "Result", "active", "check", "generate"]
