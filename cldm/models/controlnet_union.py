"""ControlNet Union (xinsir's ControlNet++ for SDXL, and its ProMax): one ControlNet for several kinds of hint.

It is a ControlNet (same encoder copy, hint block and zero convs) plus three small parts, with the names of the
published files (xinsir wrote them in diffusers' layout; `transformer_layes` is their spelling):

  * `control_add_embedding`: the request's control types as a one-hot vector over the model's 6 types (8 for
    ProMax), each entry through the sinusoidal timestep embedding, then two linear layers; added to the time
    embedding, so every block knows which kinds of hint it reads.
  * `task_embedding`: one learnt vector per control type, added to the mean of that condition's hint features.
  * `transformer_layes` + `spatial_ch_projs`: the condition transformer. Its tokens are each condition's vector and
    the mean of the first block's output; each condition's output token becomes a per-channel offset (`alpha`) that
    is added, with the condition's hint features, to the first block's output.

Several conditions go through ONE forward pass, each with its own hint and type. With more than one, each
condition's features and offset are multiplied by its own scale inside the model and the residuals are not scaled
again; with one, the residuals are scaled as any ControlNet's (diffusers' ControlNetUnionModel does the same).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from cldm.models.config import UNetConfig
from cldm.models.controlnet import ControlNet
from cldm.models.unet import embed_time, timestep_embedding

QUICK_GELU = 1.702  # CLIP's sigmoid approximation of GELU, which the condition transformer's MLP uses


@dataclass(frozen=True)
class UnionConfig:
    """The Union parts' sizes (diffusers' num_control_type, num_trans_channel, num_trans_head, num_trans_layer,
    addition_time_embed_dim). The published files have 320 channels, 8 heads, 1 layer, 256-wide type embeddings."""

    control_types: int = 6  # controlnet-union-sdxl-1.0: 6; ProMax: 8 (adds tile and repaint)
    channels: int = 320  # the width of the tokens: the first block's width
    heads: int = 8  # shapes cannot tell: every published file has 8
    layers: int = 1
    type_embed_dim: int = 256  # the sinusoidal width of each control type's entry (SDXL's size-embedding width)


@dataclass(frozen=True)
class UnionHint:
    """What one Union forward reads: each condition's hint features (1, C, h, w) (the hint block's output) and its
    control-type index, and, when several conditions share the forward, each one's scale (None: one condition,
    scaled outside like any ControlNet)."""

    features: tuple[torch.Tensor, ...]
    types: tuple[int, ...]
    scales: tuple[float, ...] | None = None


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU * x)


class ConditionBlock(nn.Module):
    """A CLIP-style pre-norm transformer layer (attention, then a 4x MLP with QuickGELU)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads)
        self.ln_1 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(channels, 4 * channels), gelu=QuickGELU(), c_proj=nn.Linear(4 * channels, channels),
        ))  # fmt: skip
        self.ln_2 = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is (batch, tokens, channels), and nn.MultiheadAttention reads its first axis as the sequence: attention
        # runs across the pictures of the batch at each token. The published model was trained with this layout and
        # diffusers runs it so; ComfyUI and the A1111 extension attend across the tokens instead.
        q = self.ln_1(x)
        x = x + self.attn(q, q, q, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TypeEmbedding(nn.Module):
    """The control types' sinusoidal vector -> an addition to the time embedding (Linear, SiLU, Linear)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ControlNetUnion(ControlNet):
    """A ControlNet whose hint is a `UnionHint`: one or several conditions, each with its control type."""

    def __init__(self, cfg: UNetConfig, union: UnionConfig):
        super().__init__(cfg)
        self.union = union
        self.task_embedding = nn.Parameter(torch.zeros(union.control_types, union.channels))
        self.transformer_layes = nn.ModuleList(ConditionBlock(union.channels, union.heads) for _ in range(union.layers))
        self.spatial_ch_projs = nn.Linear(union.channels, cfg.model_channels)
        self.control_add_embedding = TypeEmbedding(union.type_embed_dim * union.control_types, cfg.time_embed_dim)

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """As a ControlNet's, but a hole marked -1 (an inpaint or outpaint hint) is read as black: the Union models
        were trained with the masked pixels set to 0 (xinsir's and diffusers' repaint rule)."""
        return super().embed_hint(hint.clamp(min=0))

    def type_vector(self, types: tuple[int, ...]) -> torch.Tensor:
        """The control types of one forward -> (1, time_embed_dim): one-hot, each entry embedded like a timestep."""
        one_hot = torch.zeros(self.union.control_types, device=self.task_embedding.device)
        one_hot[list(types)] = 1.0
        sinus = timestep_embedding(one_hot, self.union.type_embed_dim)  # (types, d)
        return self.control_add_embedding(sinus.reshape(1, -1).to(self.task_embedding.dtype))

    def time_embedding(self, t: torch.Tensor, batch: int, y: torch.Tensor | None, hint_emb: UnionHint) -> torch.Tensor:
        return embed_time(self, t, batch, y) + self.type_vector(hint_emb.types)

    def add_hint(self, h: torch.Tensor, hint_emb: UnionHint) -> torch.Tensor:
        scales = hint_emb.scales or (1.0,) * len(hint_emb.features)
        several = hint_emb.scales is not None
        features = [f.to(h.dtype) * s if several else f.to(h.dtype) for f, s in zip(hint_emb.features, scales)]
        tokens = [f.mean(dim=(2, 3)) + self.task_embedding[i] for f, i in zip(hint_emb.features, hint_emb.types)]
        tokens = [tok.to(h.dtype) * s if several else tok.to(h.dtype) for tok, s in zip(tokens, scales)]
        b = h.shape[0]
        x = torch.stack([*(tok.expand(b, -1) for tok in tokens), h.mean(dim=(2, 3))], dim=1)  # (b, conditions + 1, C)
        for layer in self.transformer_layes:
            x = layer(x)
        fused = None
        for i, (f, s) in enumerate(zip(features, scales)):
            alpha = self.spatial_ch_projs(x[:, i])[:, :, None, None]  # (b, C, 1, 1): one offset per channel
            part = f + (alpha * s if several else alpha)
            fused = part if fused is None else fused + part
        return h + fused
