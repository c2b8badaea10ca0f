"""Where annotator weights come from: a local folder first, then the Hugging Face cache (or hub).

Local layout: `<models_dir>/annotators/` mirrors the hub repo `lllyasviel/Annotators` file for file
(`<models_dir>/annotators/ControlNetHED.pth`, ...). Transformers models (segmentation) live in a sub-folder named
after the repo (`<models_dir>/annotators/upernet-convnext-small/config.json`, `model.safetensors`).
Anything not found locally is looked up with `huggingface_hub.hf_hub_download`, which answers from the cache and
only goes to the network when the process is not offline (`hub_is_offline`). Every failure there becomes
MissingAnnotatorWeights naming the repo, the file and the folder to put it in, so the user knows exactly what to
download; offline, a missing file is said at once, with no network lookup.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from annotators.errors import MissingAnnotatorWeights

log = logging.getLogger(__name__)

ANNOTATORS_REPO = "lllyasviel/Annotators"
LOCAL_SUBDIR = "annotators"


@dataclass(frozen=True)
class WeightFile:
    """One file of a hub repo that a detector needs; locally it is `<models_dir>/annotators/[folder/]filename`."""

    repo: str
    filename: str
    folder: str = ""  # a transformers model's own sub-folder of the local annotators folder
    subfolder: str = ""  # the file's folder inside the hub repo (locally it sits in the annotators folder itself)

    @property
    def local_name(self) -> str:
        return f"{self.folder}/{self.filename}" if self.folder else self.filename

    @property
    def hub_name(self) -> str:
        """The file's path inside its hub repo."""
        return f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename


def local_folder(models_dir: str | os.PathLike[str] | None) -> Path | None:
    """The folder that mirrors lllyasviel/Annotators, or None when no models_dir was given."""
    return None if models_dir is None else Path(models_dir) / LOCAL_SUBDIR


def hub_is_offline() -> bool:
    """True when no weights may come from the network: HF_HUB_OFFLINE is set now (by the user, or by the app when
    the hub did not answer at start-up) or was set when huggingface_hub was imported (which reads it only then)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.is_offline_mode()


def on_disk(item: WeightFile, models_dir: str | os.PathLike[str] | None) -> bool:
    """Whether `item` is in the local folder or the Hugging Face cache: found without the network."""
    from huggingface_hub import try_to_load_from_cache

    folder = local_folder(models_dir)
    if folder is not None and (folder / item.local_name).is_file():
        return True
    return isinstance(try_to_load_from_cache(item.repo, item.hub_name), str)


def where_to_put(models_dir: str | os.PathLike[str] | None, name: str) -> str:
    """Human-readable destination for a missing file or folder."""
    folder = local_folder(models_dir)
    if folder is None:
        return f"<models_dir>/{LOCAL_SUBDIR}/{name} (start the app with a models folder)"
    return str(folder / name)


def _from_hub(item: WeightFile) -> tuple[Path | None, str]:
    """Look `item` up in the Hugging Face cache / hub; (path, "") on success, (None, reason) on failure."""
    # Imported here so that the light annotators (canny, sketch...) never pay for huggingface_hub.
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=item.repo, filename=item.hub_name, local_files_only=hub_is_offline())), ""
    except Exception as exc:  # offline, 404, auth, network: all mean "not available here"
        log.info("hub lookup of %s/%s failed: %s", item.repo, item.hub_name, exc)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def resolve(files: Sequence[WeightFile], models_dir: str | os.PathLike[str] | None, annotator: str) -> list[Path]:
    """Paths of `files`, local folder first, then the HF cache/hub; MissingAnnotatorWeights lists every file missing."""
    folder = local_folder(models_dir)
    found: list[Path] = []
    missing: list[tuple[WeightFile, str]] = []
    for item in files:
        local = folder / item.local_name if folder is not None else None
        if local is not None and local.is_file():
            found.append(local)
            continue
        path, reason = _from_hub(item)
        if path is None:
            missing.append((item, reason))
        else:
            found.append(path)
    if missing:
        raise MissingAnnotatorWeights(missing_message(annotator, missing, models_dir))
    log.debug("weights for %s: %s", annotator, found)
    return found


def missing_message(
    annotator: str, missing: Sequence[tuple[WeightFile, str]], models_dir: str | os.PathLike[str] | None
) -> str:
    """The message that tells the user which file of which repo to download and where to put it."""
    lines = [f"The '{annotator}' preprocessor needs weights that are not available here:"]
    offline = hub_is_offline()
    for item, reason in missing:
        lines.append(
            f"- '{item.filename}' from the Hugging Face repo '{item.repo}' "
            f"(https://huggingface.co/{item.repo}/blob/main/{item.hub_name}): "
            f"put it at {where_to_put(models_dir, item.local_name)}"
            f" or into the Hugging Face cache (huggingface-cli download {item.repo} {item.hub_name})."
        )
        if reason and not offline:  # offline, the cache was the only place looked in: the last line says so
            lines.append(f"  (hub lookup: {reason})")
    if offline:
        lines.append("This app works offline (HF_HUB_OFFLINE), so nothing is downloaded automatically.")
    return "\n".join(lines)
