"""The conditioning a generation reads: the prompts through the family's text encoders (SDXL: both, joined, and an
empty negative prompt as zeros) and, for SDXL, the vector conditioning (pooled text + size embeddings)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cldm.adapters.ip_adapter import prompt_tokens
from cldm.errors import InputError
from cldm.models.sd import StableDiffusion
from cldm.models.unet import timestep_embedding
from cldm.pipeline.prompts import encode_joined
from cldm.pipeline.request import GenerationRequest


@dataclass
class Conditioning:
    """The text context: the negative and positive halves (batch-sized), both together, the image-prompt tokens;
    for SDXL also the vector conditioning (pooled text + size embeddings), of the full batch and the positive half."""

    uncond: torch.Tensor
    cond: torch.Tensor
    full: torch.Tensor  # [uncond, cond] with guidance, cond alone without (what the UNet and ControlNets read)
    image_tokens: tuple[torch.Tensor, ...] = ()  # each image prompt's IP-Adapter tokens for the UNet's batch
    pooled: torch.Tensor | None = None  # (2, width): the negative and positive prompts' pooled text (SDXL)
    y: torch.Tensor | None = None  # the vector conditioning for `full`'s rows
    y_cond: torch.Tensor | None = None  # ... for `cond`'s rows


def encode_prompts(model: StableDiffusion, r: GenerationRequest) -> Conditioning:
    """The text context through the family's encoders, and with image prompts their IP-Adapters' tokens beside it
    (for the UNet only). SDXL: an empty negative prompt is zeros, context and pooled text (its config's
    force_zeros_for_empty_prompt), and the size embeddings are added by `sized`."""
    fam = model.family
    ctx, pooled = encode_joined(
        model.texts, [r.negative_prompt, r.prompt], r.clip_skip, r.emphasis, fam.text_layer, fam.text_final_norm
    )  # (2, 77*k, w), (2, p) or None
    ctx = ctx.to(model.dtype)
    if fam.zero_empty_negative and r.negative_prompt == "":
        ctx[0] = 0
        if pooled is not None:
            pooled[0] = 0
    uncond, cond = (c.expand(r.batch, -1, -1) for c in ctx.chunk(2))
    full = torch.cat([uncond, cond]) if r.use_cfg else cond
    image = tuple(prompt_tokens(p, r.batch, r.use_cfg).to(full.dtype) for p in r.all_image_prompts)
    out = Conditioning(uncond, cond, full, image, pooled)
    return sized(model, out, r)


def size_embedding(width: int, height: int, batch: int, dim: int = 256) -> torch.Tensor:
    """SDXL's size conditioning for a picture of width x height: original size, crop top-left (0, 0) and target
    size, (h, w, top, left, h, w), each number a `dim`-wide [cos | sin] sinusoid -> (batch, 6 * dim)."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return timestep_embedding(ids, dim).reshape(1, -1).expand(batch, -1)


def sized(model: StableDiffusion, ctx: Conditioning, r: GenerationRequest) -> Conditioning:
    """The conditioning with the vector conditioning of the request's picture size (SDXL; unchanged otherwise)."""
    if not model.config.unet.adm_in_channels:
        return ctx
    if ctx.pooled is None:
        raise InputError("this model takes a pooled text embedding, but its text encoders give none")
    sizes = size_embedding(r.width, r.height, 2, model.config.unet.size_embed_dim).to(ctx.pooled.device)
    y = torch.cat([ctx.pooled.float(), sizes], dim=-1).to(model.dtype)  # diffusers' order: text, then sizes
    y_u, y_c = (v.expand(r.batch, -1) for v in y.chunk(2))
    return replace(ctx, y=torch.cat([y_u, y_c]) if r.use_cfg else y_c, y_cond=y_c)
