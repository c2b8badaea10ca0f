"""ModelManager: one frozen SD on the device, ControlNets cached in CPU memory and swapped in per request.

The only module that decides devices and dtypes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoints, weights
from .controlnet import ControlNet
from .errors import InputError
from .pipeline import Control, Result, generate
from .sd import StableDiffusion

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CACHE_BYTES = 4 * 1024**3  # three fp32 SD1.5 ControlNets (1.37 GiB each)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but Metal is not available. Use --device cpu or auto.")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': fp16 on GPUs (half the memory, tensor cores), fp32 on the CPU (fp16 matmuls are slow there)."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("This GPU has no bf16 support; use --dtype fp16.")
    return DTYPES[name]


def module_bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


@dataclass
class ControlSpec:
    """What a request asks of one ControlNet: which weights, which hint, how strongly and when."""

    path: str
    hint: np.ndarray | torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    global_average_pooling: bool | None = None


class ModelManager:
    """Holds one frozen base model on the device and an LRU of ControlNets in CPU memory.

    `run()` takes the lock, moves the request's ControlNets onto the device, generates with the request's own seed,
    and returns a Result with timings (`swap`, `sampling`...). The base model is loaded once, on first use.
    """

    def __init__(
        self,
        base: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        tokenizer=None,
    ):
        self.base_path = base
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.cache_bytes = cache_bytes
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self._sd: StableDiffusion | None = None
        self._cache: OrderedDict[tuple, ControlNet] = OrderedDict()  # on the CPU, most recent last
        self._on_device: dict[tuple, ControlNet] = {}
        self.base_loads = 0
        self.controlnet_loads = 0

    @property
    def sd(self) -> StableDiffusion:
        with self.lock:
            if self._sd is None:
                t = time.perf_counter()
                sd = checkpoints.load_sd(
                    weights.locate_base(self.base_path), dtype=self.dtype, tokenizer=self.tokenizer
                )
                self._sd = sd.to(self.device).freeze()
                self.base_loads += 1
                log.info(
                    "loaded base %s on %s/%s in %.1fs", self.base_path, self.device, self.dtype, time.perf_counter() - t
                )
            return self._sd

    def controlnet(self, path: str, global_average_pooling: bool | None = None) -> ControlNet:
        """A ControlNet from the cache, loading it (on the CPU) on first use."""
        key = (str(path), global_average_pooling)
        with self.lock:
            if key in self._on_device:
                return self._on_device[key]
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            cn = checkpoints.load_controlnet(
                path, dtype=self.dtype, base=self.sd.config.unet, global_average_pooling=global_average_pooling
            )
            self.controlnet_loads += 1
            self._cache[key] = cn
            self._evict()
            return cn

    def _evict(self) -> None:
        while len(self._cache) > 1 and sum(module_bytes(m) for m in self._cache.values()) > self.cache_bytes:
            key, _ = self._cache.popitem(last=False)
            log.info("dropped ControlNet %s from the cache", key[0])

    def _swap_in(self, keys: list[tuple]) -> None:
        """Move the request's ControlNets onto the device and the others back to the CPU cache."""
        for key in keys:
            if key not in self._on_device:
                self._on_device[key] = self._cache.pop(key).to(self.device)
        for key in [k for k in self._on_device if k not in keys]:
            self._cache[key] = self._on_device.pop(key).to("cpu")
        self._evict()

    def run(self, prompt: str, controls: Sequence[ControlSpec] = (), **kwargs) -> Result:
        """Generate under the lock; kwargs go to `pipeline.generate` (steps, cfg_scale, sampler, seed, ...)."""
        with self.lock:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)  # the peak reported is this request's
            sd = self.sd
            keys = [(str(c.path), c.global_average_pooling) for c in controls]
            for c in controls:
                self.controlnet(c.path, c.global_average_pooling)
            self._swap_in(keys)
            swap = time.perf_counter() - t0
            units = [
                Control(self._on_device[k], c.hint, c.scale, c.start, c.end, name=_stem(c.path))
                for k, c in zip(keys, controls)
            ]
            result = generate(sd, prompt, controls=units, **kwargs)
            result.timings["swap"] = swap
            if self.device.type == "cuda":
                result.timings["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 1024**3
            return result


def _stem(path: str) -> str:
    name = str(path).rstrip("/").split("/")[-1]
    return name.rsplit(".", 1)[0] if "." in name else name
