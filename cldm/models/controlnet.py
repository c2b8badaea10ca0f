"""ControlNet: a trainable copy of the UNet encoder that reads a hint and emits 13 residuals."""

from __future__ import annotations

import torch
from torch import nn

from cldm.models.config import UNetConfig, family_of_config
from cldm.models.unet import build_encoder, build_label_emb, build_time_embed, embed_time

# Guess mode ("no prompt") in the original ControlNet: deeper residuals count more, shallow ones fade,
# scale_i = strength * 0.825 ** (12 - i) for the 13 outputs (i = 12 is the middle block).
GUESS_MODE_DECAY = 0.825
SD15_RESIDUALS = 13  # 12 input blocks and the middle block


def build_hint_block(cfg: UNetConfig) -> nn.Sequential:
    """Hint image -> latent-sized features: 3x3 convs with SiLU, stride 2 on every widening step.

    With the SD1.5 channels (16, 32, 96, 256) the indices match the original (`input_hint_block.14` is the last conv)
    and a 512 px hint lands at 64x64.
    """
    chans = cfg.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, chans[0], 3, padding=1), nn.SiLU()]
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [
            nn.Conv2d(c_in, c_in, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1, stride=2),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(chans[-1], cfg.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> nn.Sequential:
    """1x1 conv initialised to zero, wrapped like the original (keys `zero_convs.N.0.*`)."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv)


def guess_mode_scales(strength: float, n: int = 13, style: str = "original") -> list[float]:
    """Per-residual scales in guess mode (shallow -> deep, middle last).

    "original": strength * 0.825 ** (12 - i), as lllyasviel's code and A1111; "diffusers": strength * 10 ** (i/12 - 1),
    diffusers' logspace(-1, 0, 13). They agree at the middle block and differ by under 1% elsewhere.

    With n residuals each rule spaces its n scales up to the middle block's (diffusers: 0.1 to 1); A1111's rule for
    SDXL is `soft_injection_scales`.
    """
    if style == "diffusers":
        return [strength * 10 ** (-1 + i / (n - 1)) for i in range(n)]
    return [strength * GUESS_MODE_DECAY ** (n - 1 - i) for i in range(n)]


def soft_injection_scales(strength: float, n: int, sdxl: bool) -> list[float]:
    """A1111's soft injection ("My prompt is more important", "ControlNet is more important") for a ControlNet with
    n residuals: for SDXL's 10 the extension takes the first 10 of its 13 SD1.5 scales (hook.py:
    `control_scales[:10]`), so SDXL's middle block gets 0.825 ** 3, not 1; otherwise `guess_mode_scales`."""
    if sdxl:
        return guess_mode_scales(strength, SD15_RESIDUALS)[:n]
    return guess_mode_scales(strength, n)


class ControlNet(nn.Module):
    """Encoder copy + input_hint_block + zero convs + middle_block_out (LDM/ControlNet names)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = build_time_embed(cfg)
        self.label_emb = build_label_emb(cfg)
        self.input_hint_block = build_hint_block(cfg)
        self.input_blocks, self.middle_block, widths = build_encoder(cfg)
        self.zero_convs = nn.ModuleList(zero_conv(w) for w in widths)
        self.middle_block_out = zero_conv(widths[-1])
        nn.init.zeros_(self.input_hint_block[-1].weight)
        nn.init.zeros_(self.input_hint_block[-1].bias)

    @classmethod
    def from_unet(cls, unet: nn.Module, cfg: UNetConfig) -> ControlNet:
        """A fresh ControlNet for training: the UNet's encoder copied in, zero convs and last hint conv at zero.

        This is the original `tool_add_control`: every key the two share by name is copied.
        """
        cn = cls(cfg)
        own = cn.state_dict()
        shared = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
        cn.load_state_dict(shared, strict=False)
        return cn

    @property
    def hint_factor(self) -> int:
        """How much the hint block downsamples (8 for SD1.5)."""
        return 2 ** (len(self.cfg.hint_block_channels) - 1)

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint image (b, 3, H, W) in [0, 1] -> features at latent size. Independent of the timestep: call once."""
        return self.input_hint_block(hint.to(self.input_hint_block[0].weight.dtype))

    def time_embedding(self, t: torch.Tensor, batch: int, y: torch.Tensor | None, hint_emb) -> torch.Tensor:
        """The timestep (+ vector conditioning) embedding; a ControlNet Union adds its control types here."""
        return embed_time(self, t, batch, y)

    def add_hint(self, h: torch.Tensor, hint_emb) -> torch.Tensor:
        """The first block's output with the hint added (a ControlNet Union fuses its conditions here)."""
        return h + hint_emb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint_emb: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """Noisy latent + hint embedding (+ SDXL's vector conditioning y) -> one residual per input block (12 for
        SD1.5, 9 for SDXL), then the middle block's."""
        emb = self.time_embedding(t, x.shape[0], y, hint_emb)
        outs = []
        h = x
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = self.add_hint(h, hint_emb)
            outs.append(zc(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        if self.cfg.global_average_pooling:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return outs


def _shape(cfg: UNetConfig, hint_factor: int) -> str:
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    return (
        f"{family_of_config(cfg)}: {cfg.in_channels} latent channels, block widths {widths} with "
        f"{cfg.num_res_blocks} blocks each, {cfg.context_dim}-wide text context, hint downsampled {hint_factor}x"
    )


def fit_problem(cn: ControlNet, base: UNetConfig, latent_factor: int) -> str | None:
    """Why this ControlNet cannot drive a UNet of config `base` whose VAE downsamples by `latent_factor`, or None.

    Its 13 residuals are added to the UNet's skips, so channel widths, block counts and levels must agree; it reads
    the same text context and latent; and its hint block must bring a picture down to the latent size.
    """
    c = cn.cfg
    same = (
        c.in_channels == base.in_channels
        and c.model_channels == base.model_channels
        and tuple(c.channel_mult) == tuple(base.channel_mult)
        and c.num_res_blocks == base.num_res_blocks
        and c.context_dim == base.context_dim
        and c.adm_in_channels == base.adm_in_channels
        and cn.hint_factor == latent_factor
    )
    if same:
        return None
    return f"the ControlNet is {_shape(c, cn.hint_factor)}; the base model is {_shape(base, latent_factor)}"
