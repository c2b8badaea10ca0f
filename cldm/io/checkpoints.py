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
import re
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
from cldm.io.tokenizer import check_tokenizer, clip_tokenizer
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig, family_of_config
from cldm.models.controlnet import ControlNet
from cldm.models.family import SD2, SD15, SDXL, family
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


# SDXL's single file keeps its two text encoders under these prefixes (SGM's "conditioner"): CLIP ViT-L in the
# transformers layout, OpenCLIP ViT-bigG in OpenCLIP's.
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.", "conditioner.embedders.1.model.")
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2's OpenCLIP ViT-H
V_PRED_KEY = "v_pred"  # a marker some tools (ComfyUI) write into v-prediction files


def single_file_family(state: StateDict) -> str:
    """The family of a base model's single file, from its keys: SDXL's conditioner or vector conditioning, SD2's
    OpenCLIP text tower or linear projections, else SD1.5."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in state:
        return SDXL.name
    proj = state.get(
        f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight", state.get(f"{UNET_PREFIX}input_blocks.4.1.proj_in.weight")
    )
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) or (proj is not None and proj.ndim == 2):
        return SD2.name
    return SD15.name


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
        pred = _pred(mc.read_json(sched).get("prediction_type", "epsilon")) if sched.is_file() else "epsilon"
    else:
        if _sniff(path) == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), "pt") as f:
                    shapes = {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is a damaged safetensors file ({e}). Download it again.") from e
        else:
            shapes = read_file(path)
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


class _Shape:
    """A tensor's shape from a file header, standing in for the tensor where only `ndim` / `shape` are read."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def _texts_of_file(state: StateDict, fam: str) -> list[tuple[StateDict, str]]:
    """A single file's text encoder(s) in our keys, each with its activation (it cannot be seen in shapes)."""
    if fam == SDXL.name:
        clip_l = _strip(state, SDXL_TEXT_PREFIXES[0])
        big_g = _strip(state, SDXL_TEXT_PREFIXES[1])
        return [(clip_l, "quick_gelu"), (keymaps.from_open_clip(big_g), "gelu")]
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        tower = _strip(state, OPEN_CLIP_PREFIX)
        # SD2 reads the penultimate layer: the last layer is dropped (as diffusers' conversion does), so "the last
        # layer, then the final norm" is SD2's rule here as it is in its diffusers folders.
        text = keymaps.from_open_clip(tower, keymaps.open_clip_layers(tower) - 1)
        text.pop("text_projection.weight", None)  # the contrastive head, unused for generation
        return [(text, "gelu")]
    return [(_strip(state, TEXT_PREFIX), "quick_gelu")]


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


@torch.no_grad()
def probe_v_prediction(unet: UNet) -> bool:
    """Whether an SD2 UNet predicts v, told from what it does at the last timestep (the heuristic A1111 uses for SD2
    files that do not say): fed a flat latent at t = 999, a noise predictor gives back about its input, a v predictor
    about minus the picture, far below it."""
    cfg = unet.cfg
    p = next(unet.parameters())
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 2, cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999], device=p.device), ctx)
    return float((out - x).float().mean()) < -1


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
    texts = _texts_of_file(state, fam)
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
    cfg = SDConfig(unet_cfg, vae_cfg, text_cfgs[0], text_cfgs[1] if len(text_cfgs) > 1 else None, fam, _pred(said))
    return StableDiffusion(
        unet, build(AutoencoderKL, vae_cfg, vae_sd, "VAE", dtype), encoders[0], cfg, source=str(path),
        text_2=encoders[1] if len(encoders) > 1 else None,
    )  # fmt: skip


def _pred(name: str) -> str:
    """A prediction type by any of its names ("v", "v_prediction", "epsilon", "eps")."""
    name = str(name).lower()
    if name in ("v", "v_prediction", "v-prediction"):
        return "v"
    if name in ("epsilon", "eps", ""):
        return "epsilon"
    raise CheckpointError(f"Unknown prediction type {name!r}: this program runs epsilon and v prediction models.")


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
    cfg = SDConfig(unet_cfg, vae_cfg, text_cfgs[0], second, fam.name, _pred(said or "epsilon"))
    return StableDiffusion(
        build(UNet, unet_cfg, unet_sd, "UNet", dtype),
        build(AutoencoderKL, vae_cfg, vae_sd, "VAE", dtype),
        encoders[0],
        cfg,
        source=str(folder),
        text_2=encoders[1] if len(encoders) > 1 else None,
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
        elif kind is WeightKind.DIFFUSERS_CONTROLNET:  # diffusers keys in one file (SDXL ControlNets mostly)
            cfg = mc.config_from_metadata(meta, UNetConfig, "controlnet") or mc.diffusers_key_config(state)
            state = keymaps.from_diffusers(state, keymaps.controlnet_modules(cfg), our_keys(ControlNet, cfg))
        elif kind is not WeightKind.CONTROLNET:
            raise CheckpointError(
                f"{path} is {describe(state)}, not a ControlNet. Pick a ControlNet file (e.g. control_v11p_sd15_canny)."
            )
        cfg = mc.config_from_metadata(meta, UNetConfig, "controlnet") or mc.infer_unet_config(state, base)
    if global_average_pooling is not None:
        cfg = replace(cfg, global_average_pooling=global_average_pooling)
    return build(ControlNet, cfg, state, "ControlNet", dtype)
