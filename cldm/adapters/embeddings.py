"""Textual-inversion embeddings: a word of the prompt that stands for learned token vectors.

Files (the tensors; `files.read_file` opens them): A1111's `.pt` (`string_to_param["*"]`, n x 768), its
`.safetensors` (`emb_params`), and diffusers' `learned_embeds` (one key, the token, a 768-vector). The embedding is
used by its file name: where the prompt's tokens spell that name, they are replaced by the embedding's n vectors,
which take n of the chunk's 75 token places (an embedding is never split between chunks unless it is longer than
one). The match is on tokens, as in A1111, so a name can match inside a longer word that tokenizes the same way
(`negative` inside `easynegative`); the longest name is tried first.

SDXL's embeddings carry one vector set per text encoder (`clip_l` (n, 768) for CLIP ViT-L, `clip_g` (n, 1280) for
OpenCLIP bigG): `for_model` gives one Embedding per text encoder of the base, under the same word, and each encoder
substitutes its own (`cldm.pipeline.prompts.encode_joined`). An embedding of another family is refused, both
families named (A1111 skips them as "for another model"): an SDXL pair on a one-encoder base, a single set on SDXL, a
set of another width (768 is SD1.5's, 1024 SD2.x's).
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


# The width of one vector set in the real families: what a one-encoder embedding is for.
_WIDTH_FAMILY = {768: "SD1.5", 1024: "SD2.x"}
_XL_KEYS = ("clip_l", "clip_g")  # SDXL's: CLIP ViT-L's vectors, OpenCLIP bigG's


def from_state(state: dict[str, torch.Tensor], name: str, width: int, base: str | None = None) -> Embedding:
    """An embedding file's tensors -> Embedding for a one-text-encoder base (`base`: its family's name, for the
    messages); InputError for another model family's or a file that is none."""
    if any(k in state for k in _XL_KEYS):
        raise InputError(f"Embedding {name} is for SDXL (clip_l / clip_g vectors, one set per text encoder); this "
                         f"base is {base or 'SD1.x'}. Use an embedding made for {base or 'SD1.5'}.")  # fmt: skip
    vectors = _one_set(state, name)
    if vectors.ndim != 2 or vectors.shape[1] != width:
        fam = _WIDTH_FAMILY.get(vectors.shape[1]) if vectors.ndim == 2 else None
        wide = f" (an {fam} embedding)" if fam and fam != base else ""
        this = f"this {base} base's text encoder" if base else "this text encoder"
        raise InputError(f"Embedding {name} has vectors of shape {tuple(vectors.shape)}; {this} takes "
                         f"{width}-wide ones{wide}.")  # fmt: skip
    return Embedding(name, _finite(vectors, name))


def for_model(state: dict[str, torch.Tensor], name: str, sd) -> list[Embedding]:
    """An embedding file's tensors -> one Embedding per text encoder of `sd` (`sd.texts`' order): SDXL's
    clip_l / clip_g pair, or one-encoder families' single set. InputError, naming both families, for an embedding
    of another family (A1111 skips those: "for another model")."""
    base = sd.family.name
    texts = sd.texts
    if len(texts) == 1:
        return [from_state(state, name, texts[0].cfg.hidden_size, base)]
    if not any(k in state for k in _XL_KEYS):
        vectors = _one_set(state, name)
        w = vectors.shape[-1]
        fam = _WIDTH_FAMILY.get(w, "SD1.5 or SD2.x")
        raise InputError(f"Embedding {name} is for {fam} (one set of {w}-wide vectors: one text encoder); this base "
                         f"is {base}, whose "
                         "embeddings carry a clip_l and a clip_g set (one per text encoder). Use an embedding made "
                         f"for {base}.")  # fmt: skip
    missing = [k for k in _XL_KEYS if k not in state]
    if missing:
        raise InputError(f"Embedding {name} has no {missing[0]} vectors: an SDXL embedding carries both clip_l and "
                         "clip_g. The file is damaged.")  # fmt: skip
    out = []
    for key, text in zip(_XL_KEYS, texts):
        vectors = state[key].detach().float()
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        width = text.cfg.hidden_size
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise InputError(f"Embedding {name}'s {key} vectors have the shape {tuple(vectors.shape)}; this {base} "
                             f"base's text encoder takes {width}-wide ones: it is for another model.")  # fmt: skip
        out.append(Embedding(name, _finite(vectors, name)))
    if out[0].tokens != out[1].tokens:
        raise InputError(f"Embedding {name} has {out[0].tokens} clip_l vectors and {out[1].tokens} clip_g ones; "
                         "both encoders need as many. The file is damaged.")  # fmt: skip
    return out


def install(sd, state: dict[str, torch.Tensor], name: str, hash: str = "") -> list[Embedding]:
    """The embedding into each text encoder of `sd` under `name` (all or none); InputError as `for_model`."""
    found = for_model(state, name, sd)
    for text, e in zip(sd.texts, found):
        e.hash = hash
        text.embeddings[name] = e
    return found


def _one_set(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The vectors of a one-encoder embedding file (n, width): A1111's .pt / .safetensors, diffusers' file."""
    if "emb_params" in state:
        vectors = state["emb_params"]
    elif params := [k for k in state if k.startswith("string_to_param.")]:
        vectors = state[params[0]]
    elif len(state) == 1:
        vectors = next(iter(state.values()))
    else:
        raise InputError(f"{name} is not a textual-inversion embedding (no string_to_param / emb_params vectors).")
    vectors = vectors.detach().float()
    return vectors[None] if vectors.ndim == 1 else vectors


def _finite(vectors: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(vectors).all():
        raise InputError(f"Embedding {name} holds NaN or infinite values.")
    return vectors


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
