"""Synthetic training data: simple coloured shapes with captions and six hints (canny, scribble, seg, tile,
inpaint, shuffle).

Everything is a pure function of (seed, size): `make_sample(seed)` always draws the same picture, so a training run
can address its data by index and resume without storing any of it.

A picture has a plain or two-tone background and 1-3 shapes of different kinds (so the caption says which colour
goes on which shape), each a named colour that differs from the background; in half of the pictures with several
shapes they overlap (each keeps most of itself visible), in the others they barely touch. It is drawn at SUPERSAMPLE times the size as a map of region ids
and then shrunk with area averaging, so edges are anti-aliased while the class map (and the seg hint) stays exact.

Seg palette (class -> RGB), fixed so a trained seg ControlNet reads any map painted with it:
    background (80, 80, 80)    circle (230, 25, 75)     square (60, 180, 75)    triangle (0, 130, 200)
    star (255, 225, 25)        ring (145, 30, 180)      diamond (245, 130, 48)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 130, 190),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
CLASS_NAMES = ("background", *SHAPES)  # class 0 is the background, class k > 0 is SHAPES[k - 1]
SEG_PALETTE = np.array(
    [(80, 80, 80), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (245, 130, 48)],
    dtype=np.uint8,
)
HINTS = ("canny", "scribble", "seg", "tile", "inpaint", "shuffle")
# Every word a caption can hold (the tokenizer in vocab.py is built from this).
CAPTION_WORDS = ("a", "an", "and", "on", "background", ",", *COLORS, *SHAPES)

SUPERSAMPLE = 4  # drawn 4x larger, then area-averaged: smooth edges, exact regions
MIN_SIZE, MAX_SIZE = 32, 256
MAX_SHAPES = 3
SHAPE_COUNT_P = (0.3, 0.45, 0.25)  # 1, 2 or 3 shapes: two-shape scenes (colour binding) most often
TWO_TONE_P = 0.35  # share of pictures with a background split in two colours
RADIUS_RANGE = {1: (0.22, 0.38), 2: (0.16, 0.28), 3: (0.13, 0.22)}  # shape radius / picture size, by shape count
MAX_OVERLAP = 0.08  # a new shape may cover at most this share of the shapes already drawn (and vice versa)
OVERLAP_P = 0.5  # share of several-shape pictures whose shapes overlap, each up to OVERLAPPING of the smaller one
OVERLAPPING = 0.35
PLACEMENT_TRIES = 30
# cv2.Canny hysteresis thresholds: the ControlNet canny annotator's defaults.
CANNY_LOW, CANNY_HIGH = 100, 200
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
RING_INNER = 0.55  # hole / outer radius of the ring
DIAMOND_WIDTH = 0.65  # half-width / half-height of the diamond
MAX_TILT = 15.0  # degrees: squares and triangles stay recognisably upright
# Scribble: a wobbly trace of each outline, about 2 px wide at 64 px (ControlNet scribbles are thick white strokes).
SCRIBBLE_WIDTH = 1 / 32  # of the picture size
SCRIBBLE_WOBBLE = 0.04  # amplitude of each of the slow sinusoids added to an outline, of the shape's radius
SCRIBBLE_SHIFT = 0.06  # a whole outline is drawn a little off its place, of the shape's radius
# Tile: the picture shrunk by one of these factors (area average) and blown up again (bicubic), as a tile
# ControlNet's input is a low-resolution or blurred version of the picture to redraw (1: the picture itself).
TILE_FACTORS = (1, 2, 4, 4, 8)
# Inpaint: the hole is a shape's own region grown by a few pixels (replace an object) or a random ellipse or box.
INPAINT_OBJECT_P = 0.5
INPAINT_GROW = 1 / 16  # of the picture size


@dataclass(frozen=True)
class Shape:
    """One drawn shape, in output pixels."""

    kind: str
    color: str
    center: tuple[float, float]  # (x, y)
    radius: float
    angle: float  # degrees


@dataclass
class Sample:
    """A picture, its caption, the class of every pixel and the three hints (all HxWx3 uint8 but `labels`)."""

    image: np.ndarray
    caption: str
    shapes: list[Shape]
    background: tuple[str, ...]  # one or two colour names
    labels: np.ndarray  # (H, W) uint8 class ids, see CLASS_NAMES
    canny: np.ndarray | None = None  # the hints are None in a sample drawn with hints=False
    scribble: np.ndarray | None = None
    seg: np.ndarray | None = None
    tile: np.ndarray | None = None
    inpaint: np.ndarray | None = None  # HxWx3 float32: the picture in [0, 1], -1 in the hole (ControlNet 1.1's rule)
    shuffle: np.ndarray | None = None
    hole: np.ndarray | None = None  # HxW bool: the inpaint hint's hole

    def hint(self, name: str) -> np.ndarray:
        if name not in HINTS:
            raise ValueError(f"unknown hint {name!r}; choose one of {', '.join(HINTS)}")
        out = getattr(self, name)
        if out is None:
            raise ValueError("this sample was drawn without its hints (make_sample(..., hints=False))")
        return out


def caption(shapes: list[Shape], background: tuple[str, ...]) -> str:
    """'a red circle, a blue star and a green square on a yellow and white background'."""
    parts = [f"{_article(s.color)} {s.color} {s.kind}" for s in shapes]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{things} on {_article(background[0])} {' and '.join(background)} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _polygon(kind: str, radius: float, angle: float) -> np.ndarray:
    """Vertices (n, 2) around the origin, y down."""
    if kind == "square":
        a = np.deg2rad(angle + 45 + 90 * np.arange(4))
        r = np.full(4, radius)
    elif kind == "triangle":
        a = np.deg2rad(angle - 90 + 120 * np.arange(3))
        r = np.full(3, radius)
    elif kind == "star":
        a = np.deg2rad(angle - 90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER)
    elif kind == "diamond":
        return np.array([(0, -radius), (radius * DIAMOND_WIDTH, 0), (0, radius), (-radius * DIAMOND_WIDTH, 0)])
    else:
        raise ValueError(kind)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def shape_mask(shape: Shape, canvas: int) -> np.ndarray:
    """Filled mask (canvas, canvas) uint8 {0, 1} of a shape drawn at SUPERSAMPLE times its coordinates."""
    mask = np.zeros((canvas, canvas), np.uint8)
    cx, cy = (c * SUPERSAMPLE for c in shape.center)
    r = shape.radius * SUPERSAMPLE
    if shape.kind in ("circle", "ring"):
        cv2.circle(mask, (round(cx), round(cy)), round(r), 1, thickness=-1)
        if shape.kind == "ring":
            cv2.circle(mask, (round(cx), round(cy)), round(r * RING_INNER), 0, thickness=-1)
    else:
        pts = _polygon(shape.kind, r, shape.angle) + (cx, cy)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _place_shapes(
    rng: np.random.Generator, size: int, background: tuple[str, ...], count: int | None
) -> tuple[list[Shape], list]:
    n = 1 + int(rng.choice(MAX_SHAPES, p=SHAPE_COUNT_P))
    n = count or n
    overlap = OVERLAPPING if rng.random() < OVERLAP_P else MAX_OVERLAP
    lo, hi = RADIUS_RANGE[n]
    palette = [c for c in COLORS if c not in background]
    colors = rng.choice(len(palette), size=n, replace=False)
    canvas = size * SUPERSAMPLE
    shapes: list[Shape] = []
    masks: list[np.ndarray] = []
    for color_idx in colors:
        for _ in range(PLACEMENT_TRIES):
            r = float(rng.uniform(lo, hi)) * size
            center = (float(rng.uniform(r, size - r)), float(rng.uniform(r, size - r)))
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            if any(s.kind == kind for s in shapes):  # one shape per kind: the caption binds colours to kinds
                continue
            angle = float(rng.uniform(-MAX_TILT, MAX_TILT)) if kind in ("square", "triangle") else 0.0
            if kind == "star":
                angle = float(rng.uniform(-MAX_TILT, MAX_TILT))
            shape = Shape(kind, palette[int(color_idx)], center, r, angle)
            mask = shape_mask(shape, canvas)
            area = max(int(mask.sum()), 1)
            if all((mask & m).sum() <= overlap * min(area, max(int(m.sum()), 1)) for m in masks):
                shapes.append(shape)
                masks.append(mask)
                break
    return shapes, masks


def _background_regions(rng: np.random.Generator, canvas: int, two_tone: bool) -> np.ndarray:
    """(canvas, canvas) bool: True where the second background colour goes (a random straight split)."""
    if not two_tone:
        return np.zeros((canvas, canvas), bool)
    yy, xx = np.mgrid[0:canvas, 0:canvas] + 0.5
    a = rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-0.25, 0.25) * canvas
    return (xx - canvas / 2) * math.cos(a) + (yy - canvas / 2) * math.sin(a) > offset


def _scribble(rng: np.random.Generator, shapes: list[Shape], masks: list[np.ndarray], size: int) -> np.ndarray:
    """Outlines traced by an unsteady hand: slow sinusoidal wobble, a small shift, thick strokes."""
    canvas = size * SUPERSAMPLE
    out = np.zeros((canvas, canvas), np.uint8)
    width = max(1, round(size * SCRIBBLE_WIDTH)) * SUPERSAMPLE
    for shape, mask in zip(shapes, masks):
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        r = shape.radius * SUPERSAMPLE
        shift = rng.uniform(-SCRIBBLE_SHIFT, SCRIBBLE_SHIFT, size=2) * r
        for contour in contours:
            pts = contour[:, 0, :].astype(np.float64)  # (n, 2)
            s = np.linspace(0, 1, len(pts), endpoint=False)
            wobble = np.zeros_like(pts)
            for axis in range(2):
                for freq in rng.integers(2, 6, size=2):  # integer frequencies keep the closed curve closed
                    amp = rng.uniform(0.3, 1.0) * SCRIBBLE_WOBBLE * r
                    wobble[:, axis] += amp * np.sin(2 * math.pi * freq * s + rng.uniform(0, 2 * math.pi))
            traced = np.round(pts + wobble + shift).astype(np.int32)
            cv2.polylines(out, [traced], isClosed=True, color=255, thickness=width, lineType=cv2.LINE_8)
    small = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return np.where(small > 96, 255, 0).astype(np.uint8)


def _gray3(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel[..., None], 3, axis=2)


def _tile(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    return tile_hint(image, int(rng.choice(TILE_FACTORS)))


def tile_hint(image: np.ndarray, factor: int) -> np.ndarray:
    """The picture shrunk `factor` times and blown up again: what a tile ControlNet redraws sharply."""
    size = image.shape[0]
    small = cv2.resize(image, (size // factor, size // factor), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def grown(mask: np.ndarray, size: int, px: int) -> np.ndarray:
    """A supersampled shape mask brought down to `size` px (every pixel it touches) and grown by `px` pixels."""
    small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.2
    return cv2.dilate(small.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0


def _hole(rng: np.random.Generator, masks: list[np.ndarray], size: int) -> np.ndarray:
    """The inpaint hole: one shape grown by a few pixels, or a random ellipse or box of 10-40% of the picture."""
    if masks and rng.random() < INPAINT_OBJECT_P:
        k = int(rng.integers(len(masks)))
        return grown(masks[k], size, max(1, round(size * INPAINT_GROW)))
    hole = np.zeros((size, size), np.uint8)
    w, h = (float(v) * size for v in rng.uniform(0.3, 0.65, size=2))
    cx, cy = (float(v) * size for v in rng.uniform(0.25, 0.75, size=2))
    if rng.random() < 0.5:
        cv2.ellipse(hole, (round(cx), round(cy)), (round(w / 2), round(h / 2)), 0, 0, 360, 1, thickness=-1)
    else:
        cv2.rectangle(hole, (round(cx - w / 2), round(cy - h / 2)), (round(cx + w / 2), round(cy + h / 2)), 1, -1)
    return hole > 0


def _shuffle(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The app's content shuffle at pixel-perfect resolution (the picture's own size), with a drawn seed."""
    from annotators.detectors import shuffle

    return shuffle(image, image.shape[0], None, {"seed": int(rng.integers(2**31 - 1))})


