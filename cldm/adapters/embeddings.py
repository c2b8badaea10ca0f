"""Textual-inversion embeddings: a word of the prompt that stands for learned token vectors.

Files (the tensors; `checkpoints.read_file` opens them): A1111's `.pt` (`string_to_param["*"]`, n x 768), its
`.safetensors` (`emb_params`), and diffusers' `learned_embeds` (one key, the token, a 768-vector). The embedding is
used by its file name: where the prompt's tokens spell that name, they are replaced by the embedding's n vectors,
which take n of the chunk's 75 token places (an embedding is never split between chunks unless it is longer than
one). The match is on tokens, as in A1111, so a name can match inside a longer word that tokenizes the same way
(`negative` inside `easynegative`); the longest name is tried first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cldm.errors import InputError


@dataclass
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, width)
    hash: str = ""  # A1111's short hash of the file, for the "TI hashes" of the PNG parameters

    @property
    def tokens(self) -> int:
        return self.vectors.shape[0]


def from_state(state: dict[str, torch.Tensor], name: str, width: int) -> Embedding:
    """An embedding file's tensors -> Embedding; InputError for another model family's or a file that is none."""
    if any(k in state for k in ("clip_l", "clip_g")):
        raise InputError(f"Embedding {name} is for SDXL (clip_l / clip_g vectors); this base is SD1.x.")
    if "emb_params" in state:
        vectors = state["emb_params"]
    elif params := [k for k in state if k.startswith("string_to_param.")]:
        vectors = state[params[0]]
    elif len(state) == 1:
        vectors = next(iter(state.values()))
    else:
        raise InputError(f"{name} is not a textual-inversion embedding (no string_to_param / emb_params vectors).")
    vectors = vectors.detach().float()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        wide = " (an SD2.x embedding)" if vectors.ndim == 2 and vectors.shape[1] == 1024 else ""
        raise InputError(f"Embedding {name} has vectors of shape {tuple(vectors.shape)}; this text encoder takes "
                         f"{width}-wide ones{wide}.")  # fmt: skip
    if not torch.isfinite(vectors).all():
        raise InputError(f"Embedding {name} holds NaN or infinite values.")
    return Embedding(name, vectors)


def used(ids: list[int], spelled: dict[tuple[int, ...], Embedding]) -> list[Embedding]:
    """The embeddings a piece's token ids call, in order of first use."""
    found: list[Embedding] = []
    by_vectors = {id(e.vectors): e for e in spelled.values()}
    for item in substitute(ids, spelled):
        e = by_vectors.get(id(item)) if isinstance(item, torch.Tensor) else None
        if e is not None and all(e is not f for f in found):
            found.append(e)
    return found


def substitute(ids: list[int], spelled: dict[tuple[int, ...], Embedding]) -> list[int | torch.Tensor]:
    """A piece's token ids with each embedding's spelling replaced by its vectors ((n, width): one item)."""
    out: list[int | torch.Tensor] = []
    i = 0
    longest = sorted(spelled, key=len, reverse=True)
    while i < len(ids):
        for seq in longest:
            if tuple(ids[i : i + len(seq)]) == seq:
                out.append(spelled[seq].vectors)  # one item of n places: never split between chunks
                i += len(seq)
                break
        else:
            out.append(ids[i])
            i += 1
    return out
