"""Prompts -> the UNet's text context, A1111's way: long prompts in 75-token chunks, emphasis weights and BREAK
(`cldm.adapters.emphasis`), textual-inversion words replaced by their vectors (`cldm.adapters.embeddings`). Functions
taking the text encoder (`cldm.models.text.TextEncoder`), its tokenizer and loaded embeddings."""

from __future__ import annotations

import logging

import torch

from cldm.adapters import emphasis as emphasis_syntax  # `emphasis` is the on/off argument here
from cldm.adapters.embeddings import Embedding, substitute, used
from cldm.errors import InputError, MissingWeightsError
from cldm.models.text import TextEncoder

log = logging.getLogger(__name__)

# A CLIP context is 77 tokens: BOS + 75 prompt tokens + EOS. Longer prompts are cut into 75-token chunks,
# each encoded on its own and concatenated along the sequence (what A1111 and ComfyUI do). A text encoder with a
# shorter context (max_length, e.g. the shapes demo's 32) gets chunks of max_length - 2 prompt tokens.

# The chunks one prompt may take. Every chunk adds 77 keys to each cross-attention of every step, so a prompt's chunks
# are work as its pixels are; A1111 has no cap, a shared server needs one. A 10,000-character prompt of ordinary words
# is about 32 chunks; more come from runs of BREAK (each starts a chunk) or of symbols that are a token each.
MAX_CHUNKS = 40

Substitution = tuple[int, int, int, torch.Tensor]  # (prompt, chunk, token place, vector) of a learned word


def chunk_tokens(text: TextEncoder) -> int:
    """Prompt tokens per chunk: 75 for SD1.5's 77-token context (BOS and EOS take the other two)."""
    return text.cfg.max_length - 2


def _comma(tok) -> int | None:
    """The comma's token id (A1111's chunking cuts after commas), None when the vocabulary has none."""
    ids = tok.convert_tokens_to_ids([",</w>"])
    known = ids and tok.convert_ids_to_tokens(ids[0]) == ",</w>"  # not the unknown token's id
    return ids[0] if known else None


def tokenize(text: TextEncoder, prompt: str) -> list[int]:
    """A prompt's token ids, literally (no BOS/EOS, no length limit)."""
    return text.tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def embeddings_used(text: TextEncoder, prompts: list[str], emphasis: bool = True) -> list[Embedding]:
    """The loaded embeddings these prompts call (for A1111's "TI hashes"), in order of first use."""
    if not text.embeddings or text.tokenizer is None:
        return []
    spelled = {tuple(tokenize(text, name)): e for name, e in text.embeddings.items()}
    found: list[Embedding] = []
    for p in prompts:
        for piece, _ in emphasis_syntax.parse(p) if emphasis else [(p, 1.0)]:
            found += [e for e in used(tokenize(text, piece), spelled) if all(e is not f for f in found)]
    return found


