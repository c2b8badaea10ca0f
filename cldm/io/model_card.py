"""A model card: what an app or the CLI needs to know about a small model, shipped beside its weights.

`model_card.json` sits next to the base file it describes (the demo model's export writes one into assets/demo)
and names that file, so a card in a shared models folder never applies to another base. It holds the model's
native size and sampling settings, the conditions it has ControlNets for, one example per condition and, for a
model trained on a closed vocabulary, the words it knows. A base without a card is plain SD1.5.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cldm.errors import CheckpointError

CARD_FILE = "model_card.json"


@dataclass(frozen=True)
class ModelCard:
    name: str  # what the app calls the model ("the demo model")
    base: str  # the base weight file (or folder) name the card describes
    size: int  # native picture size in px
    steps: int
    cfg: float
    sampler: str
    conditions: tuple[str, ...]  # condition keys with a ControlNet beside the base (`control_v11p_sd15_<key>...`)
    examples: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # key -> image (in assets/examples), preprocessor, prompt; "mask": the painted layer of an inpaint example
    words: tuple[str, ...] = ()  # the only words the text encoder knows; empty: any prompt
    description: str = ""
    folder: Path | None = field(default=None, compare=False)  # where the card was read from (not written)

    def split_known(self, prompt: str) -> tuple[str, list[str]]:
        """(the prompt with only the words the model knows, the other words); any prompt when it has no word list.

        "A green triangle on a white background, best quality" -> ("a green triangle on a white background",
        ["best", "quality"]): unknown words would reach the model as letters it never saw.
        """
        if not self.words:
            return prompt, []
        words = re.findall(r"[a-z]+|,", prompt.lower())
        known = [w for w in words if w in self.words]
        return " ".join(known).replace(" ,", ",").strip(", "), [w for w in words if w not in self.words]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("folder")
        return json.dumps(data, indent=2) + "\n"

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                name=str(data["name"]), base=str(data["base"]), size=int(data["size"]), steps=int(data["steps"]),
                cfg=float(data["cfg"]), sampler=str(data["sampler"]), conditions=tuple(data["conditions"]),
                examples={str(k): dict(v) for k, v in data.get("examples", {}).items()},
                words=tuple(data.get("words", ())), description=str(data.get("description", "")), folder=path.parent,
            )  # fmt: skip
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
        ) as e:
            raise CheckpointError(
                f"{path.name} in {path.parent.name}/ is not a readable model card ({type(e).__name__}: {e}); "
                f"fix or delete it (a base without a card runs as plain SD1.5)."
            ) from e


def card_for(base: str | os.PathLike) -> ModelCard | None:
    """The card of a base file or folder (None when there is none, e.g. for a hub id or plain SD1.5 weights)."""
    path = Path(base)
    candidates = [path / CARD_FILE] if path.is_dir() else [path.parent / CARD_FILE] if path.is_file() else []
    for candidate in candidates:
        if candidate.is_file():
            card = ModelCard.read(candidate)
            if card.base == path.name:
                return card
    return None
