"""ModelManager: one frozen SD on the device, ControlNets cached in CPU memory and swapped in per request.

Devices and dtypes are chosen by `devices.py`, the only place that decides them.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from cldm.adapters.embeddings import from_state as embedding_from
from cldm.adapters.ip_adapter import IPAdapter, load_ip_adapter
from cldm.adapters.ip_adapter import fit_problem as ip_fit_problem
from cldm.adapters.lora import Lora
from cldm.adapters.lora import parse as lora_parse
from cldm.errors import CheckpointError, InputError
from cldm.io import checkpoints
from cldm.io import hashes as file_hashes
from cldm.io import locate as weights
from cldm.models.controlnet import ControlNet, fit_problem
from cldm.models.image_encoder import ImageEncoder, load_image_encoder
from cldm.models.sd import StableDiffusion
from cldm.models.vae import AutoencoderKL
from cldm.pipeline.request import ControlUnit, GenerationRequest, ImagePrompt
from cldm.pipeline.stages import PreviewCallback, Result, StepCallback, generate
from cldm.runtime import allocator, offload, prepack
from cldm.runtime.devices import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

MAX_LORAS = 8  # parsed LoRAs kept (their tensors stay on the CPU; a merge moves each layer's change over)
DEFAULT_CACHE_BYTES = 4 * 1024**3  # three fp32 SD1.5 ControlNets (1.37 GiB each)


def module_bytes(m: torch.nn.Module) -> int:
    """A module's weights, with the packed copies of its CPU convolutions (what the ControlNet cache counts)."""
    return sum(p.numel() * p.element_size() for p in m.parameters()) + prepack.packed_bytes(m)


