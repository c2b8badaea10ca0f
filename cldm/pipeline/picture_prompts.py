"""Pictures that steer the UNet from inside: the IP-Adapter's image prompt and the reference-only picture. Their
processors and hooks are attached to the UNet for one pass of the sampling loop and detached after; at each step
where the reference acts, its noised latent runs through the UNet first ("write"), then the real call reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from cldm.adapters import ip_adapter, ip_masks, ip_scales, reference
from cldm.io.images import image_to_tensor, resize_rgb
from cldm.models.sd import StableDiffusion
from cldm.pipeline.request import GenerationRequest
from cldm.sampling.schedules import alphas_cumprod


@contextlib.contextmanager
def attached(
    model: StableDiffusion, r: GenerationRequest, image_tokens: Sequence[torch.Tensor]
) -> Iterator[reference.Reference | None]:
    """The request's IP-Adapters (each with its `image_tokens`, scales and region mask at the picture size) and
    reference unit on the UNet; yields the reference's hooks (None without a reference)."""
    with contextlib.ExitStack() as stack:
        layout = ip_scales.scale_layout(model.unet.cfg)
        attachments = [
            ip_adapter.Attachment(p.adapter, tokens, ip_scales.layer_scales(p.scale, layout),
                                  None if p.mask is None else ip_masks.fitted_mask(p.mask, r.width, r.height))
            for p, tokens in zip(r.all_image_prompts, image_tokens, strict=True)
        ]  # fmt: skip
        if attachments:
            stack.enter_context(ip_adapter.attached_all(model.unet, attachments))
        u, uncond = r.reference, r.batch if r.use_cfg else 0  # rows of the unconditional half
        if u is None:
            yield None
        else:
            yield stack.enter_context(reference.attached(model.unet, u.mode, u.style_fidelity, u.weight, uncond))


def reference_latent(model: StableDiffusion, r: GenerationRequest):
    """(the reference picture's latent, its own noise generator, the noise schedule), or None without one."""
    if r.reference is None:
        return None
    image = image_to_tensor(resize_rgb(r.reference.image, r.width, r.height)).to(model.device, model.dtype) * 2 - 1
    if r.seed_per_picture and r.batch > 1:  # each picture's reference noise from its own seed, as it would be alone
        gens = [torch.Generator("cpu").manual_seed(int(r.seed) + i) for i in range(r.batch)]
        return [model.vae.encode(image, g) for g in gens], gens, alphas_cumprod()
    generator = torch.Generator("cpu").manual_seed(int(r.seed))  # apart from the main stream
    return model.vae.encode(image, generator), generator, alphas_cumprod()


def reference_pass(
    model: StableDiffusion, ref, hooks: reference.Reference, x_full: torch.Tensor, t: torch.Tensor,
    context: torch.Tensor, on: bool, y: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """With the reference acting at this step (`on`), run its noised latent through the UNet ("write") and set the
    hooks for the real call ("read"); else turn them off."""
    if not on:
        hooks.off()
        return
    x0, generator, schedule = ref
    if isinstance(generator, list):  # one seed per picture: (b, ...) noised references, the same on both halves
        noised = torch.cat([reference.noised_reference(x, t, schedule, g) for x, g in zip(x0, generator)])
        noised = torch.cat([noised] * (x_full.shape[0] // noised.shape[0]))
    else:
        noised = reference.noised_reference(x0, t, schedule, generator).expand_as(x_full)
    hooks.write()
    model.unet(noised, t, context, y=y)
    hooks.read()
