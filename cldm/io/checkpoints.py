"""Loading models from weight files (read by `files.py`, told apart by `identify.py`):

  * SD1.5 single files (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), ControlNet 1.0 full
    files (the same + `control_model.*`), ControlNet 1.1 files (`control_model.*`), bare extracts (no prefix);
  * diffusers folders: a pipeline (model_index.json + unet/ vae/ text_encoder/ tokenizer/) or one model
    (config.json + diffusion_pytorch_model.*), renamed through the tables in `keymaps.py`.
Loading is strict: every key must be used (deliberate skips are listed below) and every weight must be finite.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from cldm.errors import CheckpointError, MissingWeightsError
from cldm.io import keymaps, taesd
from cldm.io import model_configs as mc
from cldm.io.assemble import POSITION_IDS, build, build_text, our_keys, text_from_diffusers
from cldm.io.control_lora import build_control_lora
from cldm.io.controlnet_union import renamed_by_module, union_from_folder, union_from_state
from cldm.io.files import read_file, read_folder, read_metadata, read_shapes
from cldm.io.identify import (
    CONTROL_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    V_PRED_KEY,
    VAE_PREFIX,
    WeightKind,
    describe,
    prediction_name,
    probe_v_prediction,
    single_file_family,
    texts_of_file,
    weight_kind,
)
from cldm.io.tokenizer import check_tokenizer, clip_tokenizer
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig, family_of_config
from cldm.models.controlnet import ControlNet
from cldm.models.family import SD2, family
from cldm.models.sd import StableDiffusion
from cldm.models.taesd import TinyAutoencoder
from cldm.models.unet import UNet
from cldm.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

# Keys of original files that we do not use, on purpose: the training schedule buffers (samplers.py recomputes
# them), EMA copies, the VAE training loss and CLIP's position ids (a constant we rebuild).
SKIP_PREFIXES = ("model_ema.", "first_stage_model.loss.", "lora_")
SKIP_NAMES = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}  # fmt: skip


StateDict = dict[str, torch.Tensor]


def _strip(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# -------------------------------------------------------------------------------------------------- loaders
def _tokenizer_for(text_cfg: TextConfig, folder: Path | None, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    if folder is not None and folder.is_dir():
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        check_tokenizer(tok, text_cfg.vocab_size)
        return tok
    if text_cfg.vocab_size == TextConfig.vocab_size:
        return clip_tokenizer(pad_token=pad_token)
    raise MissingWeightsError(
        f"This model's text encoder has a {text_cfg.vocab_size}-token vocabulary but no tokenizer came with it. "
        "Use the model's diffusers folder (with tokenizer/) instead."
    )


_peeked: dict[tuple[str, int], tuple[str, str]] = {}


def peek_family(path: str | os.PathLike) -> tuple[str, str]:
    """(family, prediction) of a base model without loading it: a diffusers folder's configs, a safetensors file's
    header (key names and shapes) and metadata; other formats are read whole. Remembered by path and mtime."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0)
    if key in _peeked:
        return _peeked[key]
    if path.is_dir():
        fam = family_of_config(mc.config_file(mc.unet_config_from_diffusers, path / "unet" / "config.json"))
        sched = path / "scheduler" / "scheduler_config.json"
        pred = prediction_name(mc.read_json(sched).get("prediction_type", "epsilon")) if sched.is_file() else "epsilon"
    else:
        shapes = read_shapes(path)
        fam = single_file_family(shapes)
        said = _prediction_of_file(path, shapes, read_metadata(path), fam)
        pred = said or family(fam).prediction if fam != SD2.name else said or "?"  # an SD2 file that does not say
    _peeked[key] = (fam, pred)
    return fam, pred


def native_size(path: str | os.PathLike) -> int:
    """The picture side a base was trained at, from its family and what it predicts (SD1.5 and SD2-base 512, SD2
    768-v 768, SDXL 1024), without loading it."""
    name, prediction = peek_family(path)
    fam = family(name)
    return fam.alternate_size if prediction not in (fam.prediction, "?") else fam.native_size


def _prediction_of_file(path: Path, state: StateDict, meta: dict, fam: str) -> str | None:
    """What the file's UNet predicts when the file says so: our metadata, a `v_pred` marker key, or A1111's config
    beside the file (`<name>.yaml` with `parameterization: "v"`). None: the file does not say."""
    model = mc.metadata_section(meta, "model")
    if model and model.get("prediction"):
        return model["prediction"]
    if V_PRED_KEY in state:
        return "v"
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        text = yaml.read_text(encoding="utf-8", errors="replace")
        return "v" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) else "epsilon"
    return None


