"""How well the shipped demo model follows hints and prompts, measured on shapes pictures it never saw.

- Control adherence: F1 (2 px tolerance) between the canny edges of a generated picture and those of the picture
  the hint was made from, with the ControlNet on and off, for every demo condition.
- Prompt adherence: one-shape pictures, prompt "a <colour> <shape> on a <colour> background", the canny
  ControlNet drawing the shape: does the hinted region come out in the named colour (nearest named colour of its
  median pixel), and does the shape follow the hint (edge F1 >= SHAPE_F1)?
- The app's promise: a triangle outline sketched as in the browser, the scribble ControlNet, "a <colour> triangle on
  a <colour> background" for random colour pairs: are the inside and the outside of the outline the named colours?
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.training.charts import image_grid
from cldm.training.metrics import canny_edges, edge_f1
from cldm.training.shapes import COLORS, HINTS, SHAPES, Shape, caption, make_sample

# Training draws seeds from 0 up and the periodic evaluations from 1e9 up: these were never seen.
UNSEEN_SEED = 2_000_000_000
SHAPE_F1 = 0.5  # edge F1 above which the generated shape counts as the hinted one
DEMO_BASE, DEMO_CONTROLNET = "shapes_sd.safetensors", "control_v11p_sd15_{}.safetensors"
# The sampling settings measured here, which the app's demo mode also starts with.
STEPS, CFG, SAMPLER = 20, 5.0, "ddim"


@dataclass
class Report:
    """The figures of one evaluation run (what the README reports)."""

    n: int
    steps: int
    cfg: float
    control: dict[str, dict[str, float]] = field(default_factory=dict)  # hint -> f1_on, f1_off
    colour_rate: float = 0.0
    shape_rate: float = 0.0
    both_rate: float = 0.0
    sketch_rate: float = 0.0  # sketched triangle: shape and background both the named colours


def load_demo(folder: str | Path, dtype: str = "fp32") -> tuple[StableDiffusion, dict[str, ControlNet]]:
    """The demo model as the app serves it, on the CPU in `dtype` (bf16: with the manager's packed convolutions)."""
    from cldm.runtime.manager import ModelManager

    folder = Path(folder)
    manager = ModelManager(str(folder / DEMO_BASE), device="cpu", dtype=dtype)
    return manager.sd, {h: manager.controlnet(str(folder / DEMO_CONTROLNET.format(h))) for h in HINTS}


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dist = [float(np.sum((np.asarray(COLORS[n], float) - rgb) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


def sketched_triangle(size: int = 64) -> np.ndarray:
    """A triangle outline as the app's scribble canvas gives it at `size` px: white 2 px strokes on black."""
    hint = np.zeros((size, size, 3), np.uint8)
    corners = np.array([(0.5, 0.2), (0.8, 0.75), (0.2, 0.75)]) * size
    cv2.polylines(hint, [np.round(corners).astype(np.int32)], True, (255, 255, 255), max(1, size // 32))
    return hint


def closed_outline_regions(hint: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) of the closed outline(s) in a scribble hint, both kept `margin` px away from the strokes."""
    strokes = (hint.max(axis=2) > 127).astype(np.uint8)
    flood = strokes.copy()
    cv2.floodFill(flood, None, (0, 0), 2)  # everything the corner reaches without crossing a stroke
    near = cv2.dilate(strokes, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)) > 0
    return (flood == 0) & ~near, (flood == 2) & ~near


def _one_shape_samples(n: int, size: int) -> list:
    out, seed = [], UNSEEN_SEED
    while len(out) < n:
        s = make_sample(seed, size)
        seed += 1
        if len(s.shapes) == 1 and s.shapes[0].color not in s.background:
            out.append(s)
    return out


def evaluate(model: StableDiffusion, cns: dict[str, ControlNet], n: int = 24, steps: int = STEPS, cfg: float = CFG,
             size: int = 64, grid: str | Path | None = None) -> Report:  # fmt: skip
    """Run both measurements on `n` unseen pictures per condition; optionally write a sample grid."""
    report = Report(n=n, steps=steps, cfg=cfg)
    kw = dict(steps=steps, cfg_scale=cfg, width=size, height=size, sampler=SAMPLER)
    rows: list[list[np.ndarray]] = []
    samples = [make_sample(UNSEEN_SEED + 10_000 + i, size) for i in range(n)]
    off = [generate(model, GenerationRequest(s.caption, seed=i, **kw)).images[0] for i, s in enumerate(samples)]
    f1_off = float(np.mean([edge_f1(canny_edges(o), canny_edges(s.image)) for o, s in zip(off, samples)]))
    for hint in HINTS:
        on = [
            generate(
                model,
                GenerationRequest(s.caption, units=[ControlUnit(cns[hint], s.hint(hint), name=hint)], seed=i, **kw),
            ).images[0]
            for i, s in enumerate(samples)
        ]
        f1_on = float(np.mean([edge_f1(canny_edges(o), canny_edges(s.image)) for o, s in zip(on, samples)]))
        report.control[hint] = {"f1_on": f1_on, "f1_off": f1_off}
        rows += [[s.hint(hint) for s in samples[:8]], on[:8]]
    if grid is not None:
        image_grid([[s.image for s in samples[:8]], off[:8], *rows], Path(grid))

    colour = shape = both = 0
    for i, s in enumerate(_one_shape_samples(n, size)):
        unit = ControlUnit(cns["canny"], s.canny, name="canny")
        pic = generate(model, GenerationRequest(s.caption, units=[unit], seed=i, **kw)).images[0]
        region = s.labels == 1 + SHAPES.index(s.shapes[0].kind)
        inner = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # away from the blurry border
        ok_colour = nearest_colour(np.median(pic[inner if inner.any() else region], axis=0)) == s.shapes[0].color
        ok_shape = edge_f1(canny_edges(pic), canny_edges(s.image)) >= SHAPE_F1
        colour, shape, both = colour + ok_colour, shape + ok_shape, both + (ok_colour and ok_shape)
    report.colour_rate, report.shape_rate, report.both_rate = colour / n, shape / n, both / n

    hint = sketched_triangle(size)
    inside, outside = closed_outline_regions(hint)
    rng = np.random.default_rng(UNSEEN_SEED)
    hits = 0
    for i in range(n):
        fill, ground = (list(COLORS)[int(k)] for k in rng.choice(len(COLORS), size=2, replace=False))
        prompt = caption([Shape("triangle", fill, (0, 0), 0, 0)], (ground,))  # "a green triangle on a white ..."
        unit = ControlUnit(cns["scribble"], hint, name="scribble")
        pic = generate(model, GenerationRequest(prompt, units=[unit], seed=i, **kw))
        got = [nearest_colour(np.median(pic.images[0][m], axis=0)) for m in (inside, outside)]
        hits += got == [fill, ground]
    report.sketch_rate = hits / n
    return report


def write(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.__dict__, indent=2) + "\n", encoding="utf-8")
