"""How well the shipped demo model follows hints and prompts, measured on shapes pictures it never saw.

- Two-object scenes (plain background, two shapes of different kinds that may overlap, "a blue circle and a yellow
  star on a pink background"), for every ControlNet that draws a layout (canny, scribble, seg, tile): edge F1 (2 px)
  between the canny edges of the result and those of the picture the hint came from, with the ControlNet on and
  off, and colour binding: does each shape come out in its own named colour (nearest named colour of the median
  pixel of its visible region), both shapes of the scene right?
- One-object pictures: the same edge F1; with the canny ControlNet, is the shape the named colour, does it follow the
  hint (edge F1 >= SHAPE_F1), both.
- The app's promise: a triangle outline sketched as in the browser, the scribble ControlNet, "a <colour> triangle on
  a <colour> background" for random colour pairs: are the inside and the outside of the outline the named colours?
- Inpaint: one shape of a two-object scene hidden under a hole, the full caption: is it redrawn in its colour?
- Shuffle: the content-shuffled picture and an empty prompt: does the result take the picture's background colour?
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cldm.hints.conditions import BY_KEY
from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.training.charts import image_grid
from cldm.training.latent_pool import hint_tensor
from cldm.training.metrics import canny_edges, edge_f1
from cldm.training.shapes import (
    COLORS,
    HINTS,
    SHAPES,
    SUPERSAMPLE,
    Sample,
    Shape,
    caption,
    grown,
    make_sample,
    shape_mask,
    tile_hint,
)

# Training draws seeds from 0 up and the periodic evaluations from 1e9 up: these were never seen.
UNSEEN_SEED = 2_000_000_000
SHAPE_F1 = 0.5  # edge F1 above which the generated shape counts as the hinted one
LAYOUT_HINTS = ("canny", "scribble", "seg", "tile")  # the ControlNets that draw where the shapes are
HIDDEN_GROW = 2  # px: the inpaint evaluation's hole is the hidden shape and this much around it
EVAL_TILE_FACTOR = 4  # the tile hint of the evaluation: the picture at 16 px, blown up to 64
DEMO_BASE = "shapes_sd.safetensors"
# The sampling settings measured here, which the app's demo mode also starts with.
STEPS, CFG, SAMPLER = 20, 5.0, "ddim"


@dataclass
class Report:
    """The figures of one evaluation run (what the README reports)."""

    n: int
    steps: int
    cfg: float
    two_objects: dict[str, dict[str, float]] = field(default_factory=dict)  # hint -> f1_on, f1_off, binding
    control: dict[str, dict[str, float]] = field(default_factory=dict)  # one object: hint -> f1_on, f1_off
    colour_rate: float = 0.0
    shape_rate: float = 0.0
    both_rate: float = 0.0
    sketch_rate: float = 0.0  # sketched triangle: shape and background both the named colours
    inpaint_rate: float = 0.0  # the hidden shape redrawn in its named colour
    shuffle_rate: dict[str, float] = field(default_factory=dict)  # background colour taken: with / without


def load_demo(folder: str | Path, dtype: str = "fp32") -> tuple[StableDiffusion, dict[str, ControlNet]]:
    """The demo model as the app serves it, on the CPU in `dtype`, with every demo ControlNet the folder has."""
    from cldm.runtime.manager import ModelManager

    folder = Path(folder)
    manager = ModelManager(str(folder / DEMO_BASE), device="cpu", dtype=dtype)
    paths = {h: folder / controlnet_file(h) for h in HINTS}
    return manager.sd, {h: manager.controlnet(str(p)) for h, p in paths.items() if p.is_file()}


def controlnet_file(hint: str) -> str:
    """A demo ControlNet's file name: its condition's ControlNet 1.1 name, so the app's models-folder lookup finds it."""
    return f"{BY_KEY[hint].stem}.safetensors"


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dist = [float(np.sum((np.asarray(COLORS[n], float) - rgb) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


def shape_colour(picture: np.ndarray, sample: Sample, shape: Shape) -> str:
    """The named colour of `shape`'s visible region in `picture` (its median pixel, a pixel away from the border)."""
    region = sample.labels == 1 + SHAPES.index(shape.kind)
    inner = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return nearest_colour(np.median(picture[inner if inner.sum() >= 4 else region], axis=0))


def bound(picture: np.ndarray, sample: Sample) -> bool:
    """Every shape of the scene in its own named colour."""
    return all(shape_colour(picture, sample, s) == s.color for s in sample.shapes)


def scene_f1(picture: np.ndarray, sample: Sample) -> float:
    return edge_f1(canny_edges(picture), canny_edges(sample.image))


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


def scenes(n: int, count: int, size: int = 64, offset: int = 0) -> list[Sample]:
    """`n` unseen scenes of exactly `count` shapes on a plain background whose colours differ from it."""
    out, seed = [], UNSEEN_SEED + offset
    while len(out) < n:
        s = make_sample(seed, size, count=count, two_tone=False)
        seed += 1
        if len(s.shapes) == count:
            out.append(s)
    return out


class _Runner:
    def __init__(self, model: StableDiffusion, steps: int, cfg: float, size: int):
        self.model, self.kw = model, dict(steps=steps, cfg_scale=cfg, width=size, height=size, sampler=SAMPLER)

    def __call__(self, prompt: str, seed: int, units=(), **more) -> np.ndarray:
        request = GenerationRequest(prompt, units=list(units), seed=seed, **self.kw, **more)
        return generate(self.model, request).images[0]

    def control(self, cn: ControlNet, hint, name: str, prompt: str, seed: int, **more) -> np.ndarray:
        return self(prompt, seed, [ControlUnit(cn, hint, name=name)], **more)


def evaluate(model: StableDiffusion, cns: dict[str, ControlNet], n: int = 24, steps: int = STEPS, cfg: float = CFG,
             size: int = 64, grid: str | Path | None = None) -> Report:  # fmt: skip
    """Every measurement on `n` unseen pictures each, for the ControlNets in `cns`; optionally a sample grid."""
    report, run = Report(n=n, steps=steps, cfg=cfg), _Runner(model, steps, cfg, size)
    rows: list[list[np.ndarray]] = []
    for count, table in ((2, report.two_objects), (1, report.control)):
        samples = scenes(n, count, size, offset=10_000 * count)
        off = [run(s.caption, i) for i, s in enumerate(samples)]
        f1_off = float(np.mean([scene_f1(o, s) for o, s in zip(off, samples)]))
        if count == 2:
            rows += [[s.image for s in samples[:8]], off[:8]]
        for hint in (h for h in LAYOUT_HINTS if h in cns):
            hints = [tile_hint(s.image, EVAL_TILE_FACTOR) if hint == "tile" else s.hint(hint) for s in samples]
            on = [run.control(cns[hint], h, hint, s.caption, i) for i, (s, h) in enumerate(zip(samples, hints))]
            f1 = [scene_f1(o, s) for o, s in zip(on, samples)]
            table[hint] = {"f1_on": float(np.mean(f1)), "f1_off": f1_off}
            if count == 2:
                table[hint]["binding"] = float(np.mean([bound(o, s) for o, s in zip(on, samples)]))
                rows += [hints[:8], on[:8]]
            elif hint == "canny":
                colour = [shape_colour(o, s, s.shapes[0]) == s.shapes[0].color for o, s in zip(on, samples)]
                shape = [f >= SHAPE_F1 for f in f1]
                report.colour_rate, report.shape_rate = float(np.mean(colour)), float(np.mean(shape))
                report.both_rate = float(np.mean([c and f for c, f in zip(colour, shape)]))
    if "scribble" in cns:
        report.sketch_rate = _sketch_rate(run, cns["scribble"], n, size)
    if "inpaint" in cns:
        samples = scenes(n, 2, size, offset=30_000)
        hits, shown, made = 0, [], []
        for i, s in enumerate(samples):
            hidden = s.shapes[0]
            hole = grown(shape_mask(hidden, size * SUPERSAMPLE), size, HIDDEN_GROW)
            hint = np.where(hole[..., None], -1.0, s.image / 255.0).astype(np.float32)  # -1: to be painted
            pic = run.control(cns["inpaint"], hint_tensor(hint)[None], "inpaint", s.caption, i, init_image=s.image,
                              mask=hole.astype(np.uint8) * 255)  # fmt: skip
            hits += shape_colour(pic, s, hidden) == hidden.color
            shown.append(np.where(hole[..., None], 0, s.image).astype(np.uint8))  # the hole in black
            made.append(pic)
        report.inpaint_rate = hits / n
        rows += [shown[:8], made[:8]]
    if "shuffle" in cns:
        samples = scenes(n, 2, size, offset=40_000)
        with_, without, made = [], [], []
        for i, s in enumerate(samples):
            on = run.control(cns["shuffle"], s.hint("shuffle"), "shuffle", "", i)
            made.append(on)
            with_.append(background_colour(on) == s.background[0])
            without.append(background_colour(run("", i)) == s.background[0])
        report.shuffle_rate = {"with": float(np.mean(with_)), "without": float(np.mean(without))}
        rows += [[s.hint("shuffle") for s in samples[:8]], made[:8]]
    if grid is not None:
        image_grid(rows, Path(grid))
    return report


def background_colour(picture: np.ndarray, border: int = 3) -> str:
    """The named colour of the picture's border (its median pixel)."""
    edge = np.concatenate([picture[:border].reshape(-1, 3), picture[-border:].reshape(-1, 3),
                           picture[:, :border].reshape(-1, 3), picture[:, -border:].reshape(-1, 3)])  # fmt: skip
    return nearest_colour(np.median(edge, axis=0))


def _sketch_rate(run: _Runner, cn: ControlNet, n: int, size: int) -> float:
    hint = sketched_triangle(size)
    inside, outside = closed_outline_regions(hint)
    rng = np.random.default_rng(UNSEEN_SEED)
    hits = 0
    for i in range(n):
        fill, ground = (list(COLORS)[int(k)] for k in rng.choice(len(COLORS), size=2, replace=False))
        prompt = caption([Shape("triangle", fill, (0, 0), 0, 0)], (ground,))  # "a green triangle on a white ..."
        pic = run.control(cn, hint, "scribble", prompt, i)
        got = [nearest_colour(np.median(pic[m], axis=0)) for m in (inside, outside)]
        hits += got == [fill, ground]
    return hits / n


def write(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.__dict__, indent=2) + "\n", encoding="utf-8")
