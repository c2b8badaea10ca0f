"""The bookkeeping every training stage shares: a run folder with a loss log, resumable optimizer state, the loop.

A stage folder holds
    log.jsonl          one JSON object per logged step ({"step": .., "loss": .., "lr": .., metrics..})
    optimizer.pt       {"step": int, "optimizer": state_dict}: plain tensors and containers only, read back with
                       torch.load(weights_only=True)
    samples/*.png      sample grids; curves.png: the loss (and metrics) over steps
and the stage's weights in the project's own safetensors formats (written by the stage, through checkpoints.py).
Data and noise are functions of (seed, step), so a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from cldm.training.charts import line_chart, smooth

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"
STEP_SEED_STRIDE = 1_000_003  # a prime: (seed, step) pairs map to distinct generator seeds
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one step's random draws (timesteps, noise, caption dropout)."""
    return torch.Generator().manual_seed(seed * STEP_SEED_STRIDE + step)


def lr_at(step: int, lr: float, warmup: int, total: int, decay: bool = True) -> float:
    """Linear warm-up, then cosine decay to a tenth (or constant): a pure function of the step, so resuming needs
    no scheduler."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if not decay:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)


class Run:
    """One stage's folder: log, optimizer checkpoint, pictures."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.samples = self.folder / "samples"

    # ---------------------------------------------------------------------------------------------- the log
    def log(self, step: int, **values: float) -> None:
        with open(self.folder / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def history(self) -> list[dict]:
        path = self.folder / LOG_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_log(self, step: int) -> None:
        """Drop entries after `step` (written after the last checkpoint by a run that was then interrupted)."""
        kept = [e for e in self.history() if e["step"] <= step]
        (self.folder / LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")

    def plot(self, metrics: tuple[str, ...] = ()) -> Path:
        """curves.png: the training loss (raw and smoothed) and, below, any metrics that were logged."""
        hist = self.history()
        losses = [(e["step"], e["loss"]) for e in hist if "loss" in e]
        panels = {
            "training loss": {
                "loss": losses,
                "smoothed": list(zip([s for s, _ in losses], smooth([v for _, v in losses]))),
            }
        }
        if metrics:
            panels[" / ".join(metrics)] = {m: [(e["step"], e[m]) for e in hist if m in e] for m in metrics}
        path = self.folder / CURVES_FILE
        line_chart(panels, path, faint=("loss",))
        return path

    # -------------------------------------------------------------------------------------- optimizer state
    def save_optimizer(self, opt: torch.optim.Optimizer, step: int) -> None:
        tmp = self.folder / (OPTIMIZER_FILE + ".tmp")
        torch.save({"step": step, "optimizer": opt.state_dict()}, tmp)
        os.replace(tmp, self.folder / OPTIMIZER_FILE)  # never a half-written checkpoint

    def load_optimizer(self, opt: torch.optim.Optimizer) -> int:
        """Restore the optimizer; returns the step it was saved at (0 when there is no checkpoint)."""
        path = self.folder / OPTIMIZER_FILE
        if not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        return int(state["step"])

    def has_checkpoint(self) -> bool:
        return (self.folder / OPTIMIZER_FILE).is_file()


def run_loop(
    run: Run,
    start: int,
    total: int,
    train_step: Callable[[int], dict[str, float]],
    save: Callable[[int], None],
    evaluate: Callable[[int], dict[str, float]] | None,
    ckpt_every: int,
    eval_every: int,
    desc: str,
    metrics: tuple[str, ...] = (),
) -> None:
    """Steps start..total-1 with a progress bar on stderr (on no terminal, a line per checkpoint instead: a log gets
    no bar frames); evaluate and save every few steps and at the end."""
    if start >= total:
        log.info("%s: already at step %d of %d", desc, start, total)
        return
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total, unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=None)  # fmt: skip
    for step in bar:
        values = train_step(step)
        done = step + 1
        if evaluate is not None and (done % eval_every == 0 or done == total):
            values |= evaluate(done)
        run.log(done, **values)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if done % ckpt_every == 0 or done == total:
            save(done)
            run.plot(metrics)
            if bar.disable:
                print(f"{desc}: step {done} of {total}, loss {values['loss']:.4f}", file=sys.stderr, flush=True)
