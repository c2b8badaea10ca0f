"""A1111's file hashes: the checkpoint's "Model hash", the LoRAs' "Lora hashes", the embeddings' "TI hashes"
(hashes of files' bytes; reading weights is `checkpoints.py`'s)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


def short_hash(path: str | os.PathLike) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256 ("" for a folder)."""
    return file_sha256(path)[:10]


def lora_hash(path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """A1111's LoRA short hash (12 hex digits, its "Lora hashes"): the one kohya's sd-scripts saved in the metadata
    (`sshs_model_hash`), else the "addnet" hash, the SHA-256 of a .safetensors file's tensor bytes (its JSON header
    left out, so editing metadata keeps the hash), or of the whole file for other formats. "" for a folder."""
    saved = (metadata or {}).get("sshs_model_hash", "")
    if isinstance(saved, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", saved):
        return saved[:12].lower()
    return file_sha256(path, tensors_only=str(path).endswith(".safetensors"))[:12]


def file_sha256(path: str | os.PathLike, tensors_only: bool = False) -> str:
    """The SHA-256 of a file (of its bytes after the safetensors header with `tensors_only`); "" for a folder.
    Kept in ~/.cache/cldm/hashes.json by path, size and modification time, so a 4 GB file is read once."""
    path = Path(path)
    if not path.is_file():
        return ""
    cache_file = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cldm" / "hashes.json"
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    field_name = "addnet" if tensors_only else "sha256"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key) if isinstance(cache.get(key), dict) and cache[key].get("stamp") == stamp else None
    if entry is not None and isinstance(entry.get(field_name), str):
        return entry[field_name]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if tensors_only:
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache[key] = {**(entry or {}), "stamp": stamp, field_name: digest.hexdigest()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home: the hash is computed again next time
    return digest.hexdigest()
