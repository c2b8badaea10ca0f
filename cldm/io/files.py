"""Reading weight files: the only module that opens them (`writers.py` writes them).

Formats are told apart by their content, never by the file name: safetensors (8-byte header length + JSON), torch zip
archives and legacy torch pickles (the pickles only through `torch.load(weights_only=True)`, which refuses anything
but tensors and plain containers), and diffusers model folders (sharded or not). What the tensors are is
`identify.py`'s question; turning them into models is `checkpoints.py`'s.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from cldm.errors import CheckpointError, MissingWeightsError
from cldm.io import model_configs as mc

StateDict = dict[str, torch.Tensor]
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_EXTS = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin", ".ckpt", ".pth", ".pt")


# ----------------------------------------------------------------------------------------------- reading files
def _sniff(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish. Fetch it again.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"{path} is not a weight file this program reads (not safetensors, not a PyTorch checkpoint). "
        "Check that you picked the right file and that it is not an HTML error page."
    )


def _unwrap(obj, path: Path) -> StateDict:
    # Lightning checkpoints nest the weights under "state_dict"; some tools use "model" or "module".
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):  # an A1111 textual inversion (.pt)
        obj = {f"string_to_param.{k}": v for k, v in obj["string_to_param"].items()}
    # IP-Adapter .bin files hold {"image_proj": {...}, "ip_adapter": {...}}: flattened to "image_proj.proj.weight"
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        obj = {f"{k}.{sub}": t for k, part in obj.items() for sub, t in part.items()}
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no tensors: it is not a model checkpoint.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata ({} for other formats)."""
    if _sniff(path) != "safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file ({e}). Download it again.") from e


def read_file(path: str | os.PathLike) -> StateDict:
    """Tensors of one weight file, whatever its format. Pickles never run code: anything but tensors is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"Weight file not found: {path}")
    kind = _sniff(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # a file object, not the name: torch.load goes by the name's extension for some formats (.safetensors)
        with open(path, "rb") as f:
            return _unwrap(torch.load(f, map_location="cpu", weights_only=True), path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load {path}{_misnamed(path, kind)}: it contains Python objects other than weights, which "
            f"could run code ({str(e).splitlines()[0]}). Only load it if you trust it, and convert it to .safetensors "
            "first."
        ) from e
    # What the readers raise for cut-off or scrambled files; anything else is a bug and is not hidden as one of these.
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError, struct.error, SafetensorError) as e:
        if kind == "pickle" and "magic number" in str(e):  # pickle.dump output, not torch.save's format
            raise CheckpointError(
                f"{path}{_misnamed(path, kind)} is a plain Python pickle, not a PyTorch checkpoint or safetensors "
                "file: refused. Use the model's .safetensors (or .ckpt/.pth saved by PyTorch)."
            ) from e
        raise CheckpointError(
            f"{path}{_misnamed(path, kind)} is damaged or truncated ({type(e).__name__}: {e}). Download it again."
        ) from e


_KINDS = {"zip": "a PyTorch checkpoint (zip)", "pickle": "a pickle", "safetensors": "safetensors"}


def _misnamed(path: Path, kind: str) -> str:
    """' (named .safetensors but it is a pickle)' when the name and the content disagree, else ''."""
    says = (
        "safetensors"
        if path.suffix == ".safetensors"
        else "pickle"
        if path.suffix in (".ckpt", ".pth", ".pt", ".bin")
        else ""
    )
    if not says or (says == "safetensors") == (kind == "safetensors"):
        return ""
    return f" (named {path.suffix}, but it is {_KINDS[kind]})"


def _folder_weights(folder: Path) -> Path:
    for stem in WEIGHT_STEMS:
        for ext in WEIGHT_EXTS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    raise MissingWeightsError(f"No weights in {folder} (expected e.g. diffusion_pytorch_model.safetensors).")


def read_folder(folder: Path) -> StateDict:
    """Weights of one diffusers model folder, sharded or not."""
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(mc.read_json(index)["weight_map"].values()))
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index.name} in {folder.name}/ has no usable weight_map ({e}).") from e
            out: StateDict = {}
            for shard in shards:
                path = (folder / str(shard)).resolve()
                if path.parent != folder.resolve():  # "../x", "/etc/x", "sub/x": only files beside the index
                    raise CheckpointError(
                        f"{index.name} in {folder.name}/ names {shard!r}, which is not a file in that folder: refused."
                    )
                out.update(read_file(path))
            return out
    return read_file(_folder_weights(folder))


class Shape:
    """A tensor's shape from a file header, standing in for the tensor where only `ndim` / `shape` are read."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def read_shapes(path: str | os.PathLike) -> dict:
    """Key -> Shape of a safetensors file from its header alone (no tensor is read); a PyTorch zip checkpoint is
    memory-mapped (its tensors stand in for the shapes and are read only where touched); other formats are read
    whole."""
    path = Path(path)
    kind = _sniff(path)
    if kind == "zip":
        try:
            return _unwrap(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True), path)
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError):
            return read_file(path)  # which says what is wrong with the file
    if kind != "safetensors":
        return read_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: Shape(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file ({e}). Download it again.") from e
