"""Writing weights: original-format single files, ControlNet 1.1 / bare files and diffusers folders (safetensors).

Reading is `checkpoints.py`'s; both share its key prefixes and the config metadata key.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from cldm.io import keymaps
from cldm.io import model_configs as mc
from cldm.io.checkpoints import CONTROL_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from cldm.io.model_configs import CONFIG_METADATA_KEY
from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion
from cldm.sampling.schedules import BETA_END, BETA_START, STEPS_OFFSET, TRAIN_STEPS

StateDict = dict[str, torch.Tensor]


def save_file(state: StateDict, path: str | os.PathLike, configs: dict | None = None) -> None:
    """Write safetensors (contiguous CPU tensors) with our configs in the header metadata."""
    from safetensors.torch import save_file as st_save

    meta = {"format": "pt"}
    if configs:
        meta[CONFIG_METADATA_KEY] = json.dumps({k: asdict(v) for k, v in configs.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def _prefixed(module: nn.Module, prefix: str) -> StateDict:
    return {prefix + k: v for k, v in module.state_dict().items()}


def save_sd(model: StableDiffusion, path: str | os.PathLike, fmt: str = "original") -> None:
    """Save a base model as one original-format .safetensors file, or as a diffusers pipeline folder."""
    if fmt == "original":
        state = {
            **_prefixed(model.unet, UNET_PREFIX),
            **_prefixed(model.vae, VAE_PREFIX),
            **_prefixed(model.text, TEXT_PREFIX),
        }
        save_file(state, path, {"unet": model.config.unet, "vae": model.config.vae, "text": model.config.text})
        return
    if fmt != "diffusers":
        raise ValueError(f"unknown format {fmt!r}")
    folder = Path(path)
    cfg = model.config
    _write_json(folder / "unet" / "config.json", mc.unet_config_to_diffusers(cfg.unet, controlnet=False))
    save_file(
        keymaps.to_diffusers(model.unet.state_dict(), keymaps.unet_modules(cfg.unet)),
        folder / "unet" / "diffusion_pytorch_model.safetensors",
    )
    _write_json(folder / "vae" / "config.json", mc.vae_config_to_diffusers(cfg.vae))
    save_file(
        keymaps.to_diffusers(model.vae.state_dict(), keymaps.vae_modules(cfg.vae)),
        folder / "vae" / "diffusion_pytorch_model.safetensors",
    )
    model.text.clip.config.save_pretrained(str(folder / "text_encoder"))
    text_sd = {k[len("transformer.") :]: v for k, v in model.text.state_dict().items()}
    save_file(text_sd, folder / "text_encoder" / "model.safetensors")
    if model.text.tokenizer is not None:
        model.text.tokenizer.save_pretrained(str(folder / "tokenizer"))
    _write_json(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    _write_json(folder / "model_index.json", MODEL_INDEX)


def save_controlnet(cn: ControlNet, path: str | os.PathLike, fmt: str = "original") -> None:
    """Save a ControlNet as a 1.1-style file (`control_model.*`), a bare extract, or a diffusers folder."""
    if fmt in ("original", "bare"):
        prefix = CONTROL_PREFIX if fmt == "original" else ""
        save_file(_prefixed(cn, prefix), path, {"controlnet": cn.cfg})
    elif fmt == "diffusers":
        folder = Path(path)
        _write_json(folder / "config.json", mc.unet_config_to_diffusers(cn.cfg, controlnet=True))
        save_file(
            keymaps.to_diffusers(cn.state_dict(), keymaps.controlnet_modules(cn.cfg)),
            folder / "diffusion_pytorch_model.safetensors",
        )
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


# diffusers' scheduler config for the schedule samplers.py implements (SD1.5's, as its pipelines ship it).
SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": TRAIN_STEPS,
    "steps_offset": STEPS_OFFSET,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}
