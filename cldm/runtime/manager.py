"""ModelManager: one frozen SD on the device, ControlNets cached in CPU memory and swapped in per request.

The manager uses the runtime's parts: `devices.py` chooses the device and dtype, `cache.py` is the keyed LRU every
loaded model is kept in, `base_slot.py` holds the one base model and switches it, `offload.py` and `prepack.py` are
the low-VRAM and bf16-on-CPU paths. What stays here is what ties them: one lock, loading each kind of model, and
`run()`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from cldm.adapters.ip_adapter import IPAdapter, load_ip_adapter
from cldm.adapters.ip_adapter import fit_problem as ip_fit_problem
from cldm.adapters.lora import Lora
from cldm.adapters.lora import parse as lora_parse
from cldm.errors import CheckpointError
from cldm.io import checkpoints, clip_vision, files, hashes, locate, t2i_adapters
from cldm.io.image_encoder import load_image_encoder
from cldm.models.controlnet import ControlNet, fit_problem
from cldm.models.image_encoder import ImageEncoder
from cldm.models.sd import StableDiffusion
from cldm.models.t2i_adapter import StyleAdapter
from cldm.models.t2i_adapter import fit_problem as t2i_fit_problem
from cldm.models.taesd import TinyAutoencoder
from cldm.models.vae import AutoencoderKL
from cldm.pipeline.extras import MAX_IMAGE_PROMPTS
from cldm.pipeline.request import ControlUnit, GenerationRequest, ImagePrompt
from cldm.pipeline.stages import PreviewCallback, Result, StepCallback, generate
from cldm.pipeline.vae_choice import LOADED_VAES, preview_decoder
from cldm.runtime import allocator, offload, prepack
from cldm.runtime.base_slot import BaseSlot
from cldm.runtime.cache import LRUCache
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
        self.trim_memory = trim_memory  # freed memory back to the system after each request (allocator.py)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # bf16 on the CPU: convolutions on weights reordered once for oneDNN (prepack.py; about 1.3x per step)
        self.prepack_cpu = prepack_cpu and self.device.type == "cpu" and self.dtype == torch.bfloat16
        self.lock = threading.RLock()
        # low VRAM: the modules rest in CPU memory and only the running group is on the device (offload.py)
        self.offloader: offload.Offloader | None = None
        if low_vram and (why := offload.pointless(self.device)) is not None:
            log.info("low VRAM asked for on %s: nothing to do (%s)", self.device, why)
        elif low_vram:
            self.offloader = offload.Offloader(self.device)
        self._base = BaseSlot(base, self._load_base, self.device)
        # ControlNets by (path, global_average_pooling), on the CPU; the request's ones leave it for `_on_device`
        self._controlnets: LRUCache[tuple, ControlNet] = LRUCache(
            "ControlNet", max_bytes=cache_bytes, size_of=module_bytes
        )
        self._on_device: dict[tuple, ControlNet] = {}
        self._loras: LRUCache[tuple, Lora] = LRUCache("LoRA", max_items=MAX_LORAS)  # parsed, by (path, mtime)
        # on the device (with low VRAM, in CPU memory): the last request's image prompts (`_loaded_prompts` drops
        # the others before a request loads its own) and one VAE (another one replaces it)
        self._ip_adapters: LRUCache[str, IPAdapter] = LRUCache("IP-Adapter", max_items=MAX_IMAGE_PROMPTS)
        self._image_encoders: LRUCache[str, ImageEncoder] = LRUCache("image encoder", max_items=MAX_IMAGE_PROMPTS)
        self._vaes: LRUCache[str, AutoencoderKL | TinyAutoencoder] = LRUCache("VAE", max_items=1)
        self._preview_vaes: LRUCache[str, AutoencoderKL | TinyAutoencoder] = LRUCache("preview VAE", max_items=1)
        self.controlnet_loads = 0
        self.ip_loads = 0

    @property
    def base_path(self) -> str:
        """The base model's file, folder or hub id."""
        return self._base.path

    @property
    def base_loads(self) -> int:
        return self._base.loads

    @property
    def cache_bytes(self) -> int:
        """CPU memory for the ControlNets not in use (`--cache-gb`); the most recent one stays even if larger."""
        return self._controlnets.max_bytes

    @property
    def sd(self) -> StableDiffusion:
        """The base model, loaded on first use."""
        with self.lock:
            return self._base.model

    @property
    def loaded(self) -> bool:
        """Whether the base model is in memory now."""
        return self._base.loaded

    def use_base(self, base: str) -> StableDiffusion:
        """Make `base` the base model. The current one is freed first, so only one base is ever in memory;
        ControlNets, VAEs and the IP-Adapter stay while the family stays (SD1.5 ones fit every SD1.5 base) and are
        dropped when it changes (an SDXL base after an SD1.5 one); LoRAs are matched again and the embeddings folder
        is read again. If `base` cannot be loaded, the previous base is loaded back and the error is raised: the
        server keeps a working model."""
        with self.lock:
            before = self._base.family
            sd = self._base.switch(str(base), unload=self._unload)
            if before is not None and sd.family.name != before:
                self._drop_family_bound(before, sd.family.name)
            return sd

    def _unload(self) -> None:
        """Before a base switch: LoRAs go (they are matched to the base's layers), the ControlNets on the device go
        back to the CPU cache, so the device holds nothing of the old base while the new one loads. Control-LoRAs
        go altogether: they were built from the old base's weights (the next request builds them on the new one)."""
        self._loras.clear()
        for key in list(self._on_device):
            cn = self._on_device.pop(key)
            if not getattr(cn, "built_on_base", False):
                self._controlnets.put(key, cn.to("cpu"), evict=False)
        for key in [k for k in self._controlnets.keys() if getattr(self._controlnets.get(k), "built_on_base", False)]:
            self._controlnets.pop(key)

    def _drop_family_bound(self, old: str, new: str) -> None:
        """The models made for the old family cannot drive the new one: ControlNets, IP-Adapter, image encoder and
        VAE leave memory."""
        n = len(self._controlnets)
        for cache in (self._controlnets, self._ip_adapters, self._image_encoders, self._vaes, self._preview_vaes):
            cache.clear()
        log.info("base family %s -> %s: %d cached ControlNets and the adapters of %s dropped", old, new, n, old)

    def _load_base(self, path: str) -> StableDiffusion:
        t = time.perf_counter()
        found = locate.locate_base(path)
        sd = checkpoints.load_sd(found, dtype=self.dtype)
        sd.hash = hashes.short_hash(found)
        sd = sd.to(self._rest).freeze()
        self._fast(sd.unet, sd.vae)
        log.info("loaded base %s on %s/%s in %.1fs", path, self.device, self.dtype, time.perf_counter() - t)
        return sd

    def controlnet(self, path: str, global_average_pooling: bool | None = None) -> ControlNet:
        """A ControlNet from the cache, loading it (on the CPU) on first use; one that does not fit the base is
        refused here, before any request runs with it, and is not cached."""
        key = (str(path), global_average_pooling)
        with self.lock:
            if key in self._on_device:
                return self._on_device[key]
            if (cached := self._controlnets.get(key)) is not None:
                return cached
            sd = self.sd
            if t2i_adapters.is_t2i_adapter(path):  # told from the content; cached and swapped like a ControlNet
                cn = t2i_adapters.load_t2i_adapter(path, dtype=self.dtype)
                kind, why = "T2I-Adapter", t2i_fit_problem(cn, sd.config.unet, sd.family.name, sd.latent_factor)
            else:
                cn = checkpoints.load_controlnet(path, dtype=self.dtype, base=sd.config.unet,
                                                 global_average_pooling=global_average_pooling, unet=sd.unet)  # fmt: skip
                kind, why = "ControlNet", fit_problem(cn, sd.config.unet, sd.latent_factor)
            if why is not None:
                raise CheckpointError(
                    f"{_name(path)} does not fit the base model {_name(sd.source)}: {why}. "
                    f"Use a {kind} made for {sd.family.name} models."
                )
            if isinstance(cn, StyleAdapter):  # with its CLIP ViT-L/14: beside the file, else from the hub
                cn = clip_vision.style_control(cn, Path(path).parent, self.dtype)
            self.controlnet_loads += 1
            self._fast(cn)
            self._controlnets.put(key, cn)
            return cn

    def ip_adapter(self, path: str) -> IPAdapter:
        """The IP-Adapter at `path` on the device (kept with the others of the last request that had image prompts).
        One that does not fit the base is refused and not kept; the base model is never touched (the adapter only
        adds tokens)."""
        with self.lock:
            if (cached := self._ip_adapters.get(str(path))) is not None:
                return cached
            sd = self.sd
            adapter = load_ip_adapter(path, dtype=self.dtype)
            why = ip_fit_problem(adapter, sd.unet)
            if why is not None:
                raise CheckpointError(f"{_name(path)} does not fit the base model {_name(sd.source)}: {why}.")
            adapter = adapter.to(self._rest)
            self._ip_adapters.put(str(path), adapter)
            self.ip_loads += 1
            return adapter

    def lora(self, path: str) -> Lora:
        """The LoRA file at `path`, read and matched to the base's layers (the last few are kept, by path and
        modification time). One for another model family is refused with what it is for."""
        with self.lock:
            p = Path(path)
            key = (str(p), p.stat().st_mtime_ns if p.is_file() else 0)
            if (cached := self._loras.get(key)) is not None:
                return cached
            state, meta = files.read_file(p), files.read_metadata(p)
            found = lora_parse(state, self.sd, _name(path).rsplit(".", 1)[0], meta)
            found.hash = hashes.lora_hash(p, meta)
            self._loras.put(key, found)
            return found

    def vae(self, path: str, preview: bool = False) -> AutoencoderKL | TinyAutoencoder:
        """The VAE file or folder at `path` on the device, a TAESD too (one kept for the pictures and one for the
        live previews: another one replaces it). One for another latent space is refused before it is kept."""
        cache = self._preview_vaes if preview else self._vaes
        with self.lock:
            if (cached := cache.get(str(path))) is not None:
                return cached
            vae = checkpoints.load_vae(path, self.sd.config.vae, dtype=self.dtype)
            vae.hash = hashes.short_hash(path)  # A1111's "VAE hash"
            cache.clear()  # the old one goes before the new one is on the device
            vae = vae.to(self._rest)
            cache.put(str(path), vae)
            self._fast(vae)
            return vae

    def load_embeddings(self, folder: str | Path) -> dict[str, str]:
        """Every textual-inversion file in `folder` (.pt, .safetensors, .bin), usable by its file name in any prompt
        (A1111's embeddings folder). Returns the refused ones with why; the others are loaded."""
        with self.lock:
            return self._base.load_embeddings(Path(folder))

    @property
    def embedding_count(self) -> int:
        return len(self.sd.text.embeddings)

    def reload_embeddings(self) -> dict[str, str]:
        """The embeddings folder read again (files added, changed or removed since); refused ones with why."""
        with self.lock:
            return self._base.reload_embeddings()

    def image_encoder(self, path: str) -> ImageEncoder:
        """The CLIP image encoder folder at `path` on the device (kept with the others of the last request that had
        image prompts)."""
        with self.lock:
            if (cached := self._image_encoders.get(str(path))) is not None:
                return cached
            encoder = load_image_encoder(path, dtype=self.dtype)
            encoder = encoder.to(self._rest)
            self._image_encoders.put(str(path), encoder)
            return encoder

    def drop_image_prompt(self) -> None:
        """Free the IP-Adapter and its encoder (the base model is as it was: nothing of them was put into it)."""
        with self.lock:
            self._ip_adapters.clear()
            self._image_encoders.clear()

    def _loaded_prompts(self, prompts: tuple[ImagePrompt, ...]) -> tuple[ImagePrompt, ...]:
        """The request's image prompts with their adapters and encoders loaded; the cached ones this request does
        not name leave the device first, so device memory never holds two requests' sets."""
        if prompts:
            for cache, named in ((self._ip_adapters, {str(p.adapter) for p in prompts}),
                                 (self._image_encoders, {str(p.encoder) for p in prompts})):  # fmt: skip
                for key in [k for k in cache.keys() if k not in named]:
                    cache.pop(key)
        return tuple(self._loaded_prompt(p) for p in prompts)

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

    def _swap_in(self, keys: list[tuple]) -> None:
        """Put the request's ControlNets on the device (loading them if needed) and the others back in the CPU cache.

        The others leave the device first, so device memory never holds both sets; each ControlNet leaves the cache
        as soon as it is loaded, so loading the next one cannot evict it.
        """
        for key in [k for k in self._on_device if k not in keys]:
            self._controlnets.put(key, self._on_device.pop(key).to("cpu"), evict=False)
        for key in keys:
            if key not in self._on_device:
                self.controlnet(*key)
                self._on_device[key] = self._controlnets.pop(key).to(self._rest)
        self._controlnets.evict()

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
            units = tuple(
                u if k is None else replace(u, model=self._on_device[k], name=u.label)
                for u, k in zip(request.units, keys)
            )
            loaded = self._loaded_prompts(request.all_image_prompts)
            first = int(request.image_prompt is not None)  # `image_prompt` is the first of them, when given
            image_prompt, image_prompts = (loaded[0] if first else None), loaded[first:]
            loras = tuple(u if isinstance(u.model, Lora) else replace(u, model=self.lora(str(u.model)))
                          for u in request.loras)  # fmt: skip
            swap = time.perf_counter() - t0
            vae, preview_vae = (v if v is None or isinstance(v, LOADED_VAES) else self.vae(str(v), preview=i == 1)
                                for i, v in enumerate((request.vae, request.preview_vae)))  # fmt: skip
            request = replace(request, units=units, image_prompt=image_prompt, image_prompts=image_prompts,
                              loras=loras, vae=vae, preview_vae=preview_vae)  # fmt: skip
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
        ips, off, seconds = request.all_image_prompts, self.offloader, self.offloader.seconds
        cns = [u.model for u in request.units]  # they run with the UNet at every step: one group
        vae = sd.vae if request.vae is None else request.vae
        image, adapters = [p.encoder for p in ips], [p.adapter for p in ips]
        unet = [sd.unet, *cns, *adapters, preview_decoder(request)]  # a preview TAESD decodes between the steps
        with off.running(text=sd.texts, image=image, unet=unet, vae=[vae]):
            result = generate(off.view(sd), request, *args)
        result.timings["offload"] = off.seconds - seconds  # the copies between the CPU and the device
        return result


def _key(u: ControlUnit) -> tuple | None:
    """The cache key of a unit's ControlNet file (None for a unit that brings a loaded ControlNet)."""
    return None if isinstance(u.model, torch.nn.Module) else (str(u.model), u.global_average_pooling)


def _name(path: str) -> str:
    return str(path).rstrip("/").split("/")[-1]
