"""generate(model, request): prompt + hints -> pictures, in named stages. No file or device policy of its own.

check -> fit pictures -> encode prompts -> embed hints -> prepare latents -> denoise (ControlNet residuals, UNet,
guidance, sampler step, inpaint blend, preview) -> [hires pass] -> decode -> parameters
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from cldm.adapters import lora
from cldm.adapters.ip_adapter import image_prompt_problem
from cldm.errors import InputError
from cldm.io.images import image_to_tensor, mask_to_tensor, resize_rgb, soft_mask
from cldm.models.controlnet import ControlNet, fit_problem, guess_mode_scales, soft_injection_scales
from cldm.models.sd import StableDiffusion
from cldm.pipeline.conditioning import Conditioning, encode_prompts, sized
from cldm.pipeline.fit import fit_mask, fit_rgb, fit_tensor
from cldm.pipeline.guidance import guided, pag_problems, perturbed_attention, with_perturbed_rows
from cldm.pipeline.infotext import parameters
from cldm.pipeline.picture_prompts import attached, reference_latent, reference_pass
from cldm.pipeline.regions import apply_region_mask, with_region_masks
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.t2i import encoder_additions, hint_features, is_adapter, unit_problems
from cldm.pipeline.t2i_style import is_style, style_tokens, with_style
from cldm.pipeline.union import merged, union_problems
from cldm.pipeline.vae_choice import preview_decoder, vae_problems
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, Upscaler
from cldm.sampling.preview import predicted_x0, preview_rgb
from cldm.sampling.sampler import Sampler, noise_like
from cldm.sampling.samplers import make_sampler, sampler_class

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
PreviewCallback = Callable[[np.ndarray], None]  # (b, h, w, 3) uint8: latent-sized (Approx cheap) or full (TAESD)
Generators = torch.Generator | list[torch.Generator]  # one for the batch (diffusers), or one per picture (A1111)


@dataclass
class Result:
    """Pictures (b, H, W, 3) uint8, the A1111-style parameters text and timings in seconds."""

    images: np.ndarray
    parameters: str
    timings: dict[str, float] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)  # the seed that makes each picture alone (A1111's seed + i)
    base: str = ""  # the base model that made them (where it came from)
    picture_parameters: list[str] = field(default_factory=list)  # each picture's own text (its own seed)

    def text(self, i: int) -> str:
        """Picture i's parameters text (with its own seed when the batch has one seed per picture)."""
        return self.picture_parameters[i] if i < len(self.picture_parameters) else self.parameters


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
        if is_adapter(u.model):
            problems += unit_problems(model, request, i, u)
        elif not isinstance(u.model, ControlNet):
            problems.append(f"ControlNet {i + 1} ({u.label}) is not loaded (the model manager loads files)")
        elif (why := fit_problem(u.model, model.config.unet, model.latent_factor)) is not None:
            problems.append(f"ControlNet {i + 1} ({u.label}) does not fit this base model: {why}. "
                            f"Use a ControlNet made for {model.family.name} models.")  # fmt: skip
    problems += union_problems(request.units, lambda i, u: f"ControlNet {i + 1} ({u.label})")
    problems += pag_problems(model.unet, request)
    problems += vae_problems(request)
    for i, u in enumerate(request.loras):
        if not isinstance(u.model, lora.Lora):
            problems.append(f"LoRA {i + 1} ({u.label}) is not loaded (the model manager loads files)")
    several = len(request.all_image_prompts) > 1
    for i, p in enumerate(request.all_image_prompts):
        if (why := image_prompt_problem(p, model.unet)) is not None:
            problems.append(f"image prompt {i + 1}: {why}" if several else why)
    if problems:
        raise InputError("; ".join(problems))


def fit_pictures(r: GenerationRequest) -> GenerationRequest:
    """The init picture and the mask at the picture size, by the request's resize mode (hints are fitted in
    `embed_hints`, each by its unit's mode). "Resize and Fill" marks the new border for painting: outpainting."""
    if r.init_image is None:
        return r
    init = fit_rgb(r.init_image, r.width, r.height, r.resize_mode, fill="edge")
    mask = None if r.mask is None else fit_mask(r.mask, r.width, r.height, r.resize_mode)
    return replace(r, init_image=init, mask=mask)


