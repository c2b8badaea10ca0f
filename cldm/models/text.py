"""CLIP text encoder (via `transformers`), A1111-style long prompts in 75-token chunks, clip skip."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from cldm.adapters import emphasis as prompt_weights
from cldm.models.config import TextConfig
from cldm.adapters.embeddings import Embedding, substitute, used
from cldm.errors import InputError, MissingWeightsError

log = logging.getLogger(__name__)

# A CLIP context is 77 tokens: BOS + 75 prompt tokens + EOS. Longer prompts are cut into 75-token chunks,
# each encoded on its own and concatenated along the sequence (what A1111 and ComfyUI do). A text encoder with a
# shorter context (max_length, e.g. the shapes demo's 32) gets chunks of max_length - 2 prompt tokens.
# The real SD1.5 tokenizer: 256 byte symbols, the same with "</w>", 48894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
# Chunks one prompt may take. Every chunk adds 77 keys to each cross-attention of every step, so a prompt's chunks
# are work as its pixels are; A1111 has no cap, a shared server needs one. A 10,000-character prompt of ordinary words
# is about 32 chunks; more come from runs of BREAK (each starts a chunk) or of symbols that are a token each.
MAX_CHUNKS = 40


class TextEncoder(nn.Module):
    """Tokenizer + CLIPTextModel; `encode()` turns prompts into the UNet's cross-attention context."""

    def __init__(self, cfg: TextConfig, tokenizer=None):
        super().__init__()
        from transformers import CLIPTextModel

        self.cfg = cfg
        # transformers 5 dropped the inner `text_model.`; this holder puts it back so our keys are the original
        # file's keys after stripping `cond_stage_model.` (one prefix, as for every other component).
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(cfg.to_transformers())
        self.tokenizer = tokenizer
        self.embeddings: dict[str, Embedding] = {}  # textual inversions, by the word that calls them

    @property
    def clip(self):
        return self.transformer.text_model

    def reset_buffers(self) -> None:
        """Rebuild the non-persistent position ids (left empty when the module was built on the meta device)."""
        emb = self.clip.embeddings
        n = emb.position_embedding.weight.shape[0]
        emb.register_buffer(
            "position_ids", torch.arange(n, device=emb.position_embedding.weight.device)[None], persistent=False
        )

    @contextlib.contextmanager
    def _embedded(self, vectors: list[tuple[int, int, int, torch.Tensor]], n_chunks: int):
        """While encoding: the token-embedding layer's output takes the embeddings' vectors at their places."""
        if not vectors:
            yield
            return

        def hook(module, args, out):
            out = out.clone()
            for b, c, place, vec in vectors:
                out[b * n_chunks + c, place] = vec.to(out.device, out.dtype)
            return out

        handle = self.clip.embeddings.token_embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per chunk: 75 for SD1.5's 77-token context (BOS and EOS take the other two)."""
        return self.cfg.max_length - 2

    def _comma(self) -> int | None:
        """The comma's token id (A1111's chunking cuts after commas), looked up once per tokenizer."""
        tok = self.tokenizer
        if getattr(self, "_comma_for", None) is not tok:
            ids = tok.convert_tokens_to_ids([",</w>"])
            known = ids and tok.convert_ids_to_tokens(ids[0]) == ",</w>"  # not the unknown token's id
            self._comma_for, self._comma_id = tok, ids[0] if known else None
        return self._comma_id

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def embeddings_used(self, prompts: list[str], emphasis: bool = True) -> list[Embedding]:
        """The loaded embeddings these prompts call (for A1111's "TI hashes"), in order of first use."""
        if not self.embeddings or self.tokenizer is None:
            return []
        spelled = {tuple(self._tokenize(name)): e for name, e in self.embeddings.items()}
        found: list[Embedding] = []
        for p in prompts:
            for text, _ in prompt_weights.parse(p) if emphasis else [(p, 1.0)]:
                found += [e for e in used(self._tokenize(text), spelled) if all(e is not f for f in found)]
        return found

    def token_chunks(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ids (batch, chunks, max_length), taken literally (no emphasis syntax, no embeddings)."""
        return self.weighted_chunks(prompts, emphasis=False, embeddings=False)[0]

    def weighted_chunks(
        self, prompts: list[str], emphasis: bool = True, embeddings: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int, int, torch.Tensor]]]:
        """Prompts -> ids (batch, chunks, max_length), each token's weight (None when every weight is 1) and the
        embedding vectors that replace token places ((prompt, chunk, place, vector)); every prompt gets as many
        chunks as the longest one. With `emphasis`, A1111's `(word:1.2)` syntax and BREAK are read
        (`cldm.adapters.emphasis`); with `embeddings`, the loaded embeddings' names (`self.embeddings`). A prompt with
        neither is tokenized exactly as it is."""
        if self.tokenizer is None:
            raise MissingWeightsError("This text encoder has no tokenizer; load the model with its tokenizer.")
        per = self.chunk_tokens
        found = self.embeddings if embeddings else {}
        spelled = {tuple(self._tokenize(name)): e for name, e in found.items()}

        def tokenize(text: str) -> list:
            ids = self._tokenize(text)
            return substitute(ids, spelled) if spelled else ids

        chunks = []  # per prompt: [(tokens, weights) per chunk]
        for p in prompts:
            pieces = prompt_weights.parse(p) if emphasis else [(p, 1.0)]
            toks = self._tokenize(pieces[0][0]) if prompt_weights.is_plain(pieces) and not spelled else None
            if toks is not None and len(toks) <= per:  # one chunk, literally, as before emphasis existed
                chunks.append([(toks, [1.0] * len(toks))])
            else:  # A1111's chunking (BREAK, the comma backtrack, embeddings kept whole)
                chunks.append(prompt_weights.chunked(pieces, tokenize, per, self._comma()))
        n_chunks = max(1, max(len(c) for c in chunks))
        if n_chunks > MAX_CHUNKS:
            raise InputError(f"A prompt is {n_chunks} chunks of {per} tokens (each BREAK starts one); at most "
                             f"{MAX_CHUNKS} are encoded. Shorten it, or use fewer BREAKs.")  # fmt: skip
        tok = self.tokenizer
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        out = torch.full((len(prompts), n_chunks, self.cfg.max_length), pad, dtype=torch.long)
        weights = torch.ones(out.shape, dtype=torch.float32)
        vectors = []
        for b, prompt_chunks in enumerate(chunks):
            for c in range(n_chunks):
                part, w = prompt_chunks[c] if c < len(prompt_chunks) else ([], [])
                for j, tok in enumerate(part):
                    if isinstance(tok, torch.Tensor):  # an embedding's vector: its place gets a stand-in id
                        vectors.append((b, c, 1 + j, tok))
                row = [bos, *(pad if isinstance(t, torch.Tensor) else t for t in part), eos]
                out[b, c, : len(row)] = torch.tensor(row)
                weights[b, c, 1 : 1 + len(w)] = torch.tensor(w, dtype=torch.float32)
        return out, (None if bool((weights == 1).all()) else weights), vectors

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """ids (batch, 77) -> hidden states (batch, 77, width). clip_skip=2 takes the penultimate layer (A1111)."""
        ids = ids.to(self.clip.embeddings.token_embedding.weight.device)
        if clip_skip <= 1:
            return self.clip(input_ids=ids).last_hidden_state
        out = self.clip(input_ids=ids, output_hidden_states=True)
        return self.clip.final_layer_norm(out.hidden_states[-clip_skip])

    @torch.no_grad()
    def encode(
        self, prompts: list[str], clip_skip: int = 1, n_chunks: int | None = None, emphasis: bool = True
    ) -> torch.Tensor:
        """Prompts -> context (batch, 77 * chunks, width); A1111's emphasis weights applied per chunk."""
        ids, weights, vectors = self.weighted_chunks(prompts, emphasis)
        if n_chunks is not None and n_chunks > ids.shape[1]:
            extra = self.token_chunks([""] * len(prompts)).expand(-1, n_chunks - ids.shape[1], -1)
            ids = torch.cat([ids, extra], dim=1)
            if weights is not None:
                weights = torch.cat([weights, torch.ones(extra.shape)], dim=1)
        if ids.shape[1] > 1:
            log.info("prompt longer than %d tokens: encoded in %d chunks", self.chunk_tokens, ids.shape[1])
        b, c, n = ids.shape
        with self._embedded(vectors, ids.shape[1]):
            hidden = self(ids.reshape(b * c, n), clip_skip)  # (b*c, 77, w)
        if weights is not None:
            flat = weights.reshape(b * c, n)
            hidden = torch.stack([
                prompt_weights.apply(z, w) if bool((w != 1).any()) else z for z, w in zip(hidden, flat)
            ])  # fmt: skip
        return hidden.reshape(b, c * n, -1)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cldm" / "clip-vit-large-patch14-tokenizer"


def sd15_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The SD1.5 CLIP tokenizer, built offline from the BPE vocabulary that the open-clip-torch wheel ships."""
    from transformers import CLIPTokenizer

    folder = Path(cache_dir) if cache_dir else _default_cache()
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.exists() and merges_file.exists()):
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - it is in requirements.txt
            raise MissingWeightsError(
                "The CLIP tokenizer needs the open-clip-torch package: pip install open-clip-torch"
            ) from e
        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
        merges = lines[1 : CLIP_MERGES + 1]
        alphabet = _bytes_to_unicode()
        tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        os.replace(tmp / "vocab.json", vocab_file)
        os.replace(tmp / "merges.txt", merges_file)
        tmp.rmdir()
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)
    check_tokenizer(tok, CLIP_VOCAB_SIZE)
    return tok


def check_tokenizer(tok, expected_size: int | None = None) -> None:
    """Refuse the degenerate tokenizer that transformers returns when nothing is cached (it maps every word to one id)."""
    size = len(tok)
    if size < 10 or (expected_size is not None and size != expected_size):
        raise MissingWeightsError(
            f"The CLIP tokenizer has {size} entries (expected {expected_size or 'a real vocabulary'}): "
            "its files are missing or broken. Point --base at a folder with tokenizer/vocab.json and merges.txt."
        )
