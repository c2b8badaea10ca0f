"""T2I-Adapter files: TencentARC's original `.pth` / `.safetensors` (keys `conv_in.*`, `body.N.*`, `style_embedding`)
and diffusers' layout (a `T2IAdapter` save_pretrained folder or its weights file: keys `adapter.*`), told apart and
configured from their keys and shapes, renamed to the original keys and built (`cldm.models.t2i_adapter`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from cldm.errors import CheckpointError
from cldm.io import model_configs as mc
from cldm.io.assemble import build
from cldm.io.files import read_file, read_folder, read_shapes
from cldm.models.t2i_adapter import ADAPTER_CLASSES, AdapterConfig

StateDict = dict[str, torch.Tensor]
DIFFUSERS_PREFIX = "adapter."
DIFFUSERS_CLASS = "T2IAdapter"


def is_t2i_adapter_state(state: dict) -> bool:
    """Whether a state dict (or a header's key -> shape) is a T2I-Adapter, in either layout."""
    keys = {k.removeprefix(DIFFUSERS_PREFIX) for k in state}
    full = "conv_in.weight" in keys and ("body.0.block1.weight" in keys or "body.0.resnets.0.block1.weight" in keys)
    light = "conv_in.weight" not in keys and "body.0.in_conv.weight" in keys and "body.0.out_conv.weight" in keys
    return full or light or ("style_embedding" in keys and "proj" in keys)


def is_t2i_adapter(path: str | os.PathLike) -> bool:
    """Whether the file or folder at `path` holds a T2I-Adapter (a folder by its config's class, a file by its keys;
    a safetensors file by its header alone)."""
    path = Path(path)
    if path.is_dir():
        cfg = path / "config.json"
        return cfg.is_file() and mc.read_json(cfg).get("_class_name") == DIFFUSERS_CLASS
    return path.is_file() and is_t2i_adapter_state(read_shapes(path))


# ------------------------------------------------------------------------------------------- diffusers layout
_FULL = re.compile(r"body\.(\d+)\.(resnets\.(\d+)\.)?(.*)")


def from_diffusers(state: StateDict) -> StateDict:
    """diffusers' T2IAdapter keys -> the original ones.

    Full (and XL): `body.i.resnets.j.X` -> `body.(i * n + j).X` and `body.i.in_conv` -> `body.(i * n).in_conv`
    (n blocks a level); light: `body.i.resnets.j.X` -> `body.i.body.j.X`, its in_conv / out_conv keep their place.
    """
    state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in state.items()}
    light = "conv_in.weight" not in state
    blocks = 1 + max((int(m.group(3)) for k in state if (m := _FULL.match(k)) and m.group(3)), default=0)
    out = {}
    for k, v in state.items():
        m = _FULL.match(k)
        if m is None:
            out[k] = v
            continue
        level, block, rest = int(m.group(1)), m.group(3), m.group(4)
        if light:
            out[f"body.{level}.body.{block}.{rest}" if block else k] = v
        else:
            out[f"body.{level * blocks + int(block or 0)}.{rest}"] = v
    return out


# ---------------------------------------------------------------------------------------------- configuration
def _unshuffle(in_channels: int) -> tuple[int, int]:
    """(hint channels, unshuffle factor) from the first conv's input channels: hint_channels * factor ** 2, with 3
    (a picture) or 1 (the sketch / canny adapters' grey) hint channels."""
    for hint in (3, 1):
        root = math.isqrt(in_channels // hint)
        if in_channels % hint == 0 and root * root * hint == in_channels:
            return hint, root
    raise CheckpointError(
        f"This T2I-Adapter's first layer takes {in_channels} channels, which is no picture unshuffled: the file is damaged "
        "or another kind of model."
    )


def adapter_config(state: StateDict, xl: bool | None = None) -> AdapterConfig:
    """The config of an adapter in the original keys, from its shapes. `xl` (a diffusers config's adapter_type)
    overrides the layout the unshuffle factor implies (16 = SDXL's, 8 = SD1.5's)."""
    if "style_embedding" in state:
        _, tokens, width = state["style_embedding"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_layes."))
        return AdapterConfig(kind="style", width=width, context_dim=state["proj"].shape[1], layers=layers,
                             num_tokens=tokens)  # fmt: skip
    body = {k.split(".")[1] for k in state if k.startswith("body.")}
    if "conv_in.weight" in state:
        hint, factor = _unshuffle(state["conv_in.weight"].shape[1])
        width = [state[f"body.{i}.block1.weight"].shape[0] for i in range(len(body))]
        per_level = _blocks_per_level(state, width)
        cfg = AdapterConfig("full", hint, tuple(width[::per_level]), per_level, factor,
                            kernel=state["body.0.block2.weight"].shape[-1])  # fmt: skip
    else:
        hint, factor = _unshuffle(state["body.0.in_conv.weight"].shape[1])
        channels = tuple(state[f"body.{i}.out_conv.weight"].shape[0] for i in range(len(body)))
        blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("body.0.body."))
        cfg = AdapterConfig("light", hint, channels, blocks, factor)
    return replace(cfg, xl=factor == 16 if xl is None else xl)


def _blocks_per_level(state: StateDict, width: list[int]) -> int:
    """The ResnetBlocks per level of a full adapter: the first block that changes the width starts level 1 (the
    published files: 2); with no width change at all, every block is its own level."""
    first = next((i for i in range(1, len(width)) if f"body.{i}.in_conv.weight" in state), None)
    if first is None:
        raise CheckpointError("This T2I-Adapter's levels cannot be read: no block changes the width.")
    return first


# -------------------------------------------------------------------------------------------------------- load
def load_t2i_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a T2I-Adapter: an original TencentARC file (full, light or style adapter) or a diffusers T2IAdapter
    folder / weights file (full, light, full_adapter_xl). Raises CheckpointError for anything else."""
    path = Path(path)
    xl = None
    if path.is_dir():
        config = mc.read_json(path / "config.json") if (path / "config.json").is_file() else {}
        if config.get("_class_name") != DIFFUSERS_CLASS:
            raise CheckpointError(
                f"{path} is a folder but not a diffusers T2IAdapter (its config.json says otherwise)."
            )
        xl = config.get("adapter_type") == "full_adapter_xl"
        state = read_folder(path)
    else:
        state = read_file(path)
    if not is_t2i_adapter_state(state):
        raise CheckpointError(f"{path.name} is not a T2I-Adapter (keys like {list(state)[:3]}).")
    if any(k.startswith(DIFFUSERS_PREFIX) for k in state):
        state = from_diffusers(state)
    cfg = adapter_config(state, xl)
    adapter = build(ADAPTER_CLASSES[cfg.kind], cfg, state, "T2I-Adapter", dtype)
    adapter.source = path.name
    return adapter
