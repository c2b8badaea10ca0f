"""What a training stage looks at now and then: reconstructions, sample grids and the control-adherence metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion
from cldm.models.vae import AutoencoderKL
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.training.charts import image_grid
from cldm.training.latent_pool import hint_tensor, images_to_tensor
from cldm.training.metrics import canny_edges, edge_f1
from cldm.training.shapes import Sample, make_batch

MIN_GENERATE_SIZE = 64  # pipeline.generate's smallest size; the models are convolutional, so smaller ones sample at 64


def unit_hint(sample: Sample, hint: str) -> np.ndarray | torch.Tensor:
    """The hint as a ControlUnit takes it: a picture, or for inpaint a (1, 3, H, W) float tensor with -1 holes."""
    h = sample.hint(hint)
    return h if h.dtype == np.uint8 else hint_tensor(h)[None]


def shown_hint(sample: Sample, hint: str) -> np.ndarray:
    """The hint as a picture for the grids (an inpaint hole in black)."""
    h = sample.hint(hint)
    return h if h.dtype == np.uint8 else (h.clip(0, 1) * 255).round().astype(np.uint8)


def _to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """(b, 3, H, W) in [-1, 1] -> HxWx3 uint8 pictures."""
    return list(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _grid_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:07d}.png"


@torch.no_grad()
def vae_eval(vae: AutoencoderKL, size: int, seeds: Sequence[int], folder: Path, step: int) -> dict[str, float]:
    """Reconstruct fixed pictures (posterior mode); grid = originals over reconstructions; returns the PSNR in dB."""
    was_training = vae.training
    vae.eval()
    x = images_to_tensor([s.image for s in make_batch(seeds, size, hints=False)]) * 2 - 1
    rec = vae.decode(vae.encode(x, sample=False)).clamp(-1, 1)
    vae.train(was_training)
    mse = float(((rec - x) / 2).pow(2).mean())  # in [0, 1] units
    image_grid([_to_uint8(x), _to_uint8(rec)], _grid_path(folder, step))
    return {"psnr": 10 * float(np.log10(1.0 / max(mse, 1e-10)))}


def _write_captions(folder: Path, step: int, captions: Sequence[str]) -> None:
    _grid_path(folder, step).with_suffix(".txt").write_text("\n".join(captions) + "\n", encoding="utf-8")


@torch.no_grad()
def sample_base(
    model: StableDiffusion,
    size: int,
    seeds: Sequence[int],
    folder: Path,
    step: int,
    sample_steps: int,
    cfg_scale: float,
) -> dict[str, float]:
    """Generate from the captions of fixed pictures; grid = the pictures over what the model made of their captions."""
    gen = max(size, MIN_GENERATE_SIZE)
    samples = make_batch(seeds, gen, hints=False)
    made = [
        generate(
            model, GenerationRequest(s.caption, steps=sample_steps, cfg_scale=cfg_scale, seed=i, width=gen, height=gen)
        ).images[0]
        for i, s in enumerate(samples)
    ]
    image_grid([[s.image for s in samples], made], _grid_path(folder, step))
    _write_captions(folder, step, [s.caption for s in samples])
    return {}


class ControlEval:
    """Edge F1 (canny of the generated picture vs canny of the picture the hint came from) with the ControlNet on
    and off, on fixed pictures and seeds. "Off" depends only on the frozen base, so it is computed once."""

    def __init__(self, base: StableDiffusion, hint: str, size: int, seeds: Sequence[int], steps: int, cfg: float):
        self.base, self.hint, self.steps, self.cfg = base, hint, steps, cfg
        self.size = max(size, MIN_GENERATE_SIZE)
        self.samples = make_batch(seeds, self.size)
        self.refs = [canny_edges(s.image) for s in self.samples]
        self._off: list[np.ndarray] | None = None

    def _generate(self, caption: str, seed: int, units: list[ControlUnit]) -> np.ndarray:
        request = GenerationRequest(caption, units=units, steps=self.steps, cfg_scale=self.cfg, seed=seed,
                                    width=self.size, height=self.size)  # fmt: skip
        return generate(self.base, request).images[0]

    @torch.no_grad()
    def __call__(self, cn: ControlNet, folder: Path, step: int) -> dict[str, float]:
        was_training = cn.training
        cn.eval()
        on = [
            self._generate(s.caption, i, [ControlUnit(cn, unit_hint(s, self.hint), name=self.hint)])
            for i, s in enumerate(self.samples)
        ]
        cn.train(was_training)
        if self._off is None:
            self._off = [self._generate(s.caption, i, []) for i, s in enumerate(self.samples)]
        f1_on = [edge_f1(canny_edges(p), r) for p, r in zip(on, self.refs)]
        f1_off = [edge_f1(canny_edges(p), r) for p, r in zip(self._off, self.refs)]
        rows = [[shown_hint(s, self.hint) for s in self.samples], on, self._off, [s.image for s in self.samples]]
        image_grid(rows, _grid_path(folder, step))
        _write_captions(folder, step, [s.caption for s in self.samples])
        return {"f1_on": float(np.mean(f1_on)), "f1_off": float(np.mean(f1_off))}
