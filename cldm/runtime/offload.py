"""Low VRAM: the big modules rest in CPU memory and come onto the GPU only while they run.

What diffusers calls `enable_model_cpu_offload()` and A1111 `--medvram`. For one request the model manager names
its groups, the modules that run together: the text encoder; the image encoder; the UNet with the request's
ControlNets and IP-Adapter (they run together at every step, and the adapter's key/value layers run inside the
UNet); the VAE. `running()` puts a forward pre-hook on every submodule of them for the length of the request: the
first call into a group's module moves the group that is on the device back to the CPU, then this group onto the
device, and moves the call's tensor arguments there too. When the request ends, also on an error, every group is
back on the CPU and the hooks are gone: between requests the device holds no weights and the modules are plain.

The pipeline puts its new tensors on `model.device` (a UNet weight's device); `view()` gives it the base model with
`device` answering the compute device, wherever the weights are at the moment. Neither the pipeline nor the modules
know of any of this. Peak device memory is about the largest group plus the activations (SD1.5 in fp16: text encoder
0.25 GB, UNet 1.7 GB + 0.7 GB per ControlNet, VAE 0.17 GB) instead of their sum, for a copy of each group over the
bus per stage (and per switch: img2img, reference-only and a hires pass with a pixel upscaler use the VAE between
UNet stages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from cldm.models.sd import StableDiffusion

log = logging.getLogger(__name__)
HOME = torch.device("cpu")


@dataclass(eq=False)
class Group:
    """Modules that run together and are moved together."""

    name: str
    modules: list[nn.Module]


@dataclass
class Placed(StableDiffusion):
    """The base model as the pipeline sees it while offloaded: `device` is where the work runs."""

    compute: torch.device = HOME

    @property
    def device(self) -> torch.device:
        return self.compute


def pointless(device: torch.device) -> str | None:
    """Why offloading from `device` to the CPU would save nothing (None when it would)."""
    if device.type == "cpu":
        return "the model already runs on the CPU"
    if device.type == "mps":
        return "Apple GPUs share their memory with the CPU"
    return None


def _same(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


class Offloader:
    """Moves groups of modules between `home` (where they rest) and `compute` (where they run), one group at a time.

    `moves` counts the group moves and `seconds` adds up their time, over the offloader's life.
    """

    def __init__(self, compute: torch.device | str, home: torch.device | str = HOME):
        compute = torch.device(compute)
        if compute.type == "cuda" and compute.index is None and torch.cuda.is_available():
            compute = torch.device("cuda", torch.cuda.current_device())  # tensors say cuda:0, never plain cuda
        self.compute, self.home = compute, torch.device(home)
        self.groups: list[Group] = []
        self.active: Group | None = None
        self.moves, self.seconds = 0, 0.0

    def view(self, sd: StableDiffusion) -> Placed:
        """`sd` as the pipeline must see it: the same modules, `device` the compute device."""
        return Placed(**{**{f.name: getattr(sd, f.name) for f in fields(sd)}, "compute": self.compute})

    def on_compute(self) -> list[nn.Module]:
        """The modules that are on the compute device now (by this offloader's moves)."""
        return [] if self.active is None else list(self.active.modules)

    @contextmanager
    def running(self, **groups: list[nn.Module | None]) -> Iterator[None]:
        """For one request: each named group (None entries and modules named before are left out) comes onto the
        compute device when one of its modules is called; at the end all are home and unhooked."""
        handles, hooked = [], set()
        self.groups, self.active = [], None
        try:
            for name, listed in groups.items():
                own = [m for m in dict.fromkeys(m for m in listed if m is not None) if id(m) not in hooked]
                if not own:
                    continue
                group = Group(name, own)
                self.groups.append(group)
                hook = self._hook(group)
                for m in own:
                    m.to(self.home)  # a module the caller brought on the device rests too
                    for sub in m.modules():
                        if id(sub) not in hooked:
                            hooked.add(id(sub))
                            handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
            if self.active is not None:
                self._move(self.active, onto=False)
            self.active = None
            for group in self.groups:  # after an error halfway through a move, some may still be on the device
                for m in group.modules:
                    m.to(self.home)
            self.groups = []

    def _hook(self, group: Group):
        def pre_hook(module, args, kwargs):
            if self.active is not group:
                self._switch(group)
            stray = any(isinstance(a, torch.Tensor) and not _same(a.device, self.compute) for a in args) or any(
                isinstance(v, torch.Tensor) and not _same(v.device, self.compute) for v in kwargs.values()
            )
            if not stray:
                return None
            return tuple(self._there(a) for a in args), {k: self._there(v) for k, v in kwargs.items()}

        return pre_hook

    def _there(self, value):
        return value.to(self.compute) if isinstance(value, torch.Tensor) else value

    def _switch(self, group: Group) -> None:
        """The active group back home first, so the device never holds both."""
        if self.active is not None:
            self._move(self.active, onto=False)
            self.active = None
        self._move(group, onto=True)
        self.active = group

    def _move(self, group: Group, onto: bool) -> None:
        t = time.perf_counter()
        device = self.compute if onto else self.home
        for m in group.modules:
            m.to(device)
        if self.compute.type == "cuda":
            torch.cuda.synchronize(self.compute)  # the time counted is the copy's
        self.moves += 1
        self.seconds += time.perf_counter() - t
        log.debug("%s to %s in %.3fs", group.name, device, time.perf_counter() - t)
