"""Cross-attention transformer blocks of the SD UNet (LDM names, torch SDPA)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# An attention processor computes a CrossAttention layer's output from its input x (batch, tokens, width) and its
# context (None: self-attention), reading the layer's own projections. Adapters that change attention (a second
# key/value path, extra tokens to attend to) set their processors on the layers from outside, for one request.
AttentionProcessor = Callable[["CrossAttention", torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_attention(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The plain processor: softmax(q k^T / sqrt(d)) v through torch's SDPA."""
    _, out = attn.attend(x, context)
    return attn.project_out(out)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given. `processor` computes it (default: plain SDPA);
    it is a function, not a module, so it never enters the state dict."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        # SD2.1's `upcast_attention`: scores in fp32 when the model runs in half precision. torch's fused SDPA kernels
        # on CUDA and on the CPU accumulate in fp32 already (diffusers' SDPA processor ignores the flag for that
        # reason; doing it again cost 1.9x per SD2 step on this CPU); on other devices the attention is computed in
        # fp32 and cast back.
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # .1 was dropout
        self.processor: AttentionProcessor = sdpa_attention

    def split_heads(self, t: torch.Tensor, b: int) -> torch.Tensor:
        return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)  # (b, n, h*d) -> (b, h, n, d)

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries of x and their attention over the context (x itself without one), both (b, h, n, d)."""
        context = x if context is None else context
        b = x.shape[0]
        q = self.split_heads(self.to_q(x), b)
        k, v = self.split_heads(self.to_k(context), b), self.split_heads(self.to_v(context), b)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16) and q.device.type not in ("cuda", "cpu"):
            return q, F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return q, F.scaled_dot_product_attention(q, k, v)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (b, h, n, d) -> (b, n, h*d) -> (b, n, query)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, x, context)


@contextlib.contextmanager
def processors_set(layers: Sequence[CrossAttention], processors: Sequence[AttentionProcessor]) -> Iterator[None]:
    """Within the block, each layer computes with its processor; the layers' former processors come back after."""
    if len(layers) != len(processors):
        raise ValueError(f"{len(processors)} attention processors for {len(layers)} layers")
    former = [a.processor for a in layers]
    for a, p in zip(layers, processors):
        a.processor = p
    try:
        yield
    finally:
        for a, p in zip(layers, former):
            a.processor = p


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

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


# The LDM SpatialTransformer normalises with eps 1e-6, unlike the ResBlocks (1e-5).
TRANSFORMER_NORM_EPS = 1e-6


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> transformer blocks -> image features, with a residual."""

    def __init__(
        self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool, upcast: bool = False
    ):
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
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast) for _ in range(depth)
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
