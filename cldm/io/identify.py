"""What a state dict is, from its keys and shapes alone (no file access): its kind (a base, a ControlNet, a LoRA...),
a base file's family, its text encoders in our keys, and what an SD2 UNet predicts when nothing says.
`checkpoints.py` reads the files and asks here."""

from __future__ import annotations

import enum

import torch

from cldm.errors import CheckpointError
from cldm.io import keymaps
from cldm.io.t2i_adapters import is_t2i_adapter_state
from cldm.io.taesd import taesd_layout
from cldm.models.family import SD2, SD15, SDXL
from cldm.models.unet import UNet

StateDict = dict[str, torch.Tensor]

# The single-file key prefixes, by component (the same in every family's original layout but SDXL's text encoders)
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, CONTROL_PREFIX = (
    SD15.unet_prefix, SD15.vae_prefix, SD15.text_prefix, SD15.control_prefix,
)  # fmt: skip


def _strip(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# SDXL's single file keeps its two text encoders under these prefixes (SGM's "conditioner"): CLIP ViT-L in the
# transformers layout, OpenCLIP ViT-bigG in OpenCLIP's.
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.", "conditioner.embedders.1.model.")
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2's OpenCLIP ViT-H
CONTROL_LORA_MARKER = "lora_controlnet"  # the empty tensor every Control-LoRA file carries
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


def texts_of_file(state: StateDict, fam: str) -> list[tuple[StateDict, str]]:
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


def prediction_name(name: str) -> str:
    """A prediction type by any of its names ("v", "v_prediction", "epsilon", "eps")."""
    name = str(name).lower()
    if name in ("v", "v_prediction", "v-prediction"):
        return "v"
    if name in ("epsilon", "eps", ""):
        return "epsilon"
    raise CheckpointError(f"Unknown prediction type {name!r}: this program runs epsilon and v prediction models.")


class WeightKind(enum.Enum):
    """What a state dict holds, told from its keys; the value is how messages name it."""

    IP_ADAPTER = "an IP-Adapter"
    T2I_ADAPTER = "a T2I-Adapter"  # TencentARC's files (full, light, style) and diffusers' T2IAdapter layout
    CONTROL_LORA = "a Control-LoRA"  # Stability's: a ControlNet as changes to its base's weights (control_lora.py)
    CONTROLNET = "a ControlNet"  # original layout: a 1.0 full file, a 1.1 control-only file or a bare extract
    DIFFUSERS_CONTROLNET = "a diffusers ControlNet"
    CONTROLNET_UNION = "a ControlNet Union"  # xinsir's controlnet-union-sdxl-1.0 and ProMax (diffusers layout)
    SD_BASE = "an SD base model"
    LORA = "a LoRA"
    DIFFUSERS_UNET = "a diffusers UNet"
    TAESD = "a TAESD (tiny autoencoder: a VAE)"  # madebyollin's halves and diffusers' AutoencoderTiny (taesd.py)
    UNKNOWN = "an unknown model"


def weight_kind(state: StateDict) -> WeightKind:
    """What a state dict holds, from its keys (never the file name)."""
    keys = list(state)
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return WeightKind.IP_ADAPTER
    if is_t2i_adapter_state(state):
        return WeightKind.T2I_ADAPTER
    if CONTROL_LORA_MARKER in state:
        return WeightKind.CONTROL_LORA
    if any(k.startswith(CONTROL_PREFIX) for k in keys) or "input_hint_block.0.weight" in state:
        return WeightKind.CONTROLNET
    if "task_embedding" in state and "control_add_embedding.linear_1.weight" in state:
        return WeightKind.CONTROLNET_UNION
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return WeightKind.DIFFUSERS_CONTROLNET
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return WeightKind.SD_BASE
    if any("lora" in k for k in keys[:50]):
        return WeightKind.LORA
    if "conv_in.weight" in state and any(k.startswith("down_blocks.") for k in keys):
        return WeightKind.DIFFUSERS_UNET
    if taesd_layout(state) is not None:
        return WeightKind.TAESD
    return WeightKind.UNKNOWN


def describe(state: StateDict) -> str:
    """A few words on what a state dict holds, for error messages only (branch on `weight_kind`)."""
    kind = weight_kind(state)
    return f"{kind.value} (keys like {list(state)[:3]})" if kind is WeightKind.UNKNOWN else kind.value
