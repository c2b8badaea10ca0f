"""Writing weights: original-format single files, ControlNet 1.1 / bare files and diffusers folders (safetensors).

Every family in the layout its users download: SD1.5 (LDM), SD2.x (LDM with an OpenCLIP text tower) and SDXL (SGM,
two text encoders) single files, and diffusers pipeline folders (StableDiffusionPipeline / StableDiffusionXLPipeline).
Reading is `checkpoints.py`'s; both share its key prefixes and the config metadata key. Our single files also carry
their configs and a "model" section ({family, prediction}) in the metadata, so they read back without guessing.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from torch import nn

from cldm.io import keymaps
from cldm.io import model_configs as mc
from cldm.io.identify import (
    CONTROL_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_TEXT_PREFIXES,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)  # fmt: skip
from cldm.io.model_configs import CONFIG_METADATA_KEY
from cldm.models.config import SDConfig
from cldm.models.controlnet import ControlNet
from cldm.models.family import SD2, SDXL
from cldm.models.sd import StableDiffusion
from cldm.models.text import TextEncoder
from cldm.sampling.schedules import BETA_END, BETA_START, STEPS_OFFSET, TRAIN_STEPS

StateDict = dict[str, torch.Tensor]


def save_file(state: StateDict, path: str | os.PathLike, configs: dict | None = None) -> None:
    """Write safetensors (contiguous CPU tensors) with our configs (dataclasses or plain dicts) in the header
    metadata."""
    from safetensors.torch import save_file as st_save

    meta = {"format": "pt"}
    if configs:
        meta[CONFIG_METADATA_KEY] = json.dumps({k: asdict(v) if is_dataclass(v) else v for k, v in configs.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def _prefixed(module: nn.Module, prefix: str) -> StateDict:
    return {prefix + k: v for k, v in module.state_dict().items()}


def _open_clip_tower(text: TextEncoder) -> StateDict:
    """A text encoder in OpenCLIP's layout (without the `model.` prefix): SDXL's bigG and SD2's ViT-H as the
    original files keep them (q/k/v in one `in_proj`, `text_projection` transposed)."""
    return keymaps.to_open_clip(text.state_dict())


def _identity_resblock(tower: StateDict) -> StateDict:
    """One more OpenCLIP resblock after the last, all zeros: the layer SD2's files have and its rule never reads.

    SD2 reads OpenCLIP ViT-H's penultimate layer; diffusers' folders (and we) keep only the layers up to it, and the
    reader drops a single file's last layer. So an SD2 file we write carries one layer more than our encoder, and the
    reader gives back exactly our layers. Zeros rather than a copy of a layer: with its norms, projections and biases
    at zero the block adds nothing to its input (attention and MLP both output 0), so it is exactly the identity, and a
    reader that takes the last layer instead of the penultimate (then the final norm) gets our states as well.
    """
    n = keymaps.open_clip_layers(tower)
    first, last = "transformer.resblocks.0.", f"transformer.resblocks.{n}."
    return {last + k[len(first) :]: torch.zeros_like(v) for k, v in tower.items() if k.startswith(first)}


def _single_file_texts(model: StableDiffusion) -> StateDict:
    """The text encoder(s) under the family's single-file keys (what `checkpoints._texts_of_file` reads)."""
    if model.config.family == SDXL.name:  # SGM: CLIP-L in the transformers layout, bigG in OpenCLIP's
        clip_l, big_g = SDXL_TEXT_PREFIXES
        tower = _open_clip_tower(model.text_2)
        return {**_prefixed(model.text, clip_l), **{big_g + k: v for k, v in tower.items()}}
    if model.config.family == SD2.name:  # LDM with OpenCLIP ViT-H: `cond_stage_model.model.*`
        tower = _open_clip_tower(model.text)
        tower |= _identity_resblock(tower)
        # (the file's `text_projection`, OpenCLIP's contrastive head, is left out: SD2 never uses it, diffusers' folders
        # drop it, so we do not have it; the readers we know take a file without it.)
        return {OPEN_CLIP_PREFIX + k: v for k, v in tower.items()}
    return _prefixed(model.text, TEXT_PREFIX)


