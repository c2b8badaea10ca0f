"""IP-Adapter scales per cross-attention layer: a number, or diffusers' `set_ip_adapter_scale` dictionary read
against the base UNet's layout (SD1.5's 16 layers, SDXL's 70)."""

from __future__ import annotations

import math
from numbers import Real

from cldm.errors import InputError
from cldm.models.config import UNetConfig

# Where each cross-attention layer sits, in `UNet.cross_attentions()` order: (part, block, attention) with part
# "down" / "up" / "mid", block the index among diffusers' down_blocks / up_blocks (blocks without attention count
# too: SDXL's down block_0, SD1.5's up block_0) and attention the index of the block's transformer (each holds one
# layer in SD1.5, 2 or 10 in SDXL: diffusers' per-block scales give one number per transformer).
Layout = tuple[tuple[str, int, int], ...]


def scale_layout(cfg: UNetConfig) -> Layout:
    """The (part, block, attention) of each cross-attention layer of a UNet built from `cfg`."""
    levels = len(cfg.channel_mult)
    out: list[tuple[str, int, int]] = []
    for level in range(levels):
        if level in cfg.attention_levels:
            out += [("down", level, j) for j in range(cfg.num_res_blocks) for _ in range(cfg.depth(level))]
    for block, level in enumerate(reversed(range(levels))):
        if level in cfg.attention_levels:
            out += [("up", block, j) for j in range(cfg.num_res_blocks + 1) for _ in range(cfg.depth(level))]
    return tuple(out + [("mid", 0, 0)] * cfg.depth(levels))


SD15_LAYOUT = scale_layout(UNetConfig())  # 16 layers: down blocks 0-2 and up blocks 1-3, two / three each, one mid


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(x):
        raise InputError(f"IP-Adapter scale {where}: {x!r} is not a finite number")
    return float(x)


def scale_numbers(scale: float | dict) -> list[float]:
    """Every number a scale gives, its form checked (parts down/mid/up, blocks `block_N`, numbers or lists of
    numbers) but not against a UNet: what a request can check before its base model is known."""
    if not isinstance(scale, dict):
        return [_number(scale, "")]
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise InputError(f"IP-Adapter scale: unknown part(s) {', '.join(sorted(map(str, unknown)))}; use down, mid, up")
    out: list[float] = []
    for part, given in scale.items():
        blocks = given if isinstance(given, dict) and part != "mid" else {"": given}
        for block, v in blocks.items():
            if block and not (isinstance(block, str) and block.startswith("block_") and block[6:].isdigit()):
                raise InputError(f"IP-Adapter scale: {part} has no block {block!r} (blocks are named block_0, ...)")
            values = list(v) if isinstance(v, (list, tuple)) else [v]
            out += [_number(x, f"{part}.{block}".rstrip(".")) for x in values]
    return out


def layer_scales(scale: float | dict, layout: Layout | None = None) -> list[float]:
    """One scale per cross-attention layer, in `UNet.cross_attentions()` order (`layout`: `scale_layout` of the
    base's UNet config; SD1.5's by default), from a number or from diffusers' `set_ip_adapter_scale` dictionary:
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": 1.0}, "mid": 0.5}. As diffusers reads it: a list gives one
    number per transformer of the block (a one-number list, or a plain number, stands for all of them); parts and
    blocks not named get 0; naming a block without cross-attention is an error."""
    layout = SD15_LAYOUT if layout is None else layout
    scale_numbers(scale)  # the form
    if not isinstance(scale, dict):
        return [float(scale)] * len(layout)
    attentions: dict[tuple[str, int], int] = {}  # (part, block) -> transformers in it
    for part, block, j in layout:
        attentions[(part, block)] = max(attentions.get((part, block), 0), j + 1)
    mid = scale.get("mid", 0.0)
    if isinstance(mid, dict) or (isinstance(mid, (list, tuple)) and len(mid) != 1):
        raise InputError("IP-Adapter scale: mid takes one number")
    mid = mid[0] if isinstance(mid, (list, tuple)) else mid
    values: dict[tuple[str, int, int], float] = {("mid", 0, 0): float(mid)}
    for part in ("down", "up"):
        blocks = sorted(b for p, b in attentions if p == part)
        given = scale.get(part, 0.0)
        if not isinstance(given, dict):
            given = {f"block_{b}": given for b in blocks}
        bad = sorted(set(given) - {f"block_{b}" for b in blocks})
        if bad:
            raise InputError(f"IP-Adapter scale: {part} has no cross-attention in {', '.join(bad)} (this base model: "
                             f"{', '.join(f'block_{b}' for b in blocks)})")  # fmt: skip
        for b in blocks:
            n = attentions[(part, b)]
            v = given.get(f"block_{b}", 0.0)
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            if len(v) == 1:
                v = v * n
            if len(v) != n:
                raise InputError(f"IP-Adapter scale: {part}.block_{b} has {n} attention blocks, got {len(v)} scales")
            values |= {(part, b, j): float(x) for j, x in enumerate(v)}
    return [values[where] for where in layout]
