"""Transformers models as annotators: found in their own folder of `<models_dir>/annotators/`, else in the Hugging
Face cache (or hub), and a missing one reported with the repo to get and the folder to put it in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotators.cache import cached_load
from annotators.errors import MissingAnnotatorWeights
from annotators.weights import WeightFile, hub_is_offline, local_folder, on_disk, where_to_put


@dataclass(frozen=True)
class HubModel:
    """A transformers model: its hub repo and its folder under `<models_dir>/annotators/`."""

    repo: str
    local_name: str  # <models_dir>/annotators/<local_name>/config.json, the weights beside it

    @property
    def config(self) -> WeightFile:
        """The file whose presence says the model is here (transformers finds the weights beside it)."""
        return WeightFile(self.repo, "config.json", self.local_name)


def missing_model_message(model: HubModel, annotator: str, models_dir: str | os.PathLike[str] | None, why: str) -> str:
    hub = "This app works offline (HF_HUB_OFFLINE), so nothing is downloaded. " if hub_is_offline() else ""
    return (
        f"The '{annotator}' preprocessor needs the transformers model '{model.repo}' "
        f"(https://huggingface.co/{model.repo}: config.json and model.safetensors or pytorch_model.bin). "
        f"Put those files in {where_to_put(models_dir, model.local_name)}/ or into the Hugging Face cache "
        f"(huggingface-cli download {model.repo}). {hub}({why})"
    )


def load_pretrained(model: HubModel, auto_class: str, annotator: str, models_dir: str | os.PathLike[str] | None) -> Any:
    """`transformers.<auto_class>` of `model`, from the local folder if it is there, else the HF cache / hub; built
    once per models_dir (annotators.cache) and put in eval mode."""
    folder = local_folder(models_dir)
    local = folder / model.local_name if folder is not None else None
    if local is not None and (local / "config.json").is_file():
        source = str(local)
    elif hub_is_offline() and not on_disk(model.config, models_dir):
        # said at once, before transformers is even imported
        raise MissingAnnotatorWeights(
            missing_model_message(model, annotator, models_dir, "not in the Hugging Face cache")
        )
    else:
        source = model.repo

    def build(_: list[Path]) -> Any:
        import transformers

        try:
            # offline, transformers is told so itself: it reads HF_HUB_OFFLINE only when it is imported
            built = getattr(transformers, auto_class).from_pretrained(source, local_files_only=hub_is_offline())
        except OSError as exc:
            # transformers reports "not cached and offline" / "no such repo" / "no weights file" as OSError.
            why = f"transformers: {str(exc).splitlines()[0]}"
            raise MissingAnnotatorWeights(missing_model_message(model, annotator, models_dir, why)) from exc
        return built.eval()

    # No per-file resolution here: transformers finds its own files, so the file list for the cache is empty.
    return cached_load(f"{auto_class}:{source}", (), build, models_dir, annotator)