def load_sd(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, tokenizer=None, config: SDConfig | None = None,
    prediction: str | None = None,
) -> StableDiffusion:  # fmt: skip
    """Load a base model (SD1.5, SD2.x or SDXL, told from its keys): a single file (.safetensors/.ckpt) or a
    diffusers pipeline folder.

    A single file's config comes from `config`, else from our safetensors metadata, else from its shapes with the
    family's head rule (shapes cannot tell heads apart). What an SD2 UNet predicts comes from `prediction`, else the
    file (metadata, marker key, A1111's .yaml beside it, a diffusers scheduler config), else a probe of the UNet.
    Raises CheckpointError for unusable files and MissingWeightsError for missing ones.
    """
    path = Path(path)
    if path.is_dir():
        return _load_sd_diffusers(path, dtype, tokenizer, prediction)
    state = read_file(path)
    meta = read_metadata(path)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path} holds no SD UNet (`{UNET_PREFIX}*`): it is {describe(state)}, not a base model.")
    fam = config.family if config is not None else single_file_family(state)
    said = prediction or _prediction_of_file(path, state, meta, fam)
    known = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, "conditioner.", CONTROL_PREFIX, *SKIP_PREFIXES)
    ignored = [k for k in state if not k.startswith(known) and k not in SKIP_NAMES and k != V_PRED_KEY]
    if ignored:
        log.warning("%s: ignoring %d keys outside the model, e.g. %s", path, len(ignored), ignored[:3])
    unet_sd, vae_sd = _strip(state, UNET_PREFIX), _strip(state, VAE_PREFIX)
    texts = texts_of_file(state, fam)
    del state  # the parts hold the tensors now: build() frees each as it copies it
    for text_sd, _ in texts:
        text_sd.pop(POSITION_IDS, None)
    if not vae_sd or not all(t for t, _ in texts):
        raise CheckpointError(
            f"{path} has a UNet but no {'VAE' if not vae_sd else 'text encoder'}: use a full {fam} file."
        )
    if config is not None:
        unet_cfg, vae_cfg, text_cfgs = config.unet, config.vae, [config.text, config.text_2][: len(texts)]
    else:
        fam_rec = family(fam)
        unet_cfg = mc.config_from_metadata(meta, UNetConfig, "unet") or mc.infer_unet_config(unet_sd)
        vae_cfg = mc.config_from_metadata(meta, VAEConfig, "vae") or mc.infer_vae_config(
            vae_sd, VAEConfig(scale_factor=fam_rec.latent_scale)
        )
        text_cfgs = [
            mc.config_from_metadata(meta, TextConfig, section) or mc.infer_text_config(sd, act)
            for section, (sd, act) in zip(("text", "text_2"), texts)
        ]
    fam_rec = family(fam)
    if config is None and unet_cfg.adm_in_channels and text_cfgs[-1].projection_dim:  # SDXL: 6 sizes + pooled text
        unet_cfg = replace(unet_cfg, size_embed_dim=(unet_cfg.adm_in_channels - text_cfgs[-1].projection_dim) // 6)
    # A model with its own vocabulary (like the shipped demo model) keeps its tokenizers in folders beside the file.
    toks = []
    for i, (cfg_i, pad) in enumerate(zip(text_cfgs, fam_rec.text_pads)):
        beside = path.parent / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        own = beside if beside.is_dir() and cfg_i.vocab_size != TextConfig.vocab_size else None
        toks.append(tokenizer if (i == 0 and tokenizer is not None) else _tokenizer_for(cfg_i, own, pad))
    unet = build(UNet, unet_cfg, unet_sd, "UNet", dtype)
    if said is None:
        said = "v" if fam == SD2.name and probe_v_prediction(unet) else "epsilon"
    encoders = [build_text(c, sd, dtype, tok) for c, (sd, _), tok in zip(text_cfgs, texts, toks)]
    cfg = SDConfig(
        unet_cfg, vae_cfg, text_cfgs[0], text_cfgs[1] if len(text_cfgs) > 1 else None, fam, prediction_name(said)
    )
    return StableDiffusion(
        unet, build(AutoencoderKL, vae_cfg, vae_sd, "VAE", dtype), encoders[0], cfg, source=str(path),
        text_2=encoders[1] if len(encoders) > 1 else None,
    )  # fmt: skip


def load_vae(
    path: str | os.PathLike, cfg: VAEConfig, dtype: torch.dtype = torch.float32
) -> AutoencoderKL | TinyAutoencoder:
    """A VAE file or folder (vae-ft-mse-840000-ema-pruned.safetensors and the like: original keys, with or without
    `first_stage_model.`, or diffusers keys / a diffusers `vae` folder) for a base whose VAE config is `cfg`; a TAESD
    (madebyollin's halves or diffusers' AutoencoderTiny) comes back as a TinyAutoencoder with the same contract."""
    path = Path(path)
    state = read_folder(path) if path.is_dir() else read_file(path)
    if taesd.taesd_layout(state) is not None:
        return taesd.load_taesd(path, state, cfg.z_channels, cfg.downsample_factor, dtype)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = _strip(state, VAE_PREFIX)
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".down_blocks." in k or ".mid_block." in k for k in state):
        state = keymaps.from_diffusers(state, keymaps.vae_modules(cfg), our_keys(AutoencoderKL, cfg))
    if "decoder.conv_in.weight" not in state:
        raise CheckpointError(f"{path.name} holds no VAE decoder: it is {describe(state)}, not a VAE.")
    vae = build(AutoencoderKL, cfg, state, f"VAE ({path.name})", dtype)
    vae.source = path.name
    return vae