class ModelManager:
    """Holds one frozen base model on the device and an LRU of ControlNets in CPU memory (with `low_vram`, all of
    them rest in CPU memory and each stage's modules come onto the device only while it runs: offload.py).

    `run()` takes the lock, moves the request's ControlNets onto the device, generates with the request's own seed,
    and returns a Result with timings (`swap`, `sampling`...). The base model is loaded once, on first use.
    """

    def __init__(
        self,
        base: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        prepack_cpu: bool = True,
        low_vram: bool = False,
        trim_memory: bool = True,
    ):
        self.base_path = base
        self.trim_memory = trim_memory  # freed memory back to the system after each request (allocator.py)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.cache_bytes = cache_bytes
        # bf16 on the CPU: convolutions on weights reordered once for oneDNN (prepack.py; about 1.3x per step)
        self.prepack_cpu = prepack_cpu and self.device.type == "cpu" and self.dtype == torch.bfloat16
        self.lock = threading.RLock()
        # low VRAM: the modules rest in CPU memory and only the running group is on the device (offload.py)
        self.offloader: offload.Offloader | None = None
        if low_vram and (why := offload.pointless(self.device)) is not None:
            log.info("low VRAM asked for on %s: nothing to do (%s)", self.device, why)
        elif low_vram:
            self.offloader = offload.Offloader(self.device)
        self._sd: StableDiffusion | None = None
        self._cache: OrderedDict[tuple, ControlNet] = OrderedDict()  # on the CPU, most recent last
        self._on_device: dict[tuple, ControlNet] = {}
        # the image prompt's modules: one IP-Adapter and one image encoder, on the device, (path, module)
        self._ip: tuple[str, IPAdapter] | None = None
        self._encoder: tuple[str, ImageEncoder] | None = None
        self._loras: OrderedDict[tuple, Lora] = OrderedDict()  # parsed LoRAs, by (path, mtime)
        self._vae: tuple[str, AutoencoderKL] | None = None  # the last VAE a request chose
        self._embeddings_dir: Path | None = None
        self.base_loads = 0
        self.controlnet_loads = 0
        self.ip_loads = 0

    @property
    def sd(self) -> StableDiffusion:
        with self.lock:
            if self._sd is None:
                t = time.perf_counter()
                path = weights.locate_base(self.base_path)
                sd = checkpoints.load_sd(path, dtype=self.dtype)
                sd.hash = file_hashes.short_hash(path)
                self._sd = sd.to(self._rest).freeze()
                self._fast(self._sd.unet, self._sd.vae)
                self.base_loads += 1
                if self._embeddings_dir is not None:  # the textual inversions belong to the text encoder
                    self._read_embeddings(self._sd.text, self._embeddings_dir)
                log.info(
                    "loaded base %s on %s/%s in %.1fs", self.base_path, self.device, self.dtype, time.perf_counter() - t
                )
            return self._sd

    def use_base(self, base: str) -> StableDiffusion:
        """Make `base` the base model. The current one is freed first, so only one base is ever in memory;
        ControlNets, VAEs and the IP-Adapter stay (SD1.5 ones fit every SD1.5 base), LoRAs are matched again and the
        embeddings folder is read again. If `base` cannot be loaded, the previous base is loaded back and the error
        is raised: the server keeps a working model."""
        with self.lock:
            if not str(base).strip():
                raise InputError("base is empty: give a file, a folder or a hub id")
            if _same_place(str(base), self.base_path) and self._sd is not None:
                return self._sd
            weights.locate_base(str(base))  # a missing file or an unreachable hub id is refused before any unload
            previous, had = self.base_path, self._sd is not None
            self._sd = None
            self._loras.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.base_path = str(base)
            try:
                return self.sd
            except Exception:
                self.base_path = previous
                if had:
                    self.sd  # noqa: B018 (loads the previous base back)
                raise

    def controlnet(self, path: str, global_average_pooling: bool | None = None) -> ControlNet:
        """A ControlNet from the cache, loading it (on the CPU) on first use; one that does not fit the base is
        refused here, before any request runs with it, and is not cached."""
        key = (str(path), global_average_pooling)
        with self.lock:
            if key in self._on_device:
                return self._on_device[key]
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            sd = self.sd
            cn = checkpoints.load_controlnet(
                path, dtype=self.dtype, base=sd.config.unet, global_average_pooling=global_average_pooling
            )
            why = fit_problem(cn, sd.config.unet, sd.latent_factor)
            if why is not None:
                raise CheckpointError(
                    f"{_name(path)} does not fit the base model {_name(sd.source)}: {why}. "
                    "Use a ControlNet made for this base (SD1.5 ControlNets for SD1.5 models)."
                )
            self.controlnet_loads += 1
            self._fast(cn)
            self._cache[key] = cn
            self._evict()
            return cn

    def ip_adapter(self, path: str) -> IPAdapter:
        """The IP-Adapter at `path` on the device (one at a time: another one replaces it). One that does not fit the
        base is refused and not kept; the base model is never touched (the adapter only adds tokens)."""
        with self.lock:
            if self._ip is not None and self._ip[0] == str(path):
                return self._ip[1]
            sd = self.sd
            adapter = load_ip_adapter(path, dtype=self.dtype)
            why = ip_fit_problem(adapter, sd.unet)
            if why is not None:
                raise CheckpointError(f"{_name(path)} does not fit the base model {_name(sd.source)}: {why}.")
            self._ip = None  # the old one goes before the new one is on the device
            self._ip = (str(path), adapter.to(self._rest))
            self.ip_loads += 1
            return self._ip[1]

    def lora(self, path: str) -> Lora:
        """The LoRA file at `path`, read and matched to the base's layers (the last few are kept, by path and
        modification time). One for another model family is refused with what it is for."""
        with self.lock:
            p = Path(path)
            key = (str(p), p.stat().st_mtime_ns if p.is_file() else 0)
            if key in self._loras:
                self._loras.move_to_end(key)
                return self._loras[key]
            state, meta = checkpoints.read_file(p), checkpoints.read_metadata(p)
            found = lora_parse(state, self.sd, _name(path).rsplit(".", 1)[0], meta)
            found.hash = file_hashes.lora_hash(p, meta)
            self._loras[key] = found
            while len(self._loras) > MAX_LORAS:
                self._loras.popitem(last=False)
            return found

    def vae(self, path: str) -> AutoencoderKL:
        """The VAE file or folder at `path` on the device (one kept: another one replaces it)."""
        with self.lock:
            if self._vae is not None and self._vae[0] == str(path):
                return self._vae[1]
            vae = checkpoints.load_vae(path, self.sd.config.vae, dtype=self.dtype)
            vae.hash = file_hashes.short_hash(path)  # A1111's "VAE hash"
            self._vae = None  # the old one goes before the new one is on the device
            self._vae = (str(path), vae.to(self._rest))
            self._fast(vae)
            return self._vae[1]

    def load_embeddings(self, folder: str | Path) -> dict[str, str]:
        """Every textual-inversion file in `folder` (.pt, .safetensors, .bin), usable by its file name in any prompt
        (A1111's embeddings folder). Returns the refused ones with why; the others are loaded."""
        with self.lock:
            self._embeddings_dir = Path(folder)
            return self._read_embeddings(self.sd.text, Path(folder))

    @property
    def embedding_count(self) -> int:
        return len(self.sd.text.embeddings)

    def reload_embeddings(self) -> dict[str, str]:
        """The embeddings folder read again (files added, changed or removed since); refused ones with why."""
        with self.lock:
            if self._embeddings_dir is None:
                return {}
            self.sd.text.embeddings.clear()
            return self._read_embeddings(self.sd.text, self._embeddings_dir)

    @staticmethod
    def _read_embeddings(text, folder: Path) -> dict[str, str]:
        refused = {}
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix not in (".pt", ".safetensors", ".bin") or not path.is_file():
                continue
            try:
                state = checkpoints.read_file(path)
                text.embeddings[path.stem] = embedding_from(state, path.stem, text.cfg.hidden_size)
                text.embeddings[path.stem].hash = file_hashes.file_sha256(path)[:12]  # A1111's "TI hashes"
            except (InputError, CheckpointError) as e:
                refused[path.stem] = str(e)
                log.warning("embedding %s refused: %s", path.name, e)
        return refused

    def image_encoder(self, path: str) -> ImageEncoder:
        """The CLIP image encoder folder at `path` on the device (one at a time)."""
        with self.lock:
            if self._encoder is not None and self._encoder[0] == str(path):
                return self._encoder[1]
            encoder = load_image_encoder(path, dtype=self.dtype)
            self._encoder = None
            self._encoder = (str(path), encoder.to(self._rest))
            return self._encoder[1]

    def drop_image_prompt(self) -> None:
        """Free the IP-Adapter and its encoder (the base model is as it was: nothing of them was put into it)."""
        with self.lock:
            self._ip = self._encoder = None

    def _loaded_prompt(self, ip: ImagePrompt | None) -> ImagePrompt | None:
        if ip is None:
            return None
        adapter = ip.adapter if isinstance(ip.adapter, IPAdapter) else self.ip_adapter(str(ip.adapter))
        encoder = ip.encoder if isinstance(ip.encoder, ImageEncoder) else self.image_encoder(str(ip.encoder))
        return replace(ip, adapter=adapter, encoder=encoder, name=ip.label)

    @property
    def _rest(self) -> torch.device:
        """Where the modules stay between requests: the device, or the CPU with low VRAM."""
        return self.device if self.offloader is None else self.offloader.home

    def _fast(self, *modules: torch.nn.Module) -> None:
        if self.prepack_cpu:
            for m in modules:
                prepack.enable(m)

    def _evict(self) -> None:
        while len(self._cache) > 1 and sum(module_bytes(m) for m in self._cache.values()) > self.cache_bytes:
            key, _ = self._cache.popitem(last=False)
            log.info("dropped ControlNet %s from the cache", key[0])

    def _swap_in(self, keys: list[tuple]) -> None:
        """Put the request's ControlNets on the device (loading them if needed) and the others back in the CPU cache.

        The others leave the device first, so device memory never holds both sets; each ControlNet leaves the cache
        as soon as it is loaded, so loading the next one cannot evict it.
        """
        for key in [k for k in self._on_device if k not in keys]:
            self._cache[key] = self._on_device.pop(key).to("cpu")
        for key in keys:
            if key not in self._on_device:
                self.controlnet(*key)
                self._on_device[key] = self._cache.pop(key).to(self._rest)
        self._evict()

    def run(
        self, request: GenerationRequest, callback: StepCallback | None = None,
        preview: PreviewCallback | None = None, preview_every: int = 0,
    ) -> Result:  # fmt: skip
        """Generate under the lock: check the request, load and swap in its ControlNets, sample, decode.

        Units name their ControlNet by file or folder (a unit holding a loaded ControlNet is used as it is). The
        result's timings include `swap` (loading + moving ControlNets) and, on CUDA, `peak_gib`.
        """
        request.validate()  # field values first: nothing is loaded for a request that cannot run
        with self.lock:
            if request.base is not None:  # each request names its base; a switch waits for the lock
                self.use_base(request.base)
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)  # the peak reported is this request's
            sd = self.sd
            keys = [_key(u) for u in request.units]
            self._swap_in([k for k in keys if k is not None])
            swap = time.perf_counter() - t0
            units = tuple(
                u if k is None else replace(u, model=self._on_device[k], name=u.label)
                for u, k in zip(request.units, keys)
            )
            image_prompt = self._loaded_prompt(request.image_prompt)
            loras = tuple(u if isinstance(u.model, Lora) else replace(u, model=self.lora(str(u.model)))
                          for u in request.loras)  # fmt: skip
            swap = time.perf_counter() - t0
            vae = (
                request.vae
                if request.vae is None or isinstance(request.vae, AutoencoderKL)
                else self.vae(str(request.vae))
            )
            request = replace(request, units=units, image_prompt=image_prompt, loras=loras, vae=vae)
            try:
                run = generate if self.offloader is None else self._offloaded
                result = run(sd, request, callback, preview, preview_every)
            finally:
                if self.trim_memory:
                    allocator.trim()
            result.timings["swap"] = swap
            if self.device.type == "cuda":
                result.timings["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 1024**3
            return result

    def _offloaded(self, sd: StableDiffusion, request: GenerationRequest, *args) -> Result:
        """generate() with only the running stage's modules on the device, all back on the CPU after."""
        ip, off, seconds = request.image_prompt, self.offloader, self.offloader.seconds
        cns = [u.model for u in request.units]  # they run with the UNet at every step: one group
        vae = sd.vae if request.vae is None else request.vae
        with off.running(text=[sd.text], image=[ip and ip.encoder], unet=[sd.unet, *cns, ip and ip.adapter], vae=[vae]):
            result = generate(off.view(sd), request, *args)
        result.timings["offload"] = off.seconds - seconds  # the copies between the CPU and the device
        return result


def _same_place(a: str, b: str) -> bool:
    """The same base, however spelled (a trailing slash, a relative path)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _key(u: ControlUnit) -> tuple | None:
    """The cache key of a unit's ControlNet file (None for a unit that brings a loaded ControlNet)."""
    return None if isinstance(u.model, ControlNet) else (str(u.model), u.global_average_pooling)


def _name(path: str) -> str:
    return str(path).rstrip("/").split("/")[-1]