def _hint_tensor(u: ControlUnit, width: int, height: int, device, dtype) -> torch.Tensor:
    if isinstance(u.hint, torch.Tensor):  # an inpaint hint: "fill" marks the new border -1 (to be painted)
        t = fit_tensor(u.hint.float(), width, height, u.resize_mode)
    else:
        t = image_to_tensor(fit_rgb(u.hint, width, height, u.resize_mode))  # (1, 3, H, W) in [0, 1]
    return t.to(device, dtype)


def embed_hints(model: StableDiffusion, r: GenerationRequest) -> list[torch.Tensor]:
    """Each unit's hint at the picture size through its hint block (a T2I-Adapter: the whole adapter; a style
    adapter: its tokens of the picture): once per generation, not per step."""
    return [_embed_hint(model, r, u) for u in r.units]


def _embed_hint(model: StableDiffusion, r: GenerationRequest, u: ControlUnit) -> torch.Tensor:
    if is_style(u.model):  # the picture as it is: CLIP takes its own 224 px crop
        return style_tokens(u.model, u.hint)
    h = _hint_tensor(u, r.width, r.height, model.device, model.dtype)
    return hint_features(u.model, h) if is_adapter(u.model) else u.model.embed_hint(h)


def generators(r: GenerationRequest) -> Generators:
    """The noise source: one generator seeded with `seed` for the whole batch (diffusers' pictures), or with
    `seed_per_picture` one per picture seeded `seed + i`, so that each picture is the one its seed makes alone."""
    if r.seed_per_picture and r.batch > 1:
        return [torch.Generator("cpu").manual_seed(int(r.seed) + i) for i in range(r.batch)]
    return torch.Generator("cpu").manual_seed(int(r.seed))


def seeds(r: GenerationRequest) -> list[int]:
    return [int(r.seed) + i if r.seed_per_picture else int(r.seed) for i in range(r.batch)]


def _encode(model: StableDiffusion, image: torch.Tensor, generator: Generators, batch: int) -> torch.Tensor:
    if isinstance(generator, list):  # each picture's generator draws its own posterior sample first
        return torch.cat([model.vae.encode(image, g) for g in generator])
    # encoded once and repeated for the batch, as diffusers does (one posterior sample, not one per picture)
    return model.vae.encode(image, generator).expand(batch, -1, -1, -1)


def latent_mask(r: GenerationRequest, size: tuple[int, int]) -> torch.Tensor:
    """The mask at the latent size: nearest from the sharp mask, or the mean over each 8x8 cell of the blurred mask
    (soft edges, as the ControlNet 1.1 inpaint app makes them)."""
    if r.mask_blur > 0:
        soft = torch.from_numpy(soft_mask(r.mask, r.mask_blur))[None, None]
        return F.interpolate(soft, size=size, mode="area")
    return F.interpolate(mask_to_tensor(r.mask, r.width, r.height), size=size, mode="nearest")