def make_sample(
    seed: int, size: int = 64, hints: bool = True, count: int | None = None, two_tone: bool | None = None
) -> Sample:
    """The picture number `seed` at `size` px (32..256), with caption, class map and hints. Deterministic: the
    picture and caption do not depend on `hints` (False skips drawing them: a third of the time, for the VAE).
    `count` (1-3 shapes) and `two_tone` (background) override the drawn ones, for evaluation scenes."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be {MIN_SIZE}..{MAX_SIZE} px (got {size})")
    rng = np.random.default_rng(seed)
    drawn_two_tone = bool(rng.random() < TWO_TONE_P)
    two_tone = drawn_two_tone if two_tone is None else two_tone
    bg_idx = rng.choice(len(COLORS), size=2 if two_tone else 1, replace=False)
    background = tuple(list(COLORS)[int(i)] for i in bg_idx)
    shapes, masks = _place_shapes(rng, size, background, count)
    return _render(rng, size, shapes, masks, background, two_tone, hints)


def make_scene(shapes: list[Shape], background: tuple[str, ...], size: int = 64, seed: int = 0) -> Sample:
    """A picture of the given `shapes` (in `size` px coordinates, drawn in order) with its hints; a two-colour
    `background` is split by a line drawn from `seed`. For examples and evaluations that name what they show."""
    canvas = size * SUPERSAMPLE
    masks = [shape_mask(shape, canvas) for shape in shapes]
    return _render(np.random.default_rng(seed), size, shapes, masks, background, len(background) > 1, True)


def _render(rng: np.random.Generator, size: int, shapes: list[Shape], masks: list[np.ndarray],
            background: tuple[str, ...], two_tone: bool, hints: bool) -> Sample:  # fmt: skip
    canvas = size * SUPERSAMPLE
    # Region ids at supersampled resolution: 0/1 the background colours, 2 + k shape k (later ones on top).
    region = _background_regions(rng, canvas, two_tone).astype(np.uint8)
    classes = np.zeros((canvas, canvas), np.uint8)
    for k, (shape, mask) in enumerate(zip(shapes, masks)):
        region[mask > 0] = 2 + k
        classes[mask > 0] = 1 + SHAPES.index(shape.kind)
    colors = [COLORS[background[0]], COLORS[background[-1]]] + [COLORS[s.color] for s in shapes]
    big = np.array(colors, np.uint8)[region]
    image = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    mid = SUPERSAMPLE // 2
    labels = classes[mid::SUPERSAMPLE, mid::SUPERSAMPLE].copy()  # the class at each output pixel's centre
    sample = Sample(
        image=image, caption=caption(shapes, background), shapes=shapes, background=background, labels=labels
    )
    if hints:  # the hints draw from `rng` last, so skipping them changes nothing above
        sample.canny = _gray3(cv2.Canny(image, CANNY_LOW, CANNY_HIGH))
        sample.scribble = _gray3(_scribble(rng, shapes, masks, size))
        sample.seg = SEG_PALETTE[labels]
        sample.tile = _tile(rng, image)
        sample.hole = _hole(rng, masks, size)
        sample.inpaint = np.where(sample.hole[..., None], -1.0, image / 255.0).astype(np.float32)
        sample.shuffle = _shuffle(rng, image)
    return sample


def make_batch(seeds: list[int] | range, size: int = 64, hints: bool = True) -> list[Sample]:
    return [make_sample(int(s), size, hints) for s in seeds]
