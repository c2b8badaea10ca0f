"""Reading weights: the only module that opens weight files (`writers.py` writes them).

Formats are told apart by their content, never by the file name:
  * safetensors (8-byte header length + JSON), torch zip archives and legacy torch pickles (the pickles only
    through `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers);
  * SD1.5 single files (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), ControlNet 1.0 full
    files (the same + `control_model.*`), ControlNet 1.1 files (`control_model.*`), bare extracts (no prefix);
  * diffusers folders: a pipeline (model_index.json + unet/ vae/ text_encoder/ tokenizer/) or one model
    (config.json + diffusion_pytorch_model.*), renamed through the tables in `keymaps.py`.
Loading is strict: every key must be used (deliberate skips are listed below) and every weight must be finite.
"""

from __future__ import annotations

import enum
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError

from cldm.errors import CheckpointError, MissingWeightsError
from cldm.io import keymaps
from cldm.io import model_configs as mc
from cldm.io.assemble import POSITION_IDS, build, build_text, our_keys, text_from_diffusers
from cldm.io.tokenizer import check_tokenizer, sd15_tokenizer
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from cldm.models.controlnet import ControlNet
from cldm.models.family import SD15
from cldm.models.sd import StableDiffusion
from cldm.models.unet import UNet
from cldm.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, CONTROL_PREFIX = (
    SD15.unet_prefix,
    SD15.vae_prefix,
    SD15.text_prefix,
    SD15.control_prefix,
)
# Keys of original files that we do not use, on purpose: the training schedule buffers (samplers.py recomputes
# them), EMA copies, the VAE training loss and CLIP's position ids (a constant we rebuild).
SKIP_PREFIXES = ("model_ema.", "first_stage_model.loss.", "lora_")
SKIP_NAMES = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}  # fmt: skip

WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_EXTS = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin", ".ckpt", ".pth", ".pt")

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- reading files
def _sniff(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish. Fetch it again.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"{path} is not a weight file this program reads (not safetensors, not a PyTorch checkpoint). "
        "Check that you picked the right file and that it is not an HTML error page."
    )


def _unwrap(obj, path: Path) -> StateDict:
    # Lightning checkpoints nest the weights under "state_dict"; some tools use "model" or "module".
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):  # an A1111 textual inversion (.pt)
        obj = {f"string_to_param.{k}": v for k, v in obj["string_to_param"].items()}
    # IP-Adapter .bin files hold {"image_proj": {...}, "ip_adapter": {...}}: flattened to "image_proj.proj.weight"
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        obj = {f"{k}.{sub}": t for k, part in obj.items() for sub, t in part.items()}
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no tensors: it is not a model checkpoint.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata ({} for other formats)."""
    if _sniff(path) != "safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file ({e}). Download it again.") from e


def read_file(path: str | os.PathLike) -> StateDict:
    """Tensors of one weight file, whatever its format. Pickles never run code: anything but tensors is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"Weight file not found: {path}")
    kind = _sniff(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # a file object, not the name: torch.load goes by the name's extension for some formats (.safetensors)
        with open(path, "rb") as f:
            return _unwrap(torch.load(f, map_location="cpu", weights_only=True), path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load {path}{_misnamed(path, kind)}: it contains Python objects other than weights, which "
            f"could run code ({str(e).splitlines()[0]}). Only load it if you trust it, and convert it to .safetensors "
            "first."
        ) from e
    # What the readers raise for cut-off or scrambled files; anything else is a bug and is not hidden as one of these.
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError, struct.error, SafetensorError) as e:
        if kind == "pickle" and "magic number" in str(e):  # pickle.dump output, not torch.save's format
            raise CheckpointError(
                f"{path}{_misnamed(path, kind)} is a plain Python pickle, not a PyTorch checkpoint or safetensors "
                "file: refused. Use the model's .safetensors (or .ckpt/.pth saved by PyTorch)."
            ) from e
        raise CheckpointError(
            f"{path}{_misnamed(path, kind)} is damaged or truncated ({type(e).__name__}: {e}). Download it again."
        ) from e


_KINDS = {"zip": "a PyTorch checkpoint (zip)", "pickle": "a pickle", "safetensors": "safetensors"}


def _misnamed(path: Path, kind: str) -> str:
    """' (named .safetensors but it is a pickle)' when the name and the content disagree, else ''."""
    says = (
        "safetensors"
        if path.suffix == ".safetensors"
        else "pickle"
        if path.suffix in (".ckpt", ".pth", ".pt", ".bin")
        else ""
    )
    if not says or (says == "safetensors") == (kind == "safetensors"):
        return ""
    return f" (named {path.suffix}, but it is {_KINDS[kind]})"


