"""Training pictures as tensors, and a pool of them VAE-encoded once (the encoder is frozen after its own stage).

Encoding a batch costs about a third of a small UNet step on the CPU; with a pool of N pictures drawn at random, a
run of S steps of batch B encodes min(N, S * B) pictures instead of S * B.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cldm.models.vae import AutoencoderKL
from cldm.training.shapes import Sample, make_batch

ENCODE_BATCH = 64


def images_to_tensor(pictures: Sequence[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 pictures -> (b, 3, H, W) float in [0, 1] (what hints are; images are then mapped to [-1, 1])."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255.0


def hint_tensor(hint: np.ndarray) -> torch.Tensor:
    """A hint as the ControlNet reads it, (3, H, W) float: HxWx3 uint8 -> [0, 1]; float (inpaint) as it is."""
    t = torch.from_numpy(np.ascontiguousarray(hint)).permute(2, 0, 1).contiguous()
    return t.float() / 255.0 if hint.dtype == np.uint8 else t.float()


class LatentPool:
    """Pictures `offset .. offset + n - 1` of the generator: captions, some hints, and the posterior of their latent.

    Each is made and encoded the first time it is asked for, then kept (a few KB per picture in memory, plus 24 KB
    per hint). One pool can serve several ControlNet stages: they train on the same pictures, encoded once.
    """

    def __init__(self, vae: AutoencoderKL, size: int, n: int, hints: Sequence[str] = (), offset: int = 0):
        self.vae, self.size, self.n, self.hints, self.offset = vae, size, n, tuple(hints), offset
        self._mean: dict[int, torch.Tensor] = {}
        self._std: dict[int, torch.Tensor] = {}
        self._caption: dict[int, str] = {}
        self._hint: dict[str, dict[int, torch.Tensor]] = {h: {} for h in self.hints}

    def __len__(self) -> int:
        return self.n

    @torch.no_grad()
    def _fill(self, missing: list[int]) -> None:
        for i in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[i : i + ENCODE_BATCH]
            samples: list[Sample] = make_batch([self.offset + k for k in chunk], self.size, hints=bool(self.hints))
            x = images_to_tensor([s.image for s in samples]) * 2 - 1
            mean, std = self.vae.moments(x.to(self.vae.quant_conv.weight.dtype))
            scale = self.vae.cfg.scale_factor
            for j, (k, s) in enumerate(zip(chunk, samples)):
                self._mean[k], self._std[k] = mean[j].float() * scale, std[j].float() * scale
                self._caption[k] = s.caption
                for h in self.hints:
                    self._hint[h][k] = hint_tensor(s.hint(h)).half()  # 2 bytes a value: 24 KB per 64 px hint

    def get(
        self, indices: Sequence[int], hint: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        """(latent mean, latent std) (b, 4, h, w) already scaled, captions, and the `hint` pictures (b, 3, H, W) in
        [0, 1] (None when no hint is asked for)."""
        if hint is not None and hint not in self.hints:
            raise ValueError(f"this pool keeps the hints {self.hints}, not {hint!r}")
        indices = [int(i) for i in indices]
        missing = sorted({i for i in indices if i not in self._mean})
        if missing:
            self._fill(missing)
        mean = torch.stack([self._mean[i] for i in indices])
        std = torch.stack([self._std[i] for i in indices])
        captions = [self._caption[i] for i in indices]
        hints = torch.stack([self._hint[hint][i] for i in indices]).float() if hint is not None else None
        return mean, std, captions, hints