def _load_sd_diffusers(folder: Path, dtype: torch.dtype, tokenizer, prediction: str | None) -> StableDiffusion:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a folder but not a diffusers pipeline (no model_index.json).")
    sched = folder / "scheduler" / "scheduler_config.json"
    said = prediction
    if sched.is_file():
        sc = mc.read_json(sched)
        if sc.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise CheckpointError(f"{folder}: only models trained with the scaled-linear noise schedule work here.")
        said = said or sc.get("prediction_type", "epsilon")
    unet_cfg = mc.config_file(mc.unet_config_from_diffusers, folder / "unet" / "config.json")
    vae_cfg = mc.config_file(mc.vae_config_from_diffusers, folder / "vae" / "config.json")
    fam = family(family_of_config(unet_cfg))
    text_dirs = [folder / "text_encoder"] + ([folder / "text_encoder_2"] if fam.pooled else [])
    text_cfgs = [mc.config_file(mc.text_config_from_diffusers, d / "config.json") for d in text_dirs]
    unet_sd = keymaps.from_diffusers(
        read_folder(folder / "unet"), keymaps.unet_modules(unet_cfg), our_keys(UNet, unet_cfg)
    )
    vae_sd = keymaps.from_diffusers(
        read_folder(folder / "vae"), keymaps.vae_modules(vae_cfg), our_keys(AutoencoderKL, vae_cfg)
    )
    encoders = []
    for i, (d, cfg_i) in enumerate(zip(text_dirs, text_cfgs)):
        tok_dir = folder / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        tok = tokenizer if (i == 0 and tokenizer is not None) else _tokenizer_for(cfg_i, tok_dir, fam.text_pads[i])
        encoders.append(build_text(cfg_i, text_from_diffusers(read_folder(d)), dtype, tok))
    second = text_cfgs[1] if len(text_cfgs) > 1 else None
    cfg = SDConfig(unet_cfg, vae_cfg, text_cfgs[0], second, fam.name, prediction_name(said or "epsilon"))
    return StableDiffusion(
        build(UNet, unet_cfg, unet_sd, "UNet", dtype),
        build(AutoencoderKL, vae_cfg, vae_sd, "VAE", dtype),
        encoders[0],
        cfg,
        source=str(folder),
        text_2=encoders[1] if len(encoders) > 1 else None,
    )


def load_controlnet(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    base: UNetConfig | None = None,
    global_average_pooling: bool | None = None,
    unet: UNet | None = None,
) -> ControlNet:
    """Load a ControlNet: 1.0 full file, 1.1 control-only file, bare extract, or diffusers folder / file; a
    ControlNet Union / ProMax file or folder gives a `ControlNetUnion` (told from its keys); a Control-LoRA is built
    on `unet`, the base model's UNet (`control_lora.py`).

    `base` (the UNet config of the SD model it will drive) supplies what shapes cannot tell (head count, groups);
    `global_average_pooling` overrides the file (the original shuffle model needs it and its .pth cannot say so).
    """
    path = Path(path)
    if path.is_dir():
        cfg = mc.config_file(mc.unet_config_from_diffusers, path / "config.json")
        state = read_folder(path)
        if weight_kind(state) is WeightKind.CONTROLNET_UNION:
            return union_from_folder(path, state, dtype)
        state = keymaps.from_diffusers(state, keymaps.controlnet_modules(cfg), our_keys(ControlNet, cfg))
    else:
        state = read_file(path)
        meta = read_metadata(path)
        kind = weight_kind(state)
        if kind is WeightKind.CONTROLNET_UNION:  # xinsir's Union / ProMax: diffusers keys, no config in the file
            return union_from_state(state, dtype, base=base)
        if kind is WeightKind.CONTROL_LORA:
            if unet is None:
                raise CheckpointError(f"{path.name} is a Control-LoRA: it is built from the base model's own UNet. "
                                      "Load it through ModelManager, or pass the base's UNet as unet=.")  # fmt: skip
            return build_control_lora(state, unet, dtype, path.name)
        if any(k.startswith(CONTROL_PREFIX) for k in state):
            state = _strip(state, CONTROL_PREFIX)
        elif kind is WeightKind.DIFFUSERS_CONTROLNET:  # diffusers keys in one file (SDXL ControlNets mostly)
            # module by module: a config read from the keys alone knows the modules, not the transformer depths
            cfg = mc.config_from_metadata(meta, UNetConfig, "controlnet") or mc.diffusers_key_config(state)
            state = renamed_by_module(state, keymaps.controlnet_modules(cfg))
        elif kind is not WeightKind.CONTROLNET:
            raise CheckpointError(
                f"{path} is {describe(state)}, not a ControlNet. Pick a ControlNet file (e.g. control_v11p_sd15_canny)."
            )
        cfg = mc.config_from_metadata(meta, UNetConfig, "controlnet") or mc.infer_unet_config(state, base)
    if global_average_pooling is not None:
        cfg = replace(cfg, global_average_pooling=global_average_pooling)
    return build(ControlNet, cfg, state, "ControlNet", dtype)