def _folder_weights(folder: Path) -> Path:
    for stem in WEIGHT_STEMS:
        for ext in WEIGHT_EXTS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    raise MissingWeightsError(f"No weights in {folder} (expected e.g. diffusion_pytorch_model.safetensors).")


def read_folder(folder: Path) -> StateDict:
    """Weights of one diffusers model folder, sharded or not."""
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(mc.read_json(index)["weight_map"].values()))
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index.name} in {folder.name}/ has no usable weight_map ({e}).") from e
            out: StateDict = {}
            for shard in shards:
                path = (folder / str(shard)).resolve()
                if path.parent != folder.resolve():  # "../x", "/etc/x", "sub/x": only files beside the index
                    raise CheckpointError(
                        f"{index.name} in {folder.name}/ names {shard!r}, which is not a file in that folder: refused."
                    )
                out.update(read_file(path))
            return out
    return read_file(_folder_weights(folder))


def _strip(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# -------------------------------------------------------------------------------------------------- loaders
def _tokenizer_for(text_cfg: TextConfig, folder: Path | None):
    from transformers import CLIPTokenizer

    if folder is not None and folder.is_dir():
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        check_tokenizer(tok, text_cfg.vocab_size)
        return tok
    if text_cfg.vocab_size == TextConfig.vocab_size:
        return sd15_tokenizer()
    raise MissingWeightsError(
        f"This model's text encoder has a {text_cfg.vocab_size}-token vocabulary but no tokenizer came with it. "
        "Use the model's diffusers folder (with tokenizer/) instead."
    )


def load_sd(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, tokenizer=None, config: SDConfig | None = None
) -> StableDiffusion:
    """Load an SD1.5 base model: a single file (.safetensors/.ckpt) or a diffusers pipeline folder.

    A single file's config comes from `config`, else from our safetensors metadata, else from its shapes with the
    SD1.5 head counts (shapes cannot tell heads apart). Raises CheckpointError for unusable files and MissingWeightsError for missing ones.
    """
    path = Path(path)
    if path.is_dir():
        return _load_sd_diffusers(path, dtype, tokenizer)
    state = read_file(path)
    meta = read_metadata(path)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path} holds no SD UNet (`{UNET_PREFIX}*`): it is {describe(state)}, not a base model.")
    known = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, CONTROL_PREFIX, *SKIP_PREFIXES)
    ignored = [k for k in state if not k.startswith(known) and k not in SKIP_NAMES]
    if ignored:
        log.warning("%s: ignoring %d keys outside the model, e.g. %s", path, len(ignored), ignored[:3])
    unet_sd, vae_sd = _strip(state, UNET_PREFIX), _strip(state, VAE_PREFIX)
    text_sd = _strip(state, TEXT_PREFIX)
    del state  # the parts hold the tensors now: build() frees each as it copies it
    text_sd.pop(POSITION_IDS, None)
    if not vae_sd or not text_sd:
        raise CheckpointError(
            f"{path} has a UNet but no {'VAE' if not vae_sd else 'text encoder'}: use a full SD1.5 file."
        )
    if config is not None:
        unet_cfg, vae_cfg, text_cfg = config.unet, config.vae, config.text
    else:
        unet_cfg = mc.config_from_metadata(meta, UNetConfig, "unet") or mc.infer_unet_config(unet_sd)
        vae_cfg = mc.config_from_metadata(meta, VAEConfig, "vae") or mc.infer_vae_config(vae_sd)
        text_cfg = mc.config_from_metadata(meta, TextConfig, "text") or mc.infer_text_config(text_sd)
    # A model with its own vocabulary (like the shipped demo model) keeps its tokenizer in a folder beside the file.
    beside = path.parent / "tokenizer"
    own = beside if beside.is_dir() and text_cfg.vocab_size != TextConfig.vocab_size else None
    tokenizer = tokenizer or _tokenizer_for(text_cfg, own)
    cfg = SDConfig(unet_cfg, vae_cfg, text_cfg)
    return StableDiffusion(
        build(UNet, unet_cfg, unet_sd, "UNet", dtype),
        build(AutoencoderKL, vae_cfg, vae_sd, "VAE", dtype),
        build_text(text_cfg, text_sd, dtype, tokenizer),
        cfg,
        source=str(path),
    )


