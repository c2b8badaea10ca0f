"""IP-Adapter (Ye et al. 2023): an image prompt as extra tokens with their own key/value projections.

A frozen CLIP image encoder gives an embedding (plain adapter) or its penultimate hidden states ("plus"); the
projection turns that into a few tokens of the text-context width (plain: Linear + LayerNorm, 4 tokens; plus: a
perceiver Resampler, 16 tokens); every cross-attention layer of the UNet adds `scale * attention(q, to_k_ip(tokens),
to_v_ip(tokens))` to its text attention (an attention processor, `attached` for one request). The text path and the
ControlNets are unchanged. Module names follow the published files (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip`
with N the odd numbers of diffusers' attention-processor order), so a file loads with a prefix strip only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cldm.errors import CheckpointError, InputError
from cldm.io import checkpoints
from cldm.io.assemble import build
from cldm.models.attention import processors_set
from cldm.models.image_encoder import ImageEncoder


@dataclass(frozen=True)
class IPAdapterConfig:
    kind: str  # "plain" or "plus"
    image_dim: int  # CLIP image embedding width (plain) or hidden width (plus)
    context_dim: int  # the UNet's text-context width
    tokens: int  # image-prompt tokens
    layer_dims: tuple[int, ...]  # query width... (the to_k_ip/to_v_ip output width) of each cross-attention layer
    # Resampler (plus) only
    hidden_dim: int = 0
    depth: int = 0
    heads: int = 0
    dim_head: int = 64
    ff_mult: int = 4


class ImageProjModel(nn.Module):
    """The plain adapter's projection: one embedding -> `tokens` tokens (Linear, reshape, LayerNorm)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.image_dim, cfg.tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """Learned queries attend to [image features, queries] (the Resampler's attention, original names)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # = softmax(q k^T / sqrt(d)) v, as the original computes it
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """The plus adapter's projection: `tokens` learned queries read the encoder's hidden states in `depth` rounds."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.latents = nn.Parameter(torch.randn(1, cfg.tokens, dim) / dim**0.5)
        self.proj_in = nn.Linear(cfg.image_dim, dim)
        self.proj_out = nn.Linear(dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)
        inner = dim * cfg.ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, cfg.dim_head, cfg.heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, inner, bias=False),
                        nn.GELU(),
                        nn.Linear(inner, dim, bias=False),
                    ),
                ]
            )  # fmt: skip
            for _ in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPLayer(nn.Module):
    """The key and value projections of the image tokens for one cross-attention layer."""

    def __init__(self, context_dim: int, dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, dim, bias=False)


class IPAdapter(nn.Module):
    """Projection + per-layer key/value projections. State-dict keys are the published files' (with the index of
    every other attention processor holding nothing: `ip_adapter.1`, `.3`, ...)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.image_proj = ImageProjModel(cfg) if cfg.kind == "plain" else Resampler(cfg)
        # the files number all attention processors (self- and cross-attention); only the cross ones have weights
        self.ip_adapter = nn.ModuleDict(
            {str(2 * i + 1): IPLayer(cfg.context_dim, d) for i, d in enumerate(cfg.layer_dims)}
        )

    @property
    def uses_hidden_states(self) -> bool:
        """Plus adapters read the encoder's penultimate hidden states, plain ones its projected embedding."""
        return self.cfg.kind == "plus"

    @property
    def layers(self) -> list[IPLayer]:
        return [self.ip_adapter[str(2 * i + 1)] for i in range(len(self.cfg.layer_dims))]

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_proj(features.to(next(self.image_proj.parameters()).dtype))


