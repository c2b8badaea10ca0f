"""The base model slot: one SD base in memory at a time, loaded on first use, switched with a way back, and the
textual-inversion folder read into its text encoder."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from cldm.adapters.embeddings import install as install_embedding
from cldm.errors import CheckpointError, InputError
from cldm.io import files, hashes, locate
from cldm.models.sd import StableDiffusion

log = logging.getLogger(__name__)
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


class BaseSlot:
    """Holds the one base model; `load(path)` makes one (the manager's: dtype, device, prepacking)."""

    def __init__(self, path: str, load: Callable[[str], StableDiffusion], device: torch.device):
        self.path = path
        self.loads = 0
        self.embeddings_dir: Path | None = None  # read again into each base loaded
        self._load = load
        self._device = device
        self._sd: StableDiffusion | None = None

    @property
    def loaded(self) -> bool:
        return self._sd is not None

    @property
    def family(self) -> str | None:
        """The loaded base's family name (None before the first load)."""
        return None if self._sd is None else self._sd.family.name

    @property
    def model(self) -> StableDiffusion:
        """The base, loaded on first use."""
        if self._sd is None:
            sd = self._load(self.path)
            self._sd = sd
            self.loads += 1
            if self.embeddings_dir is not None:  # the textual inversions belong to the text encoder(s)
                read_embeddings(sd, self.embeddings_dir)
        return self._sd

    def switch(self, path: str, unload: Callable[[], None]) -> StableDiffusion:
        """Make `path` the base. The current one is freed first (with what `unload` drops: what was matched to it),
        so only one base is ever in memory. If `path` cannot be loaded, the previous base is loaded back and the
        error is raised: the caller keeps a working model."""
        if not str(path).strip():
            raise InputError("base is empty: give a file, a folder or a hub id")
        if _same_place(path, self.path) and self._sd is not None:
            return self._sd
        locate.locate_base(path)  # a missing file or an unreachable hub id is refused before any unload
        previous, had = self.path, self._sd is not None
        self._sd = None
        unload()
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        self.path = path
        try:
            return self.model
        except Exception:
            self.path = previous
            if had:
                self.model  # noqa: B018 (loads the previous base back)
            raise

    def load_embeddings(self, folder: Path) -> dict[str, str]:
        """Every textual-inversion file in `folder` added to the text encoder; the refused ones with why."""
        sd = self.model
        self.embeddings_dir = folder
        return read_embeddings(sd, folder)

    def reload_embeddings(self) -> dict[str, str]:
        """The embeddings folder read again from scratch (files added, changed or removed since)."""
        if self.embeddings_dir is None:
            return {}
        sd = self.model
        for text in sd.texts:
            text.embeddings.clear()
        return read_embeddings(sd, self.embeddings_dir)


def read_embeddings(sd, folder: Path) -> dict[str, str]:
    """Each embedding file in `folder` into the text encoders' `embeddings` by its file name (SDXL: clip_l to
    `sd.text`, clip_g to `sd.text_2`); the refused ones with why (another family's are skipped, as A1111 does)."""
    refused = {}
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.suffix not in EMBEDDING_SUFFIXES or not path.is_file():
            continue
        try:
            state = files.read_file(path)
            install_embedding(sd, state, path.stem, hashes.file_sha256(path)[:12])  # A1111's "TI hashes"
        except (InputError, CheckpointError) as e:
            refused[path.stem] = str(e)
            log.warning("embedding %s refused: %s", path.name, e)
    return refused


def _same_place(a: str, b: str) -> bool:
    """The same base, however spelled (a trailing slash, a relative path)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
