"""CLIP text encoder (via `transformers`): token ids -> hidden states of a chosen layer (clip skip), the pooled and
projected output (SDXL's second encoder), learned word vectors in place of token embeddings. Turning prompts into
ids and contexts is `cldm.pipeline.prompts`' work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cldm.models.config import TextConfig

Substitution = tuple[int, int, torch.Tensor]  # (row of the batch, token place, vector)


class TextEncoder(nn.Module):
    """CLIPTextModel (+ the pooled output's projection when the config has one), with the tokenizer and the learned
    words (textual inversions) that go with it."""

    def __init__(self, cfg: TextConfig, tokenizer=None):
        super().__init__()
        from transformers import CLIPTextModel

        self.cfg = cfg
        # transformers 5 dropped the inner `text_model.`; this holder puts it back so our keys are the original
        # file's keys after stripping `cond_stage_model.` (one prefix, as for every other component).
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(cfg.to_transformers())
        # CLIPTextModelWithProjection's `text_projection` (diffusers' name and ours): pooled -> projection_dim
        self.text_projection = (
            nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if cfg.projection_dim else None
        )
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

    def forward(
        self, ids: torch.Tensor, clip_skip: int = 1, vectors: Sequence[Substitution] = (), layer: int = -1,
        final_norm: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """ids (batch, 77) -> hidden states (batch, 77, width); see `encode`."""
        return self.encode(ids, clip_skip, vectors, layer, final_norm)[0]

    def encode(
        self, ids: torch.Tensor, clip_skip: int = 1, vectors: Sequence[Substitution] = (), layer: int = -1,
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """ids (batch, 77) -> (hidden states (batch, 77, width), projected pooled output (batch, projection_dim) or
        None without a projection).

        The hidden states are those of `layer` (-1: the last; SDXL reads -2), moved `clip_skip - 1` layers further
        down (A1111's clip skip), then through the final layer norm when `final_norm` (SD1.5 and SD2 do, SDXL does
        not). `vectors` (row, place, vector) stand in for the token embeddings at those places (learned words)."""
        with self._substituted(vectors):
            ids = ids.to(self.clip.embeddings.token_embedding.weight.device)
            at = layer - (max(clip_skip, 1) - 1)
            if at == -1 and final_norm and self.text_projection is None:
                return self.clip(input_ids=ids).last_hidden_state, None
            out = self.clip(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[at]
            hidden = self.clip.final_layer_norm(hidden) if final_norm else hidden
            pooled = None if self.text_projection is None else self.text_projection(out.pooler_output)
            return hidden, pooled
