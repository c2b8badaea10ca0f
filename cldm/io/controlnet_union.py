"""ControlNet Union files (xinsir's controlnet-union-sdxl-1.0 and its ProMax) into a `ControlNetUnion`.

They exist only in diffusers' layout (`diffusion_pytorch_model.safetensors`, `diffusion_pytorch_model_promax
.safetensors`, with or without the folder's config.json). The encoder half is renamed by the diffusers ControlNet
table of `keymaps.py`; the Union parts (`task_embedding`, `transformer_layes.*`, `spatial_ch_projs.*`,
`control_add_embedding.*`) keep their published names, which are our module names. ProMax is told from the number
of control types its `task_embedding` holds (8 against 6), never from the file name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cldm.errors import CheckpointError
from cldm.io import keymaps
from cldm.io import model_configs as mc
from cldm.io.assemble import build
from cldm.models.config import UNetConfig
from cldm.models.controlnet_union import ControlNetUnion, UnionConfig

StateDict = dict[str, torch.Tensor]
PROMAX_CONTROL_TYPES = 8  # ProMax adds tile and repaint to the 6 types of controlnet-union-sdxl-1.0


def union_config(state: StateDict, said: dict | None = None) -> UnionConfig:
    """The Union parts' sizes from their shapes (the head count, which shapes cannot show, from a config.json's
    `num_trans_head` when one came with the file, else the published 8)."""
    try:
        types, channels = state["task_embedding"].shape
        type_in = state["control_add_embedding.linear_1.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"Not a ControlNet Union: its `task_embedding` / `control_add_embedding` is missing or "
                              f"misshapen ({e}).") from e  # fmt: skip
    layers = len({k.split(".")[1] for k in state if k.startswith("transformer_layes.")})
    if type_in % types:
        raise CheckpointError(f"The ControlNet Union's type embedding takes {type_in} values, not a multiple of its "
                              f"{types} control types: the file is damaged.")  # fmt: skip
    heads = int((said or {}).get("num_trans_head") or UnionConfig.heads)
    return UnionConfig(int(types), int(channels), heads, layers, type_in // types)


def is_promax(union: UnionConfig) -> bool:
    return union.control_types >= PROMAX_CONTROL_TYPES


def union_from_state(
    state: StateDict, dtype: torch.dtype, cfg: UNetConfig | None = None, said: dict | None = None,
    base: UNetConfig | None = None,
) -> ControlNetUnion:  # fmt: skip
    """A Union from its published state dict. `cfg` comes from the folder's config.json when there is one (`said`,
    the same file's raw fields); otherwise the shapes tell it, and `base` (the UNet it will drive) the head counts."""
    union = union_config(state, said)
    ours = renamed_by_module(state, keymaps.controlnet_modules(mc.diffusers_key_config(state) if cfg is None else cfg))
    if cfg is None:
        cfg = mc.infer_unet_config(ours, base)
    return build(ControlNetUnion, cfg, ours, "ControlNet Union", dtype, union)


def renamed_by_module(state: StateDict, modules: dict[str, tuple[str, dict[str, str]]]) -> StateDict:
    """Diffusers keys -> ours, module by module (the longest diffusers module prefix that matches, then its inner
    names), so that a config read from the keys alone (which knows the modules, not the widths or the transformer
    depths) renames every key; keys outside the table (the Union parts) keep their names."""
    inverse = {theirs: (ours, {t: o for o, t in inner.items()}) for ours, (theirs, inner) in modules.items()}
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            if (prefix := ".".join(parts[:cut])) in inverse:
                ours, inner = inverse[prefix]
                rest = ".".join(parts[cut:])
                head = next((t for t in inner if rest.startswith(t + ".")), None)
                key = f"{ours}.{inner[head] + rest[len(head) :] if head else rest}"
                break
        out[key] = value
    return out


def union_from_folder(folder: Path, state: StateDict, dtype: torch.dtype) -> ControlNetUnion:
    """A Union from a diffusers folder: config.json and diffusion_pytorch_model.safetensors (already read)."""
    said = mc.read_json(folder / "config.json")
    cfg = mc.config_file(mc.unet_config_from_diffusers, folder / "config.json")
    return union_from_state(state, dtype, cfg, said)
