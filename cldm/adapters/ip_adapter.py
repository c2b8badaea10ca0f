"""IP-Adapter (Ye et al. 2023): an image prompt as extra tokens with their own key/value projections.

A frozen CLIP image encoder gives an embedding (plain adapter) or its penultimate hidden states ("plus"); the
projection turns that into a few tokens of the text-context width (plain: Linear + LayerNorm, 4 tokens; plus: a
perceiver Resampler, 16 tokens); every cross-attention layer of the UNet adds `scale * attention(q, to_k_ip(tokens),
to_v_ip(tokens))` to its text attention (an attention processor, `attached` for one request). The text path and the
ControlNets are unchanged. Module names follow the published files (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip`
with N the odd numbers of diffusers' attention-processor order), so a file loads with a prefix strip only.

Every size is read off the file's shapes, so one code serves the families: SD1.5's adapters have 16 layers and
768-wide tokens, SDXL's 70 layers (down 2*2 + 2*10, up 3*2 + 3*10, mid 10) and 2048-wide tokens; `ip-adapter_sdxl`
reads ViT-bigG/14's 1280-wide embeds, the `_vit-h` ones ViT-H/14's 1024-wide embeds (plain) or 1280-wide hidden
states (plus: a Resampler 1280 wide with 20 heads of 64). An adapter for another family, or an image encoder whose
features the adapter does not take, is refused before sampling with both named (`image_prompt_problem`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cldm.adapters.ip_masks import mask_for_queries
from cldm.adapters.ip_scales import layer_scales, scale_layout
from cldm.errors import CheckpointError, InputError
from cldm.io import files, identify
from cldm.io.assemble import build
from cldm.models.attention import processors_set
from cldm.models.config import family_of_config
from cldm.models.family import FAMILIES, family, family_name_for_context
from cldm.models.image_encoder import ImageEncoder, encoder_for


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


@dataclass(frozen=True)
class Attachment:
    """One IP-Adapter as a request runs it: its tokens for the UNet's batch, one scale per cross-attention layer
    (`layer_scales`) and an optional region mask (1, H, W) of 0 / 1 at the picture size (`ip_masks.fitted_mask`)."""

    adapter: IPAdapter
    tokens: torch.Tensor
    scales: Sequence[float]
    mask: torch.Tensor | None = None


class ImagePromptAttention:
    """A cross-attention processor: the text attention plus, for each adapter, `scale * softmax(q k_ip^T) v_ip` over
    its image-prompt tokens (batch, tokens, context width; the UNet's guidance batch), times its region mask where
    it has one, summed in the adapters' order before the output projection (diffusers' IPAdapterAttnProcessor2_0)."""

    def __init__(self, paths: Sequence[tuple[IPLayer, torch.Tensor, float, torch.Tensor | None]]):
        self.paths = paths  # (layer, tokens, scale, mask) per adapter
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # (adapter, queries) -> its mask on those queries

    def _mask(self, i: int, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        queries = out.shape[2]
        if (i, queries) not in self._masks:
            self._masks[i, queries] = mask_for_queries(mask, queries).to(out.device, out.dtype)  # (n, 1)
        return self._masks[i, queries]

    def __call__(self, attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        q, out = attn.attend(x, context)
        b = x.shape[0]
        for i, (layer, tokens, scale, mask) in enumerate(self.paths):
            if scale == 0:
                continue
            k, v = (attn.split_heads(f(tokens), b) for f in (layer.to_k_ip, layer.to_v_ip))
            ip = F.scaled_dot_product_attention(q, k, v).to(q.dtype)  # (b, heads, n, d)
            if mask is not None:
                ip = ip * self._mask(i, mask, ip)
            out = out + scale * ip
        return attn.project_out(out)


@contextlib.contextmanager
def attached_all(unet, attachments: Sequence[Attachment]) -> Iterator[None]:
    """The adapters' processors on the UNet's cross-attention layers, for the block's duration; the layers' own
    processors come back after."""
    per_layer = zip(*[zip(a.adapter.layers, a.scales, strict=True) for a in attachments], strict=True)
    processors = [
        ImagePromptAttention([(layer, a.tokens, s, a.mask) for a, (layer, s) in zip(attachments, paths)])
        for paths in per_layer
    ]
    with processors_set(unet.cross_attentions(), processors):
        yield


def attached(unet, adapter: IPAdapter, tokens: torch.Tensor, scales: Sequence[float]):
    """One adapter's processors on the UNet for the block's duration (`attached_all` of one)."""
    return attached_all(unet, [Attachment(adapter, tokens, scales)])


# ------------------------------------------------------------------------------------------------- scales
# ------------------------------------------------------------------------------------------------ loading
def _published() -> str:
    return "; ".join(f"{f.name}: {', '.join(f.ip_adapters)}" for f in FAMILIES.values() if f.ip_adapters)


def config_from_state(state: dict[str, torch.Tensor], what: str) -> IPAdapterConfig:
    """The adapter's shape, read off its weights (published files carry no config): the layer count and widths,
    the text-context width (SD1.5 768, SDXL 2048), the token count and, for the Resampler, its width, depth,
    heads (64-wide, as the original and diffusers take them) and feed-forward ratio."""
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
            if w.shape[0] % context_dim:
                raise ValueError(f"image_proj.proj.weight: {w.shape[0]} rows are no whole number of tokens")
            return IPAdapterConfig("plain", w.shape[1], context_dim, w.shape[0] // context_dim, dims)
        latents = state["image_proj.latents"]  # plus: the Resampler
        depth = len({k.split(".")[2] for k in state if k.startswith("image_proj.layers.")})
        hidden, inner = latents.shape[2], state["image_proj.layers.0.1.1.weight"].shape[0]
        q_rows = state["image_proj.layers.0.0.to_q.weight"].shape[0]
        if q_rows % 64:
            raise ValueError(f"image_proj.layers.0.0.to_q.weight: {q_rows} rows are no whole number of 64-wide heads")
        return IPAdapterConfig(
            "plus", state["image_proj.proj_in.weight"].shape[1], context_dim, latents.shape[1], dims, hidden_dim=hidden,
            depth=depth, heads=q_rows // 64, ff_mult=inner // hidden,
        )  # fmt: skip
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(
            f"{what} is not an IP-Adapter this program reads (missing or odd {e}): use a published one "
            f"({_published()}; .bin or .safetensors)."
        ) from e


def load_ip_adapter(path, dtype: torch.dtype = torch.float32) -> IPAdapter:
    """An IP-Adapter file (`ip-adapter_sd15.bin`, `ip-adapter-plus_sdxl_vit-h.safetensors`, ...), read through
    `checkpoints` (pickles never run code), built strictly."""
    name = Path(path).name
    state = files.read_file(path)
    if not any(k.startswith(("image_proj.", "ip_adapter.")) for k in state):
        raise CheckpointError(f"{name} is {identify.describe(state)}, not an IP-Adapter.")
    return build(IPAdapter, config_from_state(state, name), state, "IP-Adapter", dtype)


def adapter_family(cfg: IPAdapterConfig) -> str:
    """The family an adapter was made for: by its text-context width (SD1.5 768, SD2.x 1024, SDXL 2048); at a width
    no family has (small test models), by its layout: SDXL stacks several transformer layers in the middle block, the
    others one (the middle block's layers come last and are wider than the up blocks' last ones)."""
    name = family_name_for_context(cfg.context_dim)
    if name in FAMILIES:
        return name
    dims, mid = cfg.layer_dims, 1
    while mid < len(dims) and dims[-mid - 1] == dims[-1]:
        mid += 1
    return "SDXL" if mid > 1 else "SD1.5"


def _shape(n_layers: int, context: int) -> str:
    return f"{n_layers} cross-attention layers, {context}-wide text context"


def fit_problem(adapter: IPAdapter, unet) -> str | None:
    """Why this adapter cannot work with this UNet (layer count, widths, text-context width), or None; both
    families named."""
    layers = unet.cross_attentions()
    widths = tuple(a.to_q.out_features for a in layers)
    context = layers[0].to_k.in_features if layers else 0
    cfg = adapter.cfg
    if cfg.layer_dims == widths and cfg.context_dim == context:
        return None
    return (
        f"the IP-Adapter is made for {adapter_family(cfg)} ({_shape(len(cfg.layer_dims), cfg.context_dim)}) and the "
        f"base model is {family_of_config(unet.cfg)} ({_shape(len(widths), context)})"
    )


# ------------------------------------------------------------------------------------------- in a request
def _encoder_problem(prompt) -> str | None:
    """Why the request's image encoder cannot feed its adapter (the features' width), or None."""
    adapter, encoder = prompt.adapter, prompt.encoder
    hidden, need = adapter.uses_hidden_states, adapter.cfg.image_dim
    width = encoder.width(hidden)
    if width == need:
        return None
    what = "hidden states" if hidden else "image embeds"
    wanted = encoder_for(need, hidden)
    use = (
        f"{wanted.name}, `{wanted.hub_folder}` of h94/IP-Adapter"
        if wanted is not None
        else "the encoder published with the adapter"
    )
    this = "the image encoder" + (f" ({encoder.kind.name})" if encoder.kind is not None else "")
    return f"{this} gives {width}-wide {what} but the IP-Adapter {prompt.label} takes {need}-wide ones: use {use}"


def image_prompt_problem(prompt, unet) -> str | None:
    """Why a request's ImagePrompt cannot run on this UNet (not loaded, another family, an image encoder that does
    not fit the adapter, per-block scales for another layout), or None."""
    if not isinstance(prompt.adapter, IPAdapter) or not isinstance(prompt.encoder, ImageEncoder):
        return f"the image prompt's adapter and encoder ({prompt.label}) are not loaded (the model manager loads files)"
    why = fit_problem(prompt.adapter, unet)
    if why is not None:
        base = family(family_of_config(unet.cfg))
        use = (
            f"Use an IP-Adapter made for {base.name} ({', '.join(base.ip_adapters)})"
            if base.ip_adapters
            else f"No IP-Adapter is published for {base.name}"
        )
        return f"the IP-Adapter {prompt.label} does not fit this base model: {why}. {use}."
    why = _encoder_problem(prompt)
    if why is not None:
        return why
    try:
        layer_scales(prompt.scale, scale_layout(unet.cfg))
    except InputError as e:
        return str(e)
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
