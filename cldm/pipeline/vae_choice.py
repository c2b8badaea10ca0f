"""Which autoencoder a request uses: the checkpoint's VAE, another VAE, or a TAESD (the tiny autoencoder, a fast
stand-in with the same decode / encode contract), for its pictures and for its live previews."""

from __future__ import annotations

from torch import nn

from cldm.models.taesd import TinyAutoencoder
from cldm.models.vae import AutoencoderKL
from cldm.pipeline.request import GenerationRequest
from cldm.pipeline.vocabulary import Upscaler

LOADED_VAES = (AutoencoderKL, TinyAutoencoder)


def encodes_pictures(r: GenerationRequest) -> bool:
    """Whether the request runs a picture through the VAE's encoder: img2img and inpainting (the init picture),
    reference-only (the reference picture), a hires fix with a picture upscaler (the first pass's pictures)."""
    hires_pixels = r.hires is not None and r.hires.upscaler is not Upscaler.LATENT
    return r.init_image is not None or r.reference is not None or hires_pixels


def vae_problems(r: GenerationRequest) -> list[str]:
    """What is wrong with the request's VAE and preview decoder, before any work."""
    problems = []
    for name, vae in (("the VAE", r.vae), ("the preview VAE", r.preview_vae)):
        if vae is not None and not isinstance(vae, LOADED_VAES):
            problems.append(f"{name} is not loaded (the model manager loads files)")
    if isinstance(r.vae, TinyAutoencoder) and r.vae.encoder is None and encodes_pictures(r):
        named = f" {r.vae.source}" if r.vae.source else ""
        problems.append(
            f"the TAESD{named} has only its decoder, and this request encodes a picture (img2img, "
            "inpainting, reference-only or a hires fix with a picture upscaler): put its encoder file beside it "
            "(taesd_encoder.pth beside taesd_decoder.pth) or use a full VAE"
        )
    return problems


def preview_decoder(r: GenerationRequest) -> nn.Module | None:
    """What draws the live previews: the request's preview VAE, else its VAE when that is a TAESD (as cheap as the
    approximation, and full size), else nothing (A1111's "Approx cheap" at the latent size)."""
    if r.preview_vae is not None:
        return r.preview_vae
    return r.vae if isinstance(r.vae, TinyAutoencoder) else None
