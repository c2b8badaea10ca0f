"""Control-LoRA (Stability AI's `control-lora-{canny,depth,recolor,sketch}-rank{128,256}.safetensors`): a ControlNet
built from the base model's own UNet encoder plus the file's changes to it.

The published layout (what Stability's ControlLoraSave node writes; ComfyUI's `ControlLora` and diffusers'
`load_lora_adapter` on `ControlNetModel.from_unet` read it), keys in the original ControlNet names, no prefix:

- `lora_controlnet`: an empty tensor, the marker;
- `<name>.up` (out, r[, 1, 1]) and `<name>.down` (r, in[, kh, kw]) for each weight of two or more dimensions that the
  ControlNet shares with the base UNet (time and label embeddings, input blocks, middle block): the weight is the
  base's plus up.flatten(1) @ down.flatten(1), reshaped. No alpha: the scale is 1 (ComfyUI adds the product as it
  is; diffusers sets lora_alpha = rank). The rank r may differ per layer (min(rank, in, out): 4 for conv_in);
- full tensors for each one-dimensional tensor the ControlNet shares with the base (biases, norm weights) and for
  every tensor the base has not (input_hint_block, zero_convs, middle_block_out): they replace the base's;
- a shared tensor the file does not name is the base's as it is.

The file fixes neither the architecture nor the family: both are the base's (ComfyUI builds the ControlNet from the
base's UNet config), so a file for another family is told from its shapes and refused before anything runs.

One difference from diffusers 0.42.1 (with peft 0.21): there the biases of the layers that get an up/down pair keep
the base's values (the file's are dropped); we set them, as ComfyUI does and as the file's writer meant.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cldm.errors import CheckpointError
from cldm.io import model_configs as mc
from cldm.io.assemble import build, our_keys
from cldm.models.config import UNetConfig, family_of_config
from cldm.models.controlnet import ControlNet
from cldm.models.unet import UNet

StateDict = dict[str, torch.Tensor]
UP, DOWN = ".up", ".down"


def file_family(state: StateDict) -> str:
    """The family a Control-LoRA was made for, from its shapes: SDXL's vector conditioning (label_emb), SD2's linear
    projections in the transformers, else SD1.5."""
    if any(k.startswith("label_emb.") for k in state):
        return "SDXL"
    proj = next((v for k, v in state.items() if k.endswith("proj_in" + DOWN) or k.endswith("proj_in.weight")), None)
    return "SD2.x" if proj is not None and proj.ndim == 2 else "SD1.5"


def _shape_problems(state: StateDict, own: dict[str, tuple[int, ...]]) -> list[str]:
    """The file's tensors that do not fit the ControlNet built on the base (`own`: key -> shape)."""
    out = []
    for k, v in state.items():
        if k.endswith(UP) or k.endswith(DOWN):
            name = k.rsplit(".", 1)[0]
            target, up, down = own.get(name + ".weight"), state.get(name + UP), state.get(name + DOWN)
            fits = (
                target is not None and up is not None and down is not None and up.shape[1] == down.shape[0]
                and up.shape[0] == target[0] and tuple(down.shape[1:]) == tuple(target[1:])
            )  # fmt: skip
        else:
            fits = tuple(v.shape) == own.get(k)
        if not fits:
            out.append(f"{k} {tuple(v.shape)}")
    return out


def _with_base(state: StateDict, unet: UNet, keys: list[str], dtype: torch.dtype, what: str) -> StateDict:
    """The ControlNet's state dict: the base's tensors changed by the file's pairs, replaced by its full tensors."""
    base = unet.state_dict()
    missing = [k for k in keys if k not in state and k not in base]
    if missing:
        raise CheckpointError(f"{what} lacks {len(missing)} tensors of the ControlNet (e.g. {missing[:3]}): the file "
                              "is cut short or is not a Control-LoRA. Download it again.")  # fmt: skip
    out = {}
    for k in keys:
        name = k.removesuffix(".weight")
        if k in state:
            out[k] = state[k].to(dtype)
        elif name + UP in state:
            w = base[k].detach().to("cpu", torch.float32)
            up, down = state[name + UP].float(), state[name + DOWN].float()
            out[k] = (w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)).to(dtype)
        else:
            out[k] = base[k].detach().to("cpu", dtype, copy=True)
    return out


def build_control_lora(state: StateDict, unet: UNet, dtype: torch.dtype = torch.float32, name: str = "") -> ControlNet:
    """The ControlNet of a Control-LoRA state dict on the base `unet` (left unchanged). Refuses a file made for
    another family, or one whose shapes do not fit the base, with what to do."""
    what = f"{name or 'this file'} (a Control-LoRA)"
    base_cfg: UNetConfig = unet.cfg
    ours, theirs = family_of_config(base_cfg), file_family(state)
    if ours != theirs:
        raise CheckpointError(
            f"{what} is made for {theirs} models and the base model is {ours}: a Control-LoRA is built from its base's "
            f"own weights, so it runs only on a {theirs} base. Switch to a {theirs} base model, or use a ControlNet "
            f"made for {ours}."
        )
    state = {k: v for k, v in state.items() if k != "lora_controlnet"}
    if "input_hint_block.0.weight" not in state:
        raise CheckpointError(f"{what} has no input_hint_block: the file is cut short. Download it again.")
    cfg = replace(base_cfg, **mc.hint_fields(state), global_average_pooling=False)
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in ControlNet(cfg).state_dict().items()}
    bad = _shape_problems(state, own)
    if bad:
        raise CheckpointError(f"{what} does not fit the {ours} base model: {len(bad)} tensors of other shapes or names "
                              f"(e.g. {', '.join(bad[:3])}). Use a Control-LoRA made for this base.")  # fmt: skip
    cn = build(ControlNet, cfg, _with_base(state, unet, our_keys(ControlNet, cfg), dtype, what), "Control-LoRA", dtype)
    cn.built_on_base = True  # the model manager drops it when the base changes
    return cn
