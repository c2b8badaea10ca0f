"""Model families: what differs between SD1.5, SD2.x and SDXL in one frozen record, so code asks the family instead
of testing for one. A model's family is told from its weights (`cldm.io.model_configs.family_of`), never its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from cldm.models.freeu import FreeU


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
    prediction: str  # what the family's reference UNet predicts: "epsilon" (the noise) or "v"
    alternate_size: int  # the native side of the family's models that predict the other way (SD2's 512-base)
    # Which hidden states of each text encoder the UNet reads: layer -1 (the last) or -2 (SDXL), then the final
    # layer norm or not (SDXL: not). Clip skip moves further down from there.
    text_layer: int
    text_final_norm: bool
    text_pads: tuple[str, ...]  # each tokenizer's padding token: CLIP's end token, OpenCLIP's "!" (id 0)
    zero_empty_negative: bool  # an empty negative prompt is all zeros, not the encoded "" (SDXL base's config)
    # Key prefixes of the single-file layout, by component
    unet_prefix: str
    vae_prefix: str
    text_prefix: str
    control_prefix: str
    base_repo: str  # the hub's reference base model
    controlnet_repo: str  # the original ControlNet weights (.pth), or the family's reference ControlNets
    ip_adapter_repo: str
    ip_adapters: tuple[str, ...]  # the IP-Adapter files (stems) published there for this family
    freeu: FreeU  # the FreeU factors its authors published for the family (ChenyangSi/FreeU README)


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
    alternate_size=512,
    text_layer=-1,
    text_final_norm=True,
    text_pads=("<|endoftext|>",),
    zero_empty_negative=False,
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_prefix="cond_stage_model.",
    control_prefix="control_model.",
    base_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
    controlnet_repo="lllyasviel/ControlNet-v1-1",
    ip_adapter_repo="h94/IP-Adapter",
    ip_adapters=("ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15", "ip-adapter_sd15_light"),
    freeu=FreeU(b1=1.5, b2=1.6, s1=0.9, s2=0.2),
)
# SD2.0/2.1: OpenCLIP ViT-H/14 read at its penultimate layer (diffusers' folders keep 23 of its 24 layers and read
# the last), 64-wide heads, linear projections; the 768-v models predict v, the 512-base models the noise.
SD2 = ModelFamily(
    name="SD2.x",
    text_encoders=("OpenCLIP ViT-H/14",),
    context_dim=1024,
    pooled=False,
    latent_channels=4,
    latent_scale=0.18215,
    vae_factor=8,
    native_size=768,
    prediction="v",
    alternate_size=512,
    text_layer=-1,
    text_final_norm=True,
    text_pads=("!",),
    zero_empty_negative=False,
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_prefix="cond_stage_model.",
    control_prefix="control_model.",
    base_repo="stabilityai/stable-diffusion-2-1",
    controlnet_repo="thibaud/controlnet-sd21",
    ip_adapter_repo="",
    ip_adapters=(),
    freeu=FreeU(b1=1.4, b2=1.6, s1=0.9, s2=0.2),
)
# SDXL 1.0: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both read at their penultimate layer without the final norm and
# joined to 2048; bigG's pooled, projected output and the size embeddings enter through `label_emb`.
SDXL = ModelFamily(
    name="SDXL",
    text_encoders=("CLIP ViT-L/14", "OpenCLIP ViT-bigG/14"),
    context_dim=2048,
    pooled=True,
    latent_channels=4,
    latent_scale=0.13025,
    vae_factor=8,
    native_size=1024,
    prediction="epsilon",
    alternate_size=1024,
    text_layer=-2,
    text_final_norm=False,
    text_pads=("<|endoftext|>", "!"),
    zero_empty_negative=True,
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_prefix="conditioner.embedders.",
    control_prefix="control_model.",
    base_repo="stabilityai/stable-diffusion-xl-base-1.0",
    controlnet_repo="diffusers",  # diffusers/controlnet-<kind>-sdxl-1.0 (see cldm.io.locate)
    ip_adapter_repo="h94/IP-Adapter",
    ip_adapters=("ip-adapter_sdxl", "ip-adapter_sdxl_vit-h", "ip-adapter-plus_sdxl_vit-h",
                 "ip-adapter-plus-face_sdxl_vit-h"),
    freeu=FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2),
)  # fmt: skip
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SD2, SDXL)}


def family(name: str) -> ModelFamily:
    """The family called `name` ("SD1.5", "sdxl", "sd2": any letter case, with or without the dot and ".x");
    KeyError naming the known ones."""
    wanted = name.lower().replace(".", "").removesuffix("x") if name.lower() != "sdxl" else "sdxl"
    for f in FAMILIES.values():
        own = f.name.lower().replace(".", "")
        if own == wanted or own.removesuffix("x") == wanted or (own.startswith("sd2") and wanted.startswith("sd2")):
            return f
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")


def family_name_for_context(context_dim: int) -> str:
    """The name of the family whose text states are `context_dim` wide ("an unknown family" when none is)."""
    for f in FAMILIES.values():
        if f.context_dim == context_dim:
            return f.name
    return "an unknown family"
