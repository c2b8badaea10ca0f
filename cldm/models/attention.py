"""Cross-attention transformer blocks of the SD UNet (LDM names, torch SDPA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PromptContext:
    """What the UNet's cross-attention layers read: the text tokens and, with an IP-Adapter, the image-prompt
    tokens, the adapter's key/value projections (one pair per cross-attention layer, in diffusers' order) and a
    scale per layer. The UNet passes it down untouched; only `CrossAttention` looks inside. A plain tensor means
    text only."""

    text: torch.Tensor
    image: torch.Tensor | None = None  # (batch, tokens, context width), the guidance batch like `text`
    ip_layers: Sequence[nn.Module] = ()  # each with to_k_ip, to_v_ip
    scales: Sequence[float] = ()
    reference: object = None  # reference.ReferenceState during a reference-only step


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given.

    A cross-attention layer of the UNet has an `ip_index` (its place in diffusers' attention-processor order among
    the cross-attention layers): with a PromptContext that carries image tokens it adds the decoupled attention over
    them, `scale * softmax(q k_ip^T) v_ip`, to the text attention before the output projection (IP-Adapter).
    """

    ip_index: int | None = None

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # .1 was dropout

    def _heads(self, t: torch.Tensor, b: int) -> torch.Tensor:
        return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)  # (b, n, h*d) -> (b, h, n, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | PromptContext | None = None) -> torch.Tensor:
        prompt = context if isinstance(context, PromptContext) else None
        context = x if context is None else prompt.text if prompt is not None else context
        b, n, _ = x.shape
        q = self._heads(self.to_q(x), b)
        out = F.scaled_dot_product_attention(q, self._heads(self.to_k(context), b), self._heads(self.to_v(context), b))
        if prompt is not None and prompt.image is not None and self.ip_index is not None:
            scale = prompt.scales[self.ip_index]
            if scale != 0:
                layer = prompt.ip_layers[self.ip_index]
                k, v = (self._heads(f(prompt.image), b) for f in (layer.to_k_ip, layer.to_v_ip))
                out = out + scale * F.scaled_dot_product_attention(q, k, v).to(q.dtype)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (b, h, n, d) -> (b, n, h*d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU: one projection gives both the value and its gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with the LDM 4x expansion."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | PromptContext) -> torch.Tensor:
        ref = context.reference if isinstance(context, PromptContext) else None
        h = self.norm1(x)
        x = x + (self.attn1(h) if ref is None else ref.self_attention(self, h))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


# The LDM SpatialTransformer normalises with eps 1e-6, unlike the ResBlocks (1e-5).
TRANSFORMER_NORM_EPS = 1e-6


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> transformer blocks -> image features, with a residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        if linear:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        if not self.linear:
            h_ = self.proj_in(h_)
        h_ = h_.flatten(2).transpose(1, 2)  # (b, c, h, w) -> (b, h*w, c)
        if self.linear:
            h_ = self.proj_in(h_)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        if self.linear:
            h_ = self.proj_out(h_)
        h_ = h_.transpose(1, 2).reshape(b, c, h, w)  # (b, h*w, c) -> (b, c, h, w)
        if not self.linear:
            h_ = self.proj_out(h_)
        return x + h_
