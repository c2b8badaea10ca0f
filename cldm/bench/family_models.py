"""The bench's SD2.x and SDXL models: full-size (or tiny) configs, random weights made in the target dtype, diffusers'
modules given the very same tensors, the step and decode closures on identical inputs, and their differences."""

from __future__ import annotations

import torch

from cldm.bench.measure import bench_config, random_controlnet, step_flops
from cldm.io import writers
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion, random_sd
from cldm.models.unet import UNet

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