def save_sd(model: StableDiffusion, path: str | os.PathLike, fmt: str = "original") -> None:
    """Save a base model (SD1.5, SD2.x or SDXL) as one original-format .safetensors file (LDM or SGM keys), or as a
    diffusers pipeline folder."""
    cfg = model.config
    if fmt == "original":
        state = {**_prefixed(model.unet, UNET_PREFIX), **_prefixed(model.vae, VAE_PREFIX), **_single_file_texts(model)}
        configs: dict = {"unet": cfg.unet, "vae": cfg.vae, "text": cfg.text}
        if cfg.text_2 is not None:
            configs["text_2"] = cfg.text_2
        # What the UNet predicts is in no weight's shape: the "model" section says it (checkpoints._prediction_of_file
        # reads it). Other programs have their own ways. A1111 takes a .yaml beside a file as the whole model config
        # (one holding only `parameterization: "v"` would break its loading) and, without one, probes an SD2 UNet as
        # our probe_v_prediction does: so no .yaml is written. ComfyUI looks for a `v_pred` key (not written).
        configs["model"] = {"family": cfg.family, "prediction": cfg.prediction}
        save_file(state, path, configs)
        return
    if fmt != "diffusers":
        raise ValueError(f"unknown format {fmt!r}")
    folder = Path(path)
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
    for i, text in enumerate(model.texts):  # text_encoder, text_encoder_2 (SDXL's bigG, with its projection)
        suffix = "" if i == 0 else f"_{i + 1}"
        _save_text(text, folder / f"text_encoder{suffix}")
        if text.tokenizer is not None:
            _save_tokenizer(text.tokenizer, folder / f"tokenizer{suffix}")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    _write_json(folder / "model_index.json", model_index(model))


def _save_text(text: TextEncoder, folder: Path) -> None:
    """A transformers text-encoder folder in the published layout: config.json naming the class diffusers builds
    (CLIPTextModelWithProjection when the encoder projects its pooled output), `text_model.*` weights and
    `text_projection.weight` beside them."""
    config = copy.deepcopy(text.clip.config)
    config.architectures = ["CLIPTextModelWithProjection" if text.text_projection is not None else "CLIPTextModel"]
    config.save_pretrained(str(folder))
    state = {k.removeprefix("transformer."): v for k, v in text.state_dict().items()}
    save_file(state, folder / "model.safetensors")


def _save_tokenizer(tok, folder: Path) -> None:
    """save_pretrained (transformers 5 writes tokenizer.json), plus the vocab.json and merges.txt the published folders
    have: the files transformers 4's CLIPTokenizer needs, which many diffusers installs still read with."""
    tok.save_pretrained(str(folder))
    spec = folder / "tokenizer.json"
    if (folder / "vocab.json").is_file() or not spec.is_file():
        return
    bpe = json.loads(spec.read_text(encoding="utf-8")).get("model", {})
    if bpe.get("type") != "BPE":
        return
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def scheduler_config(cfg: SDConfig) -> dict:
    """The scheduler_config.json the family's pipelines ship (SDXL: Euler; SD1.5, SD2: DDIM), predicting as ours."""
    base = SDXL_SCHEDULER if cfg.family == SDXL.name else SD15_SCHEDULER
    return {**base, "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon"}


def model_index(model: StableDiffusion) -> dict:
    """model_index.json: StableDiffusionPipeline, or StableDiffusionXLPipeline for two text encoders."""
    if model.text_2 is None:
        return dict(MODEL_INDEX)
    return {**SDXL_MODEL_INDEX, "force_zeros_for_empty_prompt": model.family.zero_empty_negative}


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
# SDXL's, as stabilityai/stable-diffusion-xl-base-1.0 ships it (Euler, the DDIM fields a DDIM made from it reads).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": TRAIN_STEPS,
    "steps_offset": STEPS_OFFSET,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
    "prediction_type": "epsilon",
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
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "force_zeros_for_empty_prompt": True,
}
