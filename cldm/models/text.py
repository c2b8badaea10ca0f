"""CLIP text encoder (via `transformers`): token ids -> hidden states, clip skip, learned word vectors in place of
token embeddings. Turning prompts into ids and contexts is `cldm.pipeline.prompts`' work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cldm.models.config import TextConfig

Substitution = tuple[int, int, torch.Tensor]  # (row of the batch, token place, vector)


class TextEncoder(nn.Module):
    """CLIPTextModel, with the tokenizer and the learned words (textual inversions) that go with it."""

    def __init__(self, cfg: TextConfig, tokenizer=None):
        super().__init__()
        from transformers import CLIPTextModel

        self.cfg = cfg
        # transformers 5 dropped the inner `text_model.`; this holder puts it back so our keys are the original
        # file's keys after stripping `cond_stage_model.` (one prefix, as for every other component).
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(cfg.to_transformers())
        self.tokenizer = tokenizer
        # textual inversions (`cldm.adapters.embeddings.Embedding`) by the word that calls them; prompts read them
        self.embeddings: dict[str, object] = {}

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
    def _substituted(self, vectors: Sequence[Substitution]) -> Iterator[None]:
        """While encoding: the token-embedding layer's output takes the given vectors at their places."""
        if not vectors:
            yield
            return

        def hook(module, args, out):
            out = out.clone()
            for row, place, vec in vectors:
                out[row, place] = vec.to(out.device, out.dtype)
            return out

        handle = self.clip.embeddings.token_embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, vectors: Sequence[Substitution] = ()) -> torch.Tensor:
        """ids (batch, 77) -> hidden states (batch, 77, width). clip_skip=2 takes the penultimate layer (A1111).
        `vectors` (row, place, vector) stand in for the token embeddings at those places (learned words)."""
        with self._substituted(vectors):
            ids = ids.to(self.clip.embeddings.token_embedding.weight.device)
            if clip_skip <= 1:
                return self.clip(input_ids=ids).last_hidden_state
            out = self.clip(input_ids=ids, output_hidden_states=True)
            return self.clip.final_layer_norm(out.hidden_states[-clip_skip])