def load_vae(path: str | os.PathLike, cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE file or folder (vae-ft-mse-840000-ema-pruned.safetensors and the like: original keys, with or without
    `first_stage_model.`, or diffusers keys / a diffusers `vae` folder) for a base whose VAE config is `cfg`."""
    path = Path(path)
    state = read_folder(path) if path.is_dir() else read_file(path)
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


def _load_sd_diffusers(folder: Path, dtype: torch.dtype, tokenizer) -> StableDiffusion:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a folder but not a diffusers pipeline (no model_index.json).")
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        sc = mc.read_json(sched)
        if (
            sc.get("prediction_type", "epsilon") != "epsilon"
            or sc.get("beta_schedule", "scaled_linear") != "scaled_linear"
        ):
            raise CheckpointError(
                f"{folder}: only epsilon-prediction SD1.x models with the scaled-linear schedule work here."
            )
    unet_cfg = mc.config_file(mc.unet_config_from_diffusers, folder / "unet" / "config.json")
    vae_cfg = mc.config_file(mc.vae_config_from_diffusers, folder / "vae" / "config.json")
    text_cfg = mc.config_file(mc.text_config_from_diffusers, folder / "text_encoder" / "config.json")
    unet_sd = keymaps.from_diffusers(
        read_folder(folder / "unet"), keymaps.unet_modules(unet_cfg), our_keys(UNet, unet_cfg)
    )
    vae_sd = keymaps.from_diffusers(
        read_folder(folder / "vae"), keymaps.vae_modules(vae_cfg), our_keys(AutoencoderKL, vae_cfg)
    )
    text_sd = text_from_diffusers(read_folder(folder / "text_encoder"))
    tokenizer = tokenizer or _tokenizer_for(text_cfg, folder / "tokenizer")
    return StableDiffusion(
        build(UNet, unet_cfg, unet_sd, "UNet", dtype),
        build(AutoencoderKL, vae_cfg, vae_sd, "VAE", dtype),
        build_text(text_cfg, text_sd, dtype, tokenizer),
        SDConfig(unet_cfg, vae_cfg, text_cfg),
        source=str(folder),
    )


class WeightKind(enum.Enum):
    """What a state dict holds, told from its keys; the value is how messages name it."""

    IP_ADAPTER = "an IP-Adapter"
    CONTROLNET = "a ControlNet"  # original layout: a 1.0 full file, a 1.1 control-only file or a bare extract
    DIFFUSERS_CONTROLNET = "a diffusers ControlNet"
    SD_BASE = "an SD base model"
    LORA = "a LoRA"
    DIFFUSERS_UNET = "a diffusers UNet"
    UNKNOWN = "an unknown model"


def weight_kind(state: StateDict) -> WeightKind:
    """What a state dict holds, from its keys (never the file name)."""
    keys = list(state)
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return WeightKind.IP_ADAPTER
    if any(k.startswith(CONTROL_PREFIX) for k in keys) or "input_hint_block.0.weight" in state:
        return WeightKind.CONTROLNET
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return WeightKind.DIFFUSERS_CONTROLNET
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return WeightKind.SD_BASE
    if any("lora" in k for k in keys[:50]):
        return WeightKind.LORA
    if "conv_in.weight" in state and any(k.startswith("down_blocks.") for k in keys):
        return WeightKind.DIFFUSERS_UNET
    return WeightKind.UNKNOWN


def describe(state: StateDict) -> str:
    """A few words on what a state dict holds, for error messages only (branch on `weight_kind`)."""
    kind = weight_kind(state)
    return f"{kind.value} (keys like {list(state)[:3]})" if kind is WeightKind.UNKNOWN else kind.value


def load_controlnet(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    base: UNetConfig | None = None,
    global_average_pooling: bool | None = None,
) -> ControlNet:
    """Load a ControlNet: 1.0 full file, 1.1 control-only file, bare extract, or diffusers folder / file.

    `base` (the UNet config of the SD model it will drive) supplies what shapes cannot tell (head count, groups);
    `global_average_pooling` overrides the file (the original shuffle model needs it and its .pth cannot say so).
    """
    path = Path(path)
    if path.is_dir():
        cfg = mc.config_file(mc.unet_config_from_diffusers, path / "config.json")
        state = keymaps.from_diffusers(read_folder(path), keymaps.controlnet_modules(cfg), our_keys(ControlNet, cfg))
    else:
        state = read_file(path)
        meta = read_metadata(path)
        kind = weight_kind(state)
        if any(k.startswith(CONTROL_PREFIX) for k in state):
            state = _strip(state, CONTROL_PREFIX)
        elif kind is WeightKind.DIFFUSERS_CONTROLNET:
            cfg = mc.config_from_metadata(meta, UNetConfig, "controlnet") or base or UNetConfig()
            state = keymaps.from_diffusers(state, keymaps.controlnet_modules(cfg), our_keys(ControlNet, cfg))
        elif kind is not WeightKind.CONTROLNET:
            raise CheckpointError(
                f"{path} is {describe(state)}, not a ControlNet. Pick a ControlNet file (e.g. control_v11p_sd15_canny)."
            )
        cfg = mc.config_from_metadata(meta, UNetConfig, "controlnet") or mc.infer_unet_config(state, base)
    if global_average_pooling is not None:
        cfg = replace(cfg, global_average_pooling=global_average_pooling)
    return build(ControlNet, cfg, state, "ControlNet", dtype)
