"""Faster bf16 convolutions on the CPU: each Conv2d's weights reordered once into oneDNN's own layout.

PyTorch's eager bf16 convolution on the CPU reorders the weights into oneDNN's blocked layout on every call; for
SD's 3x3 convolutions at latent sizes that reorder costs about as much as the arithmetic. Here each convolution
keeps its reordered copy (`torch.ops.mkldnn._reorder_convolution_weight`, the packing torch.compile's freezing pass
does) and calls oneDNN's convolution with it; the activations come out channels-last, which the following group
norms, additions and attention reshapes take as they are. On large feature maps (`LARGE` positions and more) the
arithmetic dwarfs the reorder and oneDNN's own path on a channels-last input is faster: those take it. The results are those of `F.conv2d` (the same oneDNN
kernels, the same bf16 arithmetic).

The packed copy follows the weight: an in-place change (a LoRA merge and its undo) bumps the weight's version and
the next call packs again. Modules off the CPU, in another dtype, or with padding modes other than zeros are left
alone. Only the model manager turns this on (it knows the device and dtype); `python -m cldm bench` measures it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
# Packings kept per convolution: a ControlNet in "ControlNet is more important" mode runs on the conditional half
# (batch 1) and the guidance batch (2) in turn; a third size (a hires pass) replaces the oldest.
SHAPES_KEPT = 2
# From this many positions (64 x 64: the UNet's first level at 512 px, the VAE decoder's upper levels) the packed
# path is slower than oneDNN's plain channels-last one (measured: 320 channels at 64 x 64, 1.65x); below it the
# packing wins (0.25x to 0.75x at 32 x 32 .. 4 x 4).
LARGE = 64 * 64


def available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and mkldnn is not None
        and hasattr(mkldnn, "_reorder_convolution_weight")
        and hasattr(mkldnn, "_convolution_pointwise")
    )


def _fits(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.bfloat16
    )


def _args(m: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(m.padding), list(m.stride), list(m.dilation), m.groups


def _packed_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if x.device.type != "cpu" or x.dtype != w.dtype or w.device.type != "cpu" or x.dim() != 4 or x.requires_grad:
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
    if x.shape[-2] * x.shape[-1] >= LARGE:  # the arithmetic dwarfs the reorder: oneDNN's own path, channels-last
        x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
    if self._cldm_packed_key != (w._version, w.data_ptr()):  # the weight changed in place (LoRA) or moved
        self._cldm_packed.clear()
        self._cldm_packed_key = (w._version, w.data_ptr())
    shape = tuple(x.shape)  # oneDNN picks the weight layout for the problem: one packing per input shape
    packed = self._cldm_packed.get(shape)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_convolution_weight(w.detach(), *_args(self), list(shape))
        self._cldm_packed[shape] = packed
        while len(self._cldm_packed) > SHAPES_KEPT:
            self._cldm_packed.popitem(last=False)
    else:
        self._cldm_packed.move_to_end(shape)
    return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *_args(self), "none", [], "")


def enable(module: nn.Module) -> int:
    """Pack every fitting Conv2d of `module` (lazily, on its first call); returns how many were switched."""
    if not available():
        return 0
    n = 0
    for m in module.modules():
        if _fits(m) and "forward" not in m.__dict__:
            m._cldm_packed, m._cldm_packed_key = OrderedDict(), None
            m.forward = MethodType(_packed_forward, m)
            n += 1
    return n


def disable(module: nn.Module) -> None:
    """Back to plain `F.conv2d` (and the packed copies freed)."""
    for m in module.modules():
        if "_cldm_packed_key" in m.__dict__:
            for name in ("forward", "_cldm_packed", "_cldm_packed_key"):
                m.__dict__.pop(name, None)


def packed_bytes(module: nn.Module) -> int:
    """Memory held by the packed copies (made on first use): as much again as the convolutions' own weights."""
    return sum(
        t.numel() * t.element_size() for m in module.modules() for t in m.__dict__.get("_cldm_packed", {}).values()
    )


def is_enabled(module: nn.Module) -> bool:
    return any("_cldm_packed_key" in m.__dict__ for m in module.modules())
