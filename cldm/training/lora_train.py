"""A LoRA for the demo model, trained here: "red", which paints every shape red whatever colour the prompt names.

The training pictures are the shapes data with every shape recoloured red (the backgrounds and the captions stay as
they are), so the only thing the LoRA can learn is the change of colour. Rank-4 LoRA layers on every attention
projection of the UNet (to_q, to_k, to_v, to_out.0 of attn1 and attn2), the base frozen, eps-prediction loss. The
file is written in kohya's layout (`lora_unet_<diffusers module>.lora_down/lora_up/alpha`), the format most SD1.5
LoRAs come in, so the app reads it like any other: `<lora:red:1>` in the demo model's prompt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cldm.adapters import lora
from cldm.io import checkpoints, files, writers
from cldm.pipeline.prompts import token_chunks
from cldm.pipeline.request import GenerationRequest, LoraUnit
from cldm.pipeline.stages import generate
from cldm.training.demo_eval import CFG, DEMO_BASE, SAMPLER, STEPS, UNSEEN_SEED, nearest_colour
from cldm.training.latent_pool import ENCODE_BATCH, images_to_tensor
from cldm.training.shapes import COLORS, make_batch, make_sample
from cldm.training.train import _noisy, eps_loss
from cldm.training.trainer import make_optimizer, step_generator

log = logging.getLogger(__name__)
LORA_FILE = "loras/red.safetensors"
RANK, ALPHA = 4, 4.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraLinear(nn.Module):
    """A frozen Linear plus its trainable low-rank change: base(x) + up(down(x)) * alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, g: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=g) / base.in_features**0.5)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: training starts from the base

    def forward(self, x):
        return self.base(x) + (x @ self.down.T @ self.up.T) * self.scale


def red_pictures(seeds: list[int], size: int = 64) -> tuple[list[np.ndarray], list[str]]:
    """Shapes pictures with every shape painted red, and their (unchanged) captions."""
    pictures, captions = [], []
    for s in make_batch(seeds, size, hints=False):
        img = s.image.copy()
        img[s.labels > 0] = COLORS["red"]
        pictures.append(img)
        captions.append(s.caption)
    return pictures, captions


def _inject(unet, g: torch.Generator) -> dict[str, LoraLinear]:
    """Wrap every attention projection; returns our weight key -> its LoRA wrapper."""
    wrapped = {}
    for name, module in list(unet.named_modules()):
        for target in TARGETS:
            parent_name, _, leaf = f"{name}.{target}".rpartition(".")
            if not (name.endswith(("attn1", "attn2")) and hasattr(module, target.split(".")[0])):
                continue
            parent = unet.get_submodule(parent_name)
            base = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
            layer = LoraLinear(base, RANK, ALPHA, g)
            if leaf.isdigit():
                parent[int(leaf)] = layer
            else:
                setattr(parent, leaf, layer)
            wrapped[f"{name}.{target}.weight"] = layer
    return wrapped


def train_lora(demo: str | Path, steps: int = 300, batch: int = 16, lr: float = 2e-3, seed: int = 0,
               pool: int = 2048) -> Path:  # fmt: skip
    """Train "red" on the exported demo model in `demo`; write `demo/loras/red.safetensors`."""
    demo = Path(demo)
    sd = checkpoints.load_sd(demo / DEMO_BASE).freeze()
    names = {v: k for k, v in lora.targets(sd).items() if k.startswith("lora_unet_")}  # (part, key) -> kohya name
    g0 = torch.Generator().manual_seed(seed)
    wrapped = _inject(sd.unet, g0)
    params = [p for layer in wrapped.values() for p in (layer.down, layer.up)]
    opt = make_optimizer(params, lr)
    latents: dict[int, torch.Tensor] = {}
    captions: dict[int, str] = {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        g = step_generator(seed, step)
        idx = torch.randint(0, pool, (batch,), generator=g).tolist()
        missing = [i for i in dict.fromkeys(idx) if i not in latents]
        for k in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[k : k + ENCODE_BATCH]
            pictures, texts = red_pictures(chunk)
            with torch.no_grad():
                mean, std = sd.vae.moments(images_to_tensor(pictures) * 2 - 1)
            for j, i in enumerate(chunk):
                latents[i] = torch.stack([mean[j], std[j]]) * sd.vae.cfg.scale_factor
                captions[i] = texts[j]
        pair = torch.stack([latents[i] for i in idx])
        x_t, t, eps = _noisy(pair[:, 0], pair[:, 1], g)
        with torch.no_grad():
            text = sd.text(token_chunks(sd.text, [captions[i] for i in idx])[:, 0])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 30)
        loss = eps_loss(sd.unet(x_t, t, text), eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log.warning("lora step %d/%d loss %.4f (%.2f s/step)", step, steps, loss.item(),
                        (time.perf_counter() - t0) / step)  # fmt: skip
    state = {}
    for key, layer in wrapped.items():
        name = names[("unet", key)]
        state[f"{name}.lora_down.weight"] = layer.down.detach().half()
        state[f"{name}.lora_up.weight"] = layer.up.detach().half()
        state[f"{name}.alpha"] = torch.tensor(ALPHA).half()
    out = demo / LORA_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    writers.save_file(state, out)
    return out


# ------------------------------------------------------------------------------------------------ measure
@dataclass
class LoraReport:
    n: int
    red_with: float  # pictures whose shape came out red, with the LoRA
    red_without: float
    asked_with: float  # pictures showing the colour the prompt asked for
    asked_without: float


def _unseen(n: int) -> list:
    """One shape that is not red, on a background that is neither red nor the shape's colour."""
    out, seed = [], UNSEEN_SEED + 70_000
    while len(out) < n:
        s = make_sample(seed, 64, hints=False)
        seed += 1
        c = s.shapes[0].color if s.shapes else "red"
        if len(s.shapes) == 1 and len(s.background) == 1 and c != "red" and s.background[0] not in ("red", c):
            out.append(s)
    return out


def _covers(pic: np.ndarray, colour: str, share: float = 0.05) -> bool:
    names = [nearest_colour(p) for p in pic.reshape(-1, 3)[::4].astype(float)]
    return names.count(colour) / len(names) >= share


def evaluate(demo: str | Path, n: int = 24, weight: float = 1.0) -> LoraReport:
    """The caption of an unseen one-shape picture as the prompt, the same seeds with and without the LoRA."""
    demo = Path(demo)
    sd = checkpoints.load_sd(demo / DEMO_BASE).freeze()
    red = lora.parse(files.read_file(demo / LORA_FILE), sd, "red")
    kw = dict(steps=STEPS, cfg_scale=CFG, sampler=SAMPLER, width=64, height=64)
    counts = np.zeros((2, 2))
    for i, s in enumerate(_unseen(n)):
        for k, loras in enumerate(((), (LoraUnit(red, weight),))):
            pic = generate(sd, GenerationRequest(s.caption, seed=i, loras=loras, **kw)).images[0]
            counts[k] += (_covers(pic, "red"), _covers(pic, s.shapes[0].color))
    (rn, an), (rw, aw) = counts / n  # row 0: without the LoRA
    return LoraReport(n, rw, rn, aw, an)
