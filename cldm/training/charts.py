"""Training pictures drawn with PIL alone (no matplotlib): line charts of logged values and image grids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PANEL_W, PANEL_H = 640, 240
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 24, 28
GRID_TICKS = 4  # horizontal grid lines per panel
LINE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
FAINT = 0.35  # raw series are drawn at this opacity under their smoothed version

Series = dict[str, list[tuple[float, float]]]


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (so the start is not dragged toward zero)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _blend(color: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    return tuple(round(255 + (c - 255) * alpha) for c in color)


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: Series, faint: set[str]) -> None:
    x0, y0 = MARGIN_L, top + MARGIN_T
    x1, y1 = PANEL_W - MARGIN_R, top + PANEL_H - MARGIN_B
    points = [p for s in series.values() for p in s]
    draw.text((x0, top + 6), title, fill=(0, 0, 0))
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    if not points:
        draw.text((x0 + 8, y0 + 8), "no data yet", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymin, ymax = ymin - 0.5, ymax + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    for k in range(GRID_TICKS + 1):
        y = ymin + (ymax - ymin) * k / GRID_TICKS
        py = to_px(xmin, y)[1]
        draw.line((x0, py, x1, py), fill=(225, 225, 225))
        draw.text((4, py - 6), _fmt(y), fill=(60, 60, 60))
    draw.text((x0, y1 + 6), _fmt(xmin), fill=(60, 60, 60))
    draw.text((x1 - 40, y1 + 6), _fmt(xmax), fill=(60, 60, 60))
    legend_x = x0 + 8
    for i, (name, pts) in enumerate(series.items()):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        if name in faint:
            color = _blend(LINE_COLORS[(i + 1) % len(LINE_COLORS)], FAINT)
        px = [to_px(x, y) for x, y in pts]
        if len(px) == 1:
            draw.ellipse((px[0][0] - 2, px[0][1] - 2, px[0][0] + 2, px[0][1] + 2), fill=color)
        else:
            draw.line(px, fill=color, width=1 if name in faint else 2)
        draw.text((legend_x, y0 + 4), name, fill=color)
        legend_x += 8 * len(name) + 16


def line_chart(panels: dict[str, Series], path: str | os.PathLike, faint: Sequence[str] = ()) -> None:
    """One panel per entry (title -> {series name: [(x, y), ...]}), stacked vertically, written as a PNG."""
    img = Image.new("RGB", (PANEL_W, PANEL_H * max(1, len(panels))), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (title, series) in enumerate(panels.items()):
        _panel(draw, i * PANEL_H, title, series, set(faint))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def image_grid(rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, pad: int = 2) -> None:
    """HxWx3 uint8 pictures in rows (all the same size) -> one PNG with white gaps."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, pic in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = pic
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