def prepare_latents(model: StableDiffusion, r: GenerationRequest, s: Sampler, generator: Generators) -> Latents:
    """Pure noise, or the init picture's latent noised to the first step that runs (img2img, inpaint).

    The noise is `torch.randn((batch, 4, H/8, W/8), generator=Generator("cpu").manual_seed(seed))`, as diffusers
    draws it, so seeds mean the same pictures there and here (the VAE encode of img2img draws first, as there).
    """
    f, device, dtype = model.latent_factor, model.device, model.dtype
    shape = (r.batch, model.config.unet.in_channels, r.height // f, r.width // f)
    start, x0 = 0, None
    if r.init_image is not None:
        image = image_to_tensor(resize_rgb(r.init_image, r.width, r.height)).to(device, dtype) * 2 - 1
        x0 = _encode(model, image, generator, r.batch)
        start = r.steps - min(int(r.steps * r.strength), r.steps)
        if start >= r.steps:
            raise InputError("strength (denoising strength) too low: no step would run. Raise it or add steps.")
    noise = noise_like(shape, generator, torch.empty((), dtype=torch.float32)).to(device, dtype)
    # img2img noises the init latent even at strength 1 (diffusers, A1111); inpainting at strength 1 starts from
    # pure noise (diffusers' inpaint pipeline), the mask blend brings the known area back.
    masked = r.mask is not None and r.inpaint_mode is InpaintMode.ONLY  # GLOBAL: the mask shapes the hint only
    from_noise = x0 is None or (masked and r.strength >= 1)
    x = s.init_noise(noise) if from_noise else s.add_noise(x0, noise, s.index(start))
    mask = latent_mask(r, shape[-2:]).to(device, dtype) if masked else None
    return Latents(x, start, noise, x0, mask)


def control_residuals(
    r: GenerationRequest, hints: list[torch.Tensor], x_in: torch.Tensor, x_full: torch.Tensor, t: torch.Tensor,
    ctx: Conditioning, k: int, n: int,
) -> list[torch.Tensor] | None:  # fmt: skip
    """The summed residuals of the units active at loop step k of n (None when none is).

    The A1111 extension's rules (scripts/controlnet.py, hook.py): every mode but "balanced" is a soft injection, the
    residual scales decaying as scale * 0.825 ** (12 - i) (i = 0 the shallowest, 12 the middle block); "control" is
    also a CFG injection: the residuals reach the conditional half only, so the guidance scale multiplies their
    effect. Global average pooling (shuffle) always acts on the conditional half only. Guess mode is the original
    ControlNet's name for "control", with diffusers' log-spaced scales when `guess_style` is "diffusers".
    """
    total = None
    for u, emb in merged(r.units, hints, lambda u: active(k, n, u.start, u.end)):  # a Union's units: one entry
        if is_adapter(u.model):  # T2I-Adapters add to the UNet's encoder: `encoder_additions`
            continue
        if not active(k, n, u.start, u.end) or u.scale == 0:  # a unit that adds nothing is not run
            continue
        cn: ControlNet = u.model
        pooled = cn.cfg.global_average_pooling
        n_res = len(cn.zero_convs) + 1  # 13 for SD1.5
        sdxl = bool(cn.cfg.adm_in_channels)
        if r.guess_mode and not pooled:
            scales = (guess_mode_scales(u.scale, n_res, style=r.guess_style) if r.guess_style == "diffusers"
                      else soft_injection_scales(u.scale, n_res, sdxl))  # fmt: skip
        elif u.mode in (ControlMode.PROMPT, ControlMode.CONTROL):  # A1111's soft injection, on every ControlNet
            scales = soft_injection_scales(u.scale, n_res, sdxl)
        else:
            scales = [u.scale] * n_res
        if r.use_cfg and (r.guess_mode or pooled or u.mode is ControlMode.CONTROL):
            res = _residuals(cn, emb, x_in, t, ctx.cond, scales, ctx.y_cond)
            res = [torch.cat([torch.zeros_like(a), a]) for a in res]
        else:
            res = _residuals(cn, emb, x_full, t, ctx.full, scales, ctx.y)
        res = apply_region_mask(res, u.mask)
        total = res if total is None else [a + b for a, b in zip(total, res)]
    return total


def _residuals(cn: ControlNet, emb: torch.Tensor, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, scales, y):
    outs = cn(x, t, ctx, emb, y)  # a hint embedding of batch 1 broadcasts over the batch
    return [o * s for o, s in zip(outs, scales)]


def denoise(
    model: StableDiffusion, r: GenerationRequest, s: Sampler, ctx: Conditioning, hints: list[torch.Tensor],
    lat: Latents, generator: Generators, callback: StepCallback | None = None, preview: PreviewCallback | None = None,
    preview_every: int = 0,
) -> torch.Tensor:  # fmt: skip
    """The sampling loop: ControlNet residuals, UNet, guidance, sampler step, inpaint blend; every `preview_every`
    steps a cheap picture of the predicted result goes to `preview`."""
    first, end = s.index(lat.start), len(s.timesteps)  # loop entries: one per model call
    x, n = lat.x, end - first
    ref = reference_latent(model, r)
    tokens = with_perturbed_rows(r, ctx.image_tokens)  # PAG: the perturbed rows read the conditional rows' inputs
    with attached(model, r, tokens) as hooks, perturbed_attention(model.unet, r):
        for k, i in enumerate(range(first, end)):
            t = s.timesteps[i].to(model.device)
            x_in = s.scale_input(x, i)
            x_full = torch.cat([x_in, x_in]) if r.use_cfg else x_in  # the guidance batch: [uncond, cond]
            on = [is_adapter(u.model) and active(k, n, u.start, u.end) for u in r.units]
            step = with_style(ctx, r, hints, on)  # the context with the acting style adapters' tokens
            control = control_residuals(r, hints, x_in, x_full, t, step, k, n)
            if ref is not None:
                ref_on = active(k, n, r.reference.start, r.reference.end)
                reference_pass(model, ref, hooks, x_full, t, step.full, ref_on, ctx.y)
            x_g, context, control, y = with_perturbed_rows(r, (x_full, step.full, control, ctx.y))
            adapter = encoder_additions(model, r, hints, on, x_g.shape[0])
            out = guided(r, model.unet(x_g, t, context, control=control, y=y, adapter=adapter, freeu=r.freeu), t)
            eps = s.noise_estimate(out, x_in, i, model.config.prediction)
            if preview is not None and preview_every and (k + 1) % preview_every == 0 and k + 1 < n:
                preview(preview_rgb(predicted_x0(x_in, eps, t), preview_decoder(r)))
            x = s.step(x, eps, i, generator)
            if lat.mask is not None:  # inpainting: the known area, noised to the next step, goes back in
                known = s.add_noise(lat.x0, lat.noise, i + 1) if i + 1 < end else lat.x0
                x = (1 - lat.mask) * known + lat.mask * x
            if callback is not None:
                callback(k + 1, n)
    return x


def decode(model: StableDiffusion, r: GenerationRequest, x: torch.Tensor) -> np.ndarray:
    """Latents -> (b, H, W, 3) uint8; inpainting puts the unmasked pixels of the init picture back exactly."""
    images = []
    for b in range(r.batch):  # one at a time: the VAE decoder is the memory peak at large sizes
        img = model.vae.decode(x[b : b + 1]).float()
        images.append(((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy())
    out = np.stack(images)
    if r.mask is not None and r.inpaint_mode is InpaintMode.ONLY:
        if r.mask_blur > 0:
            keep = soft_mask(r.mask, r.mask_blur)[..., None]
        else:
            keep = mask_to_tensor(r.mask, r.width, r.height)[0, 0].numpy()[..., None]
        original = resize_rgb(r.init_image, r.width, r.height)
        out = (original * (1 - keep) + out * keep).round().astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------------ hires fix
def hires_pass(
    model: StableDiffusion, r: GenerationRequest, ctx: Conditioning, x: torch.Tensor, generator: Generators,
    callback: StepCallback | None, preview: PreviewCallback | None, preview_every: int,
) -> tuple[GenerationRequest, torch.Tensor]:  # fmt: skip
    """A1111's hires fix: the first pass's latents upscaled (bilinear on the latents, or decode -> Lanczos ->
    encode), noised to the strength's step of a new schedule and denoised again, the hints fitted to the new size.
    Returns the second pass's request (its size) and latents."""
    h = r.hires
    width, height = h.size(r.width, r.height, model.latent_factor)
    steps, schedule = h.schedule(r.steps)
    r2 = replace(r, width=width, height=height, steps=schedule, init_image=None, mask=None, strength=h.strength)
    ctx = sized(model, ctx, r2)  # SDXL: the size embeddings of the new size
    f = model.latent_factor
    if h.upscaler is Upscaler.LATENT:
        x0 = F.interpolate(x.float(), size=(height // f, width // f), mode="bilinear", align_corners=False)
    else:
        pictures = [resize_rgb(p, width, height) for p in decode(model, r, x)]
        image = torch.cat([image_to_tensor(p) for p in pictures]).to(model.device, model.dtype) * 2 - 1
        gens = generator if isinstance(generator, list) else [generator] * r.batch
        x0 = torch.cat([model.vae.encode(image[b : b + 1], g) for b, g in enumerate(gens)])
    x0 = x0.to(model.device, model.dtype)
    s = make_sampler(r.sampler, schedule, r.eta)
    start = schedule - steps
    noise = noise_like(x0.shape, generator, torch.empty((), dtype=torch.float32)).to(model.device, model.dtype)
    lat = Latents(s.add_noise(x0, noise, s.index(start)), start, noise, x0)
    x2 = denoise(model, r2, s, ctx, embed_hints(model, r2), lat, generator, callback, preview, preview_every)
    return r2, x2


# ---------------------------------------------------------------------------------------------- the whole
def total_steps(r: GenerationRequest) -> int:
    """The model calls that actually run, both passes (img2img and the hires pass skip the first steps; a
    second-order sampler calls the model twice per step)."""
    calls = sampler_class(r.sampler).model_calls
    n = calls(r.steps, r.steps - min(int(r.steps * r.strength), r.steps) if r.init_image is not None else 0)
    if r.hires is not None:
        steps, schedule = r.hires.schedule(r.steps)
        n += calls(schedule, schedule - steps)
    return n


@torch.no_grad()
def generate(
    model: StableDiffusion, request: GenerationRequest, callback: StepCallback | None = None,
    preview: PreviewCallback | None = None, preview_every: int = 0,
) -> Result:  # fmt: skip
    """Generate `request.batch` pictures for one prompt, steered by the request's ControlNet units.

    Every unit's `model` must be a loaded ControlNet that fits `model` (the ModelManager loads files); the request is
    checked first, so nothing runs for a bad one. `callback(done, total)` is called after every step (of both passes
    with a hires fix); `preview(pictures)` every `preview_every` steps with A1111's "Approx cheap" preview
    (full-size pictures from a TAESD instead: `request.preview_vae`, or `request.vae` when it is one).
    """
    request = request.sized(model.native_size)  # a width / height left at None: the base's native size
    check(model, request)
    if request.vae is not None:  # this request's VAE in place of the checkpoint's (the model itself is not changed)
        model = replace(model, vae=request.vae)
    originals = lora.apply(model, [(u.model, u.weight, u.text_weight) for u in request.loras])  # all or nothing
    try:
        request = with_region_masks(fit_pictures(request), model.device)
        return _generate(model, request, callback, preview, preview_every)
    finally:
        lora.restore(model, originals)  # the base is the base again, bit for bit


def _generate(model, r: GenerationRequest, callback, preview, preview_every: int) -> Result:
    timings = {}
    t0 = time.perf_counter()
    generator = generators(r)
    ctx = encode_prompts(model, r)
    hints = embed_hints(model, r)
    timings["encode"] = time.perf_counter() - t0
    s = make_sampler(r.sampler, r.steps, r.eta)
    lat = prepare_latents(model, r, s, generator)
    t1 = time.perf_counter()
    total, done = total_steps(r), s.model_calls(r.steps, lat.start)
    step = callback if r.hires is None or callback is None else (lambda k, n: callback(k, total))
    x = denoise(model, r, s, ctx, hints, lat, generator, step, preview, preview_every)
    out = r
    if r.hires is not None:
        second = None if callback is None else (lambda k, n: callback(done + k, total))
        out, x = hires_pass(model, r, ctx, x, generator, second, preview, preview_every)
    timings["sampling"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    images = decode(model, out, x)
    timings["decode"] = time.perf_counter() - t2
    texts = [parameters(model, replace(r, seed=seed)) for seed in seeds(r)]
    return Result(images, texts[0], timings, seeds(r), picture_parameters=texts, base=model.source)


__all__ = ["ControlUnit", "GenerationRequest", "Result", "active", "check", "generate"]
