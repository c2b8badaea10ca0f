"""Model families: what differs between SD1.5, SD2.x, SDXL... in one frozen record, so code asks the family instead
of testing for one. SD1.5 is the only family this app runs; the others are known by their text-context width, to
name them when a file of theirs is refused.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """One family of Stable Diffusion models and the weights made for it."""

    name: str
    text_encoders: tuple[str, ...]  # in the order their states are joined
    context_dim: int  # width of the text states the UNet attends to
    pooled: bool  # whether the UNet also takes a pooled text embedding (SDXL)
    latent_channels: int
    # Latents are multiplied by this before diffusion (it brings their std near 1); the VAE decodes latent / scale.
    latent_scale: float
    vae_factor: int  # picture pixels per latent pixel, per side
    native_size: int  # the side, in px, of the pictures the family was trained on
    prediction: str  # what the UNet predicts: "epsilon" (the noise) or "v"
    # Key prefixes of the single-file layout, by component
    unet_prefix: str
    vae_prefix: str
    text_prefix: str
    control_prefix: str
    base_repo: str  # the hub's reference base model
    controlnet_repo: str  # the original ControlNet weights (.pth)
    ip_adapter_repo: str
    ip_adapters: tuple[str, ...]  # the IP-Adapter files (stems) published there for this family


SD15 = ModelFamily(
    name="SD1.5",
    text_encoders=("CLIP ViT-L/14",),
    context_dim=768,
    pooled=False,
    latent_channels=4,
    latent_scale=0.18215,
    vae_factor=8,
    native_size=512,
    prediction="epsilon",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_prefix="cond_stage_model.",
    control_prefix="control_model.",
    base_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
    controlnet_repo="lllyasviel/ControlNet-v1-1",
    ip_adapter_repo="h94/IP-Adapter",
    ip_adapters=("ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15", "ip-adapter_sd15_light"),
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15,)}
# Families this app does not run, by the text-context width their UNets and ControlNets read (for messages).
OTHER_FAMILIES_BY_CONTEXT = {1024: "SD2.x", 2048: "SDXL"}


def family(name: str) -> ModelFamily:
    """The family called `name` ("SD1.5", any letter case, with or without the dot); KeyError naming the known ones."""
    wanted = name.lower().replace(".", "")
    for f in FAMILIES.values():
        if f.name.lower().replace(".", "") == wanted:
            return f
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")


def family_name_for_context(context_dim: int) -> str:
    """The name of the family whose text states are `context_dim` wide ("an unknown family" when none is)."""
    for f in FAMILIES.values():
        if f.context_dim == context_dim:
            return f.name
    return OTHER_FAMILIES_BY_CONTEXT.get(context_dim, "an unknown family")