def token_chunks(text: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ids (batch, chunks, max_length), taken literally (no emphasis syntax, no embeddings)."""
    return weighted_chunks(text, prompts, emphasis=False, embeddings=False)[0]


def weighted_chunks(
    text: TextEncoder, prompts: list[str], emphasis: bool = True, embeddings: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, list[Substitution]]:
    """Prompts -> ids (batch, chunks, max_length), each token's weight (None when every weight is 1) and the
    embedding vectors that replace token places; every prompt gets as many chunks as the longest one. With
    `emphasis`, A1111's `(word:1.2)` syntax and BREAK are read (`cldm.adapters.emphasis`); with `embeddings`, the
    encoder's loaded embeddings' names (`text.embeddings`). A prompt with neither is tokenized exactly as it is."""
    if text.tokenizer is None:
        raise MissingWeightsError("This text encoder has no tokenizer; load the model with its tokenizer.")
    per = chunk_tokens(text)
    found = text.embeddings if embeddings else {}
    spelled = {tuple(tokenize(text, name)): e for name, e in found.items()}

    def tokens_of(piece: str) -> list:
        ids = tokenize(text, piece)
        return substitute(ids, spelled) if spelled else ids

    chunks = []  # per prompt: [(tokens, weights) per chunk]
    for p in prompts:
        pieces = emphasis_syntax.parse(p) if emphasis else [(p, 1.0)]
        toks = tokenize(text, pieces[0][0]) if emphasis_syntax.is_plain(pieces) and not spelled else None
        if toks is not None and len(toks) <= per:  # one chunk, literally
            chunks.append([(toks, [1.0] * len(toks))])
        else:  # A1111's chunking (BREAK, the comma backtrack, embeddings kept whole)
            chunks.append(emphasis_syntax.chunked(pieces, tokens_of, per, _comma(text.tokenizer)))
    n_chunks = max(1, max(len(c) for c in chunks))
    if n_chunks > MAX_CHUNKS:
        raise InputError(f"A prompt is {n_chunks} chunks of {per} tokens (each BREAK starts one); at most "
                         f"{MAX_CHUNKS} are encoded. Shorten it, or use fewer BREAKs.")  # fmt: skip
    tok = text.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out = torch.full((len(prompts), n_chunks, text.cfg.max_length), pad, dtype=torch.long)
    weights = torch.ones(out.shape, dtype=torch.float32)
    vectors = []
    for b, prompt_chunks in enumerate(chunks):
        for c in range(n_chunks):
            part, w = prompt_chunks[c] if c < len(prompt_chunks) else ([], [])
            for j, t in enumerate(part):
                if isinstance(t, torch.Tensor):  # an embedding's vector: its place gets a stand-in id
                    vectors.append((b, c, 1 + j, t))
            row = [bos, *(pad if isinstance(t, torch.Tensor) else t for t in part), eos]
            out[b, c, : len(row)] = torch.tensor(row)
            weights[b, c, 1 : 1 + len(w)] = torch.tensor(w, dtype=torch.float32)
    return out, (None if bool((weights == 1).all()) else weights), vectors


@torch.no_grad()
def encode(
    text: TextEncoder, prompts: list[str], clip_skip: int = 1, n_chunks: int | None = None, emphasis: bool = True,
    layer: int = -1, final_norm: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Prompts -> context (batch, 77 * chunks, width); A1111's emphasis weights applied per chunk. `layer` and
    `final_norm` say which hidden states the family reads (`TextEncoder.encode`)."""
    return _encode(text, prompts, clip_skip, n_chunks, emphasis, layer, final_norm)[0]


def chunks_needed(text: TextEncoder, prompts: list[str], emphasis: bool = True) -> int:
    """How many chunks the longest of these prompts takes."""
    return weighted_chunks(text, prompts, emphasis)[0].shape[1]


@torch.no_grad()
def encode_joined(
    texts: list[TextEncoder], prompts: list[str], clip_skip: int = 1, emphasis: bool = True, layer: int = -1,
    final_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Prompts -> (context (batch, 77 * chunks, total width), pooled output or None) through each text encoder,
    their states joined along the width in order (SDXL: CLIP ViT-L's 768 then bigG's 1280 = 2048). Emphasis is
    applied to each encoder's states on its own (A1111 weights each embedder); the pooled output is the projecting
    encoder's at the first chunk (A1111's; with one chunk it is diffusers')."""
    n = max(chunks_needed(t, prompts, emphasis) for t in texts) if len(texts) > 1 else None
    states, pooled = [], None
    for t in texts:
        hidden, first = _encode(t, prompts, clip_skip, n, emphasis, layer, final_norm)
        states.append(hidden)
        pooled = first if first is not None else pooled
    return torch.cat(states, dim=-1), pooled


def _encode(
    text: TextEncoder, prompts: list[str], clip_skip: int, n_chunks: int | None, emphasis: bool, layer: int,
    final_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    ids, weights, vectors = weighted_chunks(text, prompts, emphasis)
    if n_chunks is not None and n_chunks > ids.shape[1]:
        extra = token_chunks(text, [""] * len(prompts)).expand(-1, n_chunks - ids.shape[1], -1)
        ids = torch.cat([ids, extra], dim=1)
        if weights is not None:
            weights = torch.cat([weights, torch.ones(extra.shape)], dim=1)
    if ids.shape[1] > 1:
        log.info("prompt longer than %d tokens: encoded in %d chunks", chunk_tokens(text), ids.shape[1])
    b, c, n = ids.shape
    rows = [(p * c + chunk, place, vec) for p, chunk, place, vec in vectors]  # places in the (b*c, 77) batch
    hidden, pooled = text.encode(ids.reshape(b * c, n), clip_skip, rows, layer, final_norm)  # (b*c, 77, w)
    if weights is not None:
        flat = weights.reshape(b * c, n)
        hidden = torch.stack([
            emphasis_syntax.apply(z, w) if bool((w != 1).any()) else z for z, w in zip(hidden, flat)
        ])  # fmt: skip
    first = None if pooled is None else pooled.reshape(b, c, -1)[:, 0]
    return hidden.reshape(b, c * n, -1), first
