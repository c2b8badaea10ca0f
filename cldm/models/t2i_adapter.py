"""T2I-Adapter (TencentARC): a small network that reads a hint once per generation and whose features are added to
the UNet's encoder at every step it acts on. Module names are the original ones (`ldm/modules/encoders/adapter.py`),
so the published `.pth` files load as they are: the full `Adapter`, `Adapter_light` and `StyleAdapter`.

The full adapter serves both layouts: SD1.5's (a feature per UNet level, each level halving the size) and SDXL's
(`full_adapter_xl`: the hint unshuffled 16x, one halving only, a fourth feature for the middle block). Their keys are
the same; the unshuffle factor, seen in `conv_in`'s input channels, tells them apart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cldm.models.config import UNetConfig


@dataclass(frozen=True)
class AdapterConfig:
    """What a T2I-Adapter file holds, read from its shapes (`cldm.io.t2i_adapters`)."""

    kind: str = "full"  # "full", "light" or "style"
    hint_channels: int = 3  # 1 for the sketch / canny adapters (they read the hint's grey)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    unshuffle: int = 8  # pixel-unshuffle factor: 8 = the SD VAE's factor, 16 = SDXL's layout
    xl: bool = False  # SDXL's layout: the features land after the first downsample, levels 1.., the middle
    kernel: int = 1  # the published files' in_conv / block2 are 1x1
    # style adapter: CLIP ViT-L/14 tokens -> `num_tokens` tokens of the text context's width
    width: int = 1024
    context_dim: int = 768
    heads: int = 8  # in no file: the published style adapter uses 8
    layers: int = 3
    num_tokens: int = 8

    @property
    def family(self) -> str:
        return "SDXL" if self.xl else "SD1.5"


class ResnetBlock(nn.Module):
    """Optional 2x average pool, a 1x1 in_conv when the width changes, then conv-ReLU-conv with a skip."""

    def __init__(self, c_in: int, c_out: int, down: bool, kernel: int):
        super().__init__()
        self.down_opt = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None  # weightless: no keys
        self.in_conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2) if c_in != c_out else None
        self.block1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(c_out, c_out, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


def _halves(cfg: AdapterConfig, level: int) -> bool:
    """Whether `level` starts by halving the size: every level after the first, or in SDXL's layout only level 2
    (SDXL's UNet halves once before its first feature, which the 16x unshuffle already accounts for)."""
    return level == 2 if cfg.xl else level > 0


class Adapter(nn.Module):
    """The full adapter: unshuffle, conv_in, then `num_res_blocks` ResnetBlocks per level, one feature per level."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.hint_channels * cfg.unshuffle**2, ch[0], 3, padding=1)
        self.body = nn.ModuleList(
            ResnetBlock(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], j == 0 and _halves(cfg, i), cfg.kernel)
            for i in range(len(ch))
            for j in range(cfg.num_res_blocks)
        )

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(self.unshuffle(hint))
        features = []
        for i, block in enumerate(self.body):
            x = block(x)
            if (i + 1) % self.cfg.num_res_blocks == 0:
                features.append(x)
        return features


class ResnetBlock_light(nn.Module):  # noqa: N801 - the original class name
    """conv-ReLU-conv (both 3x3) with a skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class Extractor(nn.Module):
    """One level of the light adapter: optional 2x pool, a 1x1 conv to a quarter width, light blocks, 1x1 back."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, down: bool):
        super().__init__()
        inner = c_out // 4
        self.down_opt = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(c_in, inner, 1)
        self.body = nn.Sequential(*(ResnetBlock_light(inner) for _ in range(num_blocks)))
        self.out_conv = nn.Conv2d(inner, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class Adapter_light(nn.Module):  # noqa: N801 - the original class name
    """The light adapter (the color adapter): unshuffle, then one Extractor per level, one feature per level."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        ch = (cfg.hint_channels * cfg.unshuffle**2, *cfg.channels)
        self.body = nn.ModuleList(
            Extractor(ch[i], ch[i + 1], cfg.num_res_blocks, down=i > 0) for i in range(len(cfg.channels))
        )

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(hint)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (the original's, for half-precision inputs), its weights too when they are half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """A CLIP transformer layer (pre-norm attention and MLP), sequence-first as nn.MultiheadAttention wants."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                         ("c_proj", nn.Linear(width * 4, width))])
        )  # fmt: skip
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    """CLIP image tokens + learned style tokens through a small transformer; the style tokens, projected to the text
    context's width, are appended to the prompt's context."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer_layes = nn.Sequential(
            *(ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        )
        self.style_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.ln_post = LayerNorm(cfg.width)
        self.ln_pre = LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.zeros(cfg.width, cfg.context_dim))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, width) CLIP vision last hidden states -> (b, num_tokens, context_dim)."""
        style = self.style_embedding.expand(image_tokens.shape[0], -1, -1).to(image_tokens.dtype)
        x = self.ln_pre(torch.cat([image_tokens, style], dim=1))
        x = self.transformer_layes(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        return self.ln_post(x[:, -self.cfg.num_tokens :]) @ self.proj


class StyleControl(nn.Module):
    """A StyleAdapter with the CLIP vision model it was trained on (ViT-L/14): a picture -> its style tokens.

    `encoder` is a `cldm.models.image_encoder.ImageEncoder`; `cldm.io.clip_vision` pairs them."""

    def __init__(self, adapter: StyleAdapter, encoder: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.encoder = encoder

    @property
    def cfg(self) -> AdapterConfig:
        return self.adapter.cfg

    def tokens(self, picture) -> torch.Tensor:
        """An HxWx3 uint8 picture -> (1, num_tokens, context_dim): CLIP's 224 px centre crop, the vision model's
        last hidden states (257 x 1024 for ViT-L/14), the adapter (the original's `get_cond_style`)."""
        hidden = self.encoder.last_hidden(self.encoder.pixels([picture]))  # (1, 257, 1024)
        return self.adapter(hidden.to(self.adapter.proj.dtype))


def encoder_problem(adapter: StyleAdapter, encoder: nn.Module) -> str | None:
    """Why this image encoder cannot feed this style adapter (the width of its tokens), or None."""
    width = encoder.clip.config.hidden_size
    if width != adapter.cfg.width:
        return (f"the style adapter reads {adapter.cfg.width}-wide CLIP tokens (CLIP ViT-L/14: 1024) and this image "
                f"encoder gives {width}-wide ones")  # fmt: skip
    return None


T2I_ADAPTERS = (Adapter, Adapter_light, StyleAdapter, StyleControl)
SPATIAL = (Adapter, Adapter_light)  # the ones whose features go into the UNet's encoder
ADAPTER_CLASSES = {"full": Adapter, "light": Adapter_light, "style": StyleAdapter}


def injection_points(cfg: AdapterConfig, unet: UNetConfig) -> list[int]:
    """The UNet input block after which each feature is added (`len(input_blocks)` = after the middle block).

    diffusers' `down_intrablock_additional_residuals`: SD1.5 adds feature i after the last ResBlock (+ attention) of
    level i, before its downsample (blocks 2, 5, 8, 11); SDXL adds feature 0 after level 0's downsample, features 1..
    after the last blocks of levels 1.., and the last one after the middle block (blocks 3, 5, 8, middle). The sum
    enters the skip connection too."""
    per_level = unet.num_res_blocks + 1
    last = [level * per_level + unet.num_res_blocks for level in range(len(unet.channel_mult))]
    if not cfg.xl:
        return last
    return [per_level, *last[1:], len(unet.channel_mult) * per_level]


def fit_problem(adapter: nn.Module, base: UNetConfig, family: str, latent_factor: int) -> str | None:
    """Why this adapter cannot drive a UNet of config `base` (family `family`), or None."""
    cfg: AdapterConfig = adapter.cfg
    if cfg.family != family:
        return f"it is a T2I-Adapter for {cfg.family} models; the base model is {family}"
    if cfg.kind == "style":
        if cfg.context_dim != base.context_dim:
            return f"its tokens are {cfg.context_dim} wide; the base model's text context is {base.context_dim} wide"
        return None
    widths = [base.model_channels * m for m in base.channel_mult]
    want = [*widths, widths[-1]] if cfg.xl else widths
    scale = 2 * latent_factor if cfg.xl else latent_factor
    if list(cfg.channels) != want or cfg.unshuffle != scale:
        return (f"its features are {list(cfg.channels)} wide at 1/{cfg.unshuffle} of the picture; the base model "
                f"takes {want} at 1/{scale}")  # fmt: skip
    return None