class ImagePromptAttention:
    """A cross-attention processor: the text attention plus `scale * softmax(q k_ip^T) v_ip` over the image-prompt
    tokens (batch, tokens, context width; the UNet's guidance batch), before the output projection."""

    def __init__(self, layer: IPLayer, tokens: torch.Tensor, scale: float):
        self.layer, self.tokens, self.scale = layer, tokens, scale

    def __call__(self, attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        q, out = attn.attend(x, context)
        if self.scale != 0:
            b = x.shape[0]
            k, v = (attn.split_heads(f(self.tokens), b) for f in (self.layer.to_k_ip, self.layer.to_v_ip))
            out = out + self.scale * F.scaled_dot_product_attention(q, k, v).to(q.dtype)
        return attn.project_out(out)


@contextlib.contextmanager
def attached(unet, adapter: IPAdapter, tokens: torch.Tensor, scales: Sequence[float]) -> Iterator[None]:
    """The adapter's processors on the UNet's cross-attention layers (one scale each, `layer_scales`), for the
    block's duration; the layers' own processors come back after."""
    processors = [ImagePromptAttention(layer, tokens, s) for layer, s in zip(adapter.layers, scales, strict=True)]
    with processors_set(unet.cross_attentions(), processors):
        yield


# ------------------------------------------------------------------------------------------------- scales
BLOCK_LAYERS_SD15 = {"down": {"block_0": 2, "block_1": 2, "block_2": 2}, "up": {"block_1": 3, "block_2": 3, "block_3": 3},
                     "mid": 1}  # fmt: skip


def layer_scales(scale: float | dict, n_layers: int = 16) -> list[float]:
    """One scale per cross-attention layer, in `UNet.cross_attentions()` order, from a number or from diffusers'
    `set_ip_adapter_scale` dictionary: {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": 1.0}, "mid": 0.5}.
    Blocks and layers not named get 0, as diffusers does; a block's number may stand for all its layers."""
    if not isinstance(scale, dict):
        return [float(scale)] * n_layers
    if n_layers != 16:
        raise InputError(
            "per-block IP-Adapter scales are defined for the SD1.5 UNet layout (16 cross-attention layers)"
        )
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise InputError(f"IP-Adapter scale: unknown part(s) {', '.join(sorted(unknown))}; use down, mid, up")
    out: list[float] = []
    for part in ("down", "up", "mid"):
        given = scale.get(part, 0.0)
        if part == "mid":
            out.append(float(given if not isinstance(given, (list, dict)) else given[0]))
            continue
        blocks = BLOCK_LAYERS_SD15[part]
        if not isinstance(given, dict):
            given = {b: given for b in blocks}
        bad = set(given) - set(blocks)
        if bad:
            raise InputError(f"IP-Adapter scale: {part} has no cross-attention in {', '.join(sorted(bad))} "
                             f"(SD1.5: {', '.join(blocks)})")  # fmt: skip
        for block, n in blocks.items():
            v = given.get(block, 0.0)
            values = list(v) if isinstance(v, (list, tuple)) else [v] * n
            if len(values) != n:
                raise InputError(f"IP-Adapter scale: {part}.{block} has {n} layers, got {len(values)} scales")
            out += [float(x) for x in values]
    if any(not math.isfinite(x) for x in out):
        raise InputError("IP-Adapter scales must be finite numbers")
    return out


# ------------------------------------------------------------------------------------------------ loading
def config_from_state(state: dict[str, torch.Tensor], what: str) -> IPAdapterConfig:
    """The adapter's shape, read off its weights (published files carry no config)."""
    try:
        layers = sorted(
            (int(k.split(".")[1]), v.shape[0])
            for k, v in state.items()
            if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")
        )
        if not layers:
            raise KeyError("ip_adapter.N.to_k_ip.weight")
        context_dim = state[f"ip_adapter.{layers[0][0]}.to_k_ip.weight"].shape[1]
        dims = tuple(d for _, d in layers)
        if "image_proj.proj.weight" in state:  # plain: Linear(image_dim, tokens * context) + LayerNorm(context)
            w = state["image_proj.proj.weight"]
            return IPAdapterConfig("plain", w.shape[1], context_dim, w.shape[0] // context_dim, dims)
        latents = state["image_proj.latents"]  # plus: the Resampler
        depth = len({k.split(".")[2] for k in state if k.startswith("image_proj.layers.")})
        hidden, inner = latents.shape[2], state["image_proj.layers.0.1.1.weight"].shape[0]
        return IPAdapterConfig(
            "plus", state["image_proj.proj_in.weight"].shape[1], context_dim, latents.shape[1], dims, hidden_dim=hidden,
            depth=depth, heads=state["image_proj.layers.0.0.to_q.weight"].shape[0] // 64, ff_mult=inner // hidden,
        )  # fmt: skip
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(
            f"{what} is not an IP-Adapter this program reads (missing or odd {e}): use ip-adapter_sd15, "
            "ip-adapter-plus_sd15 or ip-adapter-plus-face_sd15 (.bin or .safetensors)."
        ) from e


def load_ip_adapter(path, dtype: torch.dtype = torch.float32) -> IPAdapter:
    """An IP-Adapter file (`ip-adapter_sd15.bin`, `ip-adapter-plus_sd15.safetensors`, ...), read through
    `checkpoints` (pickles never run code), built strictly."""
    name = Path(path).name
    state = checkpoints.read_file(path)
    if not any(k.startswith(("image_proj.", "ip_adapter.")) for k in state):
        raise CheckpointError(f"{name} is {checkpoints.describe(state)}, not an IP-Adapter.")
    return build(IPAdapter, config_from_state(state, name), state, "IP-Adapter", dtype)


def fit_problem(adapter: IPAdapter, unet) -> str | None:
    """Why this adapter cannot work with this UNet (layer count, widths, text-context width), or None."""
    layers = unet.cross_attentions()
    widths = tuple(a.to_q.out_features for a in layers)
    context = layers[0].to_k.in_features if layers else 0
    if adapter.cfg.layer_dims == widths and adapter.cfg.context_dim == context:
        return None
    return (
        f"the IP-Adapter has {len(adapter.cfg.layer_dims)} attention layers of widths {sorted(set(adapter.cfg.layer_dims))} "
        f"for a {adapter.cfg.context_dim}-wide text context; the base model has {len(widths)} of widths "
        f"{sorted(set(widths))} for {context}"
    )


# ------------------------------------------------------------------------------------------- in a request
def image_prompt_problem(prompt, unet) -> str | None:
    """Why a request's ImagePrompt cannot run on this UNet (not loaded, or another family), or None."""
    if not isinstance(prompt.adapter, IPAdapter) or not isinstance(prompt.encoder, ImageEncoder):
        return f"the image prompt's adapter and encoder ({prompt.label}) are not loaded (the model manager loads files)"
    why = fit_problem(prompt.adapter, unet)
    if why is not None:
        return f"the IP-Adapter {prompt.label} does not fit this base model: {why}. Use an SD1.5 IP-Adapter."
    width = (
        prompt.encoder.clip.config.hidden_size
        if prompt.adapter.uses_hidden_states
        else prompt.encoder.clip.config.projection_dim
    )
    if width != prompt.adapter.cfg.image_dim:
        return (
            f"the image encoder gives {width}-wide features but the IP-Adapter {prompt.label} takes "
            f"{prompt.adapter.cfg.image_dim}: use the encoder published with it (ViT-H/14 for the SD1.5 adapters)"
        )
    return None


@torch.no_grad()
def prompt_tokens(prompt, batch: int, guidance: bool) -> torch.Tensor:
    """The image-prompt tokens for the UNet's batch: [unconditional x batch, conditional x batch] with guidance.

    Several pictures average their encoder features. The unconditional side is what the original uses: a zero
    embedding for plain adapters, the encoder's features of an all-zero (normalised) picture for plus adapters.
    """
    adapter, encoder = prompt.adapter, prompt.encoder
    pixels = encoder.pixels(list(prompt.images))
    if adapter.uses_hidden_states:
        cond = encoder.hidden(pixels).mean(0, keepdim=True)
        uncond = encoder.hidden(torch.zeros_like(pixels[:1]))
    else:
        cond = encoder.embeds(pixels).mean(0, keepdim=True)
        uncond = torch.zeros_like(cond)
    tokens_c = adapter.tokens(cond).expand(batch, -1, -1)
    if not guidance:
        return tokens_c
    return torch.cat([adapter.tokens(uncond).expand(batch, -1, -1), tokens_c])
