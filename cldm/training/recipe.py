"""The recipe of the demo family's ControlNets: phases of steps, each with its learning rate and its share of empty
captions, and the step counts of `train all`."""

from __future__ import annotations

from dataclasses import dataclass

COOLDOWN_FACTOR = 0.1  # a cool-down phase's learning rate, as a factor of the peak


@dataclass(frozen=True)
class Phase:
    """A ControlNet's steps up to `until` (exclusive, counted from 0): the learning rate times `lr_factor` and this
    share of empty captions. Each step's settings are a function of its index, so a resumed run goes on exactly as
    an uninterrupted one; steps past the last phase keep its settings."""

    until: int
    lr_factor: float = 1.0
    empty_captions: float = 0.3


PLAIN = Phase(0)


def phase_at(phases: tuple[Phase, ...], step: int) -> Phase:
    return next((p for p in phases if step < p.until), phases[-1] if phases else PLAIN)


def cooldown_phases(steps: int, cooldown: int, empty_captions: float = PLAIN.empty_captions) -> tuple[Phase, ...]:
    """`steps` steps at the full learning rate but the last `cooldown` at COOLDOWN_FACTOR of it."""
    full = Phase(steps - cooldown, 1.0, empty_captions)
    return (full, Phase(steps, COOLDOWN_FACTOR, empty_captions)) if cooldown else (full,)


# The demo family's ControlNets by phase (figures in docs/demo-model.md). The constant learning rate with 30% empty
# captions first; colour binding on two-object scenes keeps rising long after the edges are learnt (canny: 60% at
# 1200 steps, 71% at 2400, 81% at 4000 on 48 scenes; scribble 46% at 1400, 60% at 5000; seg flat at 52-56% from
# 1600 to 3200 while its F1 rose 0.84 -> 0.90). Then a cool-down, the learning rate at a tenth, where more steps at
# the full rate had stopped helping (24 scenes: canny 79% -> 88% in 400 steps, scribble 60% -> 67% in 800). Then, for
# scribble, 5% empty captions instead of 30%: what had held its binding down (48 scenes: 71% -> 83%; a second
# cool-down at 30% gave 73%).
# Seg learnt its map but not the words from scratch: 52-56% whatever the steps, 65% with 5% empty captions (2400
# steps more: 65%; none: 65%). Started from the finished scribble ControlNet (DEMO_STARTS), whose attention already
# binds each colour word to its shape, it needs only its hint encoder anew: 90% on the same 48 scenes after 2000 steps
# (85% started from canny's).
DEMO_PHASES = {
    "canny": (Phase(4000), Phase(4400, COOLDOWN_FACTOR)),
    "scribble": (
        Phase(5000), Phase(5800, COOLDOWN_FACTOR), Phase(6600, 1.0, 0.05), Phase(7000, COOLDOWN_FACTOR, 0.05),
    ),
    "seg": (Phase(1600, 1.0, 0.05), Phase(2000, COOLDOWN_FACTOR, 0.05)),
}  # fmt: skip
# ControlNets that start from another hint's (trained before them by `train all`) instead of a copy of the base's
# encoder: a fresh Adam state, its warm-up, then its own phases.
DEMO_STARTS = {"seg": "scribble"}
# Steps per stage of `train all` for the demo family: VAE on 32 px crops, then the base, then one ControlNet per
# hint (a phased one to its last phase's end). Seg sits at the no-ControlNet level for 600 steps before it takes off;
# shuffle, pooled to one vector per level, had learnt nothing usable at 400.
DEMO_SCHEDULE = {
    "vae": 1000, "base": 2500, "controlnet": 800, "controlnet_shuffle": 1400,
    **{f"controlnet_{hint}": phases[-1].until for hint, phases in DEMO_PHASES.items()},
}  # fmt: skip
