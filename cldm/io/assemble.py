"""State dicts into modules: built on the meta device, taken strictly, refused when not finite.

`checkpoints.py` reads the files; this module only turns tensors into a UNet, VAE, text encoder or ControlNet.
"""

from __future__ import annotations

import torch
from torch import nn

from cldm.errors import CheckpointError
from cldm.io.pages import PageReleaser
from cldm.models.text import TextEncoder

POSITION_IDS = "transformer.text_model.embeddings.position_ids"  # a constant CLIP rebuilds (never loaded)

StateDict = dict[str, torch.Tensor]


def _finite(v: torch.Tensor) -> bool:
    """No NaN or infinity: the smallest and largest values are finite (NaN propagates through both). One reduction
    pass without a tensor-sized temporary (torch.isfinite(v).all() took 5 s for a ControlNet here)."""
    if not v.is_floating_point() or v.numel() == 0:
        return True
    lo, hi = torch.aminmax(v)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def check_finite(state: StateDict, what: str) -> None:
    bad = [k for k, v in state.items() if not _finite(v)]
    if bad:
        raise CheckpointError(
            f"The {what} weights contain NaN or infinite values ({len(bad)} tensors, e.g. {', '.join(bad[:3])}): "
            "the file is corrupt or came from a diverged training run. Use another file."
        )


def build(cls, cfg, state: StateDict, what: str, dtype: torch.dtype, *args) -> nn.Module:
    """Make `cls(cfg)` on the meta device (no wasted random init), then take the weights strictly.

    The weights are checked after the conversion to `dtype` (a value too large for fp16 is refused too), and each
    source tensor is dropped from `state` as soon as its copy exists, so loading needs the module's memory plus
    one tensor, not two copies of the model."""
    with torch.device("meta"):
        module = cls(cfg, *args)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"These weights do not fit the {what}: {len(missing)} missing keys (e.g. {missing[:5]}) and "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]}). The file is probably another kind of model "
            "(a LoRA, an adapter...) or a damaged or unfinished download; pick a file of that kind (docs/formats.md "
            "lists the layouts read)."
        )
    # Every tensor gets its own storage from torch's allocator (64-byte aligned), in the asked dtype. Readers hand out
    # tensors at whatever offset their buffer had (safetensors: 16 bytes past a 64-byte boundary), and on AVX-512 CPUs
    # oneDNN's results depend on that alignment, so the same weights from two file formats gave pictures differing in
    # the last bits. The copy also lets the reader's buffers go.
    converted, pages = {}, PageReleaser()
    for k in list(state):
        v = state.pop(k)
        converted[k] = v.to(dtype if v.is_floating_point() else v.dtype, copy=True)
        pages.release(v)  # a memory-mapped file's pages under it: the copy has them now
        del v
    state = converted
    check_finite(state, what)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        msg = str(e).split("\n", 2)
        raise CheckpointError(f"These weights do not fit the {what}: {' '.join(msg[1:])[:600]}") from e
    module.to(dtype)
    return module.requires_grad_(False).eval()


def our_keys(cls, cfg, *args) -> list[str]:
    """The state-dict keys of `cls(cfg)`, without allocating its weights."""
    with torch.device("meta"):
        return list(cls(cfg, *args).state_dict())


def text_from_diffusers(state: StateDict) -> StateDict:
    """A diffusers text-encoder state dict -> our keys (`transformer.text_model.*`, and `text_projection.weight` of
    CLIPTextModelWithProjection as it is)."""
    # transformers 4 wrote `text_model.*`; transformers 5 may write the inner names directly.
    out = {}
    for k, v in state.items():
        if k.startswith("text_projection."):
            out[k] = v
            continue
        out["transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    out.pop(POSITION_IDS, None)
    return out


def build_text(cfg, state: StateDict, dtype: torch.dtype, tokenizer) -> TextEncoder:
    text = build(TextEncoder, cfg, state, "text encoder", dtype, tokenizer)
    text.reset_buffers()
    return text
