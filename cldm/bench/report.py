"""The bench's markdown tables (bench.md, copied into the README): ratios are ours / diffusers in the same run."""

from __future__ import annotations


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _pair_ratio(stored: float | None, a: float | None = None, b: float | None = None) -> str:
    """The median of the alternating pairs' ratios where the bench timed them so; else the medians' ratio a / b."""
    return f"{stored:.2f}x" if stored is not None else _ratio(a, b)


FAMILY_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd2": "SD2.1-768"}


def _loads(v: list[float] | None) -> str:
    return "-" if not v else ", ".join(f"{x:.1f}" for x in v)


def _gib(b: float) -> str:
    return f"{b / 1024**3:.2f} GiB"


def _table(head: list[str], cells: list[list[str]]) -> list[str]:
    rows = ["| " + " | ".join(row) + " |" for row in (head, *cells)]
    return [rows[0], "|" + "---|" * len(head), *rows[1:], ""]


def markdown(out: dict) -> str:
    m, r = out["machine"], out["results"]
    size = FAMILY_LABELS.get(out.get("family", "sd15"), "SD1.5")
    lines = [f"Machine: {m['cpu']} ({m['threads']} threads), {m.get('gpu') or m['device']}; torch {m['torch']}, "
             f"diffusers {m.get('diffusers') or 'absent'}; weights: {'tiny' if out['config'] == 'tiny' else size + ' size'}, "
             f"random; medians of {out['runs']} runs after a warm-up (ours and diffusers alternate; a ratio beside them is "
             f"the median of the pairs' ratios). `--dtype auto` here: {out['dtype_auto']}.", ""]  # fmt: skip
    if "load_average" in m:
        lines += [f"Load average (1, 5, 15 min) at the start: {_loads(m['load_average'])}; at the end: "
                  f"{_loads(m.get('load_average_end'))} (the machine is shared; 2 cores).", ""]  # fmt: skip
    for row in r.get("build", []):
        p = row["params"]
        lines += [f"Random weights ({row['dtype']}), made in {row['seconds']:.0f} s: UNet {p['unet'] / 1e9:.2f} B, "
                  f"ControlNet {p['controlnet'] / 1e9:.2f} B, VAE {p['vae'] / 1e6:.0f} M, text encoders "
                  f"{p['text'] / 1e9:.2f} B parameters; diffusers' modules hold the same tensors.", ""]  # fmt: skip
    for row in r.get("check", []):
        st, va = row["step"], row["vae"]
        lines += [f"Same function (checked before timing, {row['size']} px, {row['dtype']}): diffusers' step differs "
                  f"from ours by {100 * st['mean_rel']:.2f}% of the output's spread on average ({100 * st['max_rel']:.1f}% "
                  f"at most), its VAE decode by {100 * va['mean_rel']:.2f}% ({100 * va['max_rel']:.1f}% at most).", ""]  # fmt: skip
    peak = r.get("peak_flops", {})
    if peak:
        lines += ["Peak matmul rate (the best seen in the run): " + ", ".join(
            f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peak.items()), ""]  # fmt: skip
    if r.get("step"):
        lines += ["| one step (ControlNet + UNet, batch 2) | ours | diffusers | ours / diffusers | GFLOP | ours, % of peak "
                  "| diffusers, % of peak |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in r["step"]:
            ours, theirs = row["ours"]["median_s"], (row.get("diffusers") or {}).get("median_s")
            p = peak.get(row["dtype"])
            frac = ["-" if not p or t is None else f"{100 * row['flops'] / t / p:.0f}%" for t in (ours, theirs)]
            ratio = _pair_ratio(row.get("ratio"), ours, theirs)
            lines.append(f"| {row['size']} px {row['dtype']} | {_s(ours)} s | {_s(theirs)} s | {ratio} "
                         f"| {row['flops'] / 1e9:.0f} | {frac[0]} | {frac[1]} |")  # fmt: skip
        compiled = [row for row in r["step"] if "openvino" in row]
        if compiled:
            lines += ["", "| one step, OpenVINO (our fp32 modules converted, its precision hint) | ours | OpenVINO "
                      "| ours / OpenVINO | OpenVINO, % of peak |", "|---|---|---|---|---|"]  # fmt: skip
            for row in compiled:
                ours, theirs, p = row["ours"]["median_s"], row["openvino"]["median_s"], peak.get(row["dtype"])
                frac = "-" if not p else f"{100 * row['flops'] / theirs / p:.0f}%"
                lines.append(f"| {row['size']} px {row['dtype']} | {_s(ours)} s | {_s(theirs)} s "
                             f"| {_pair_ratio(row.get('openvino_ratio'), ours, theirs)} | {frac} |")  # fmt: skip
        packed = [row for row in r["step"] if "ours_unpacked" in row]
        if packed:
            lines += ["", "Prepacked bf16 convolutions (cldm/prepack.py), ours with / without them (a second manager "
                      "with --no-prepack, the two stepping in turn; the ratio is the median of the pairs'): " + ", ".join(
                f"{row['size']} px {_s(row['ours']['median_s'])} s / {_s(row['ours_unpacked']['median_s'])} s "
                f"({_pair_ratio(row.get('packed_ratio'), row['ours']['median_s'], row['ours_unpacked']['median_s'])})"
                for row in packed) + "."]  # fmt: skip
        plain = [row for row in r["step"] if "ours_no_upcast" in row]
        if plain:
            lines += ["", "SD2.1's attention upcast (ours computes the attention scores in fp32 for a bf16/fp16 model, as "
                      "`upcast_attention` says; diffusers' SDPA attention processor leaves it out): ours without it, "
                      "timed in pairs with diffusers again: " + ", ".join(
                f"{row['size']} px {row['dtype']} {_s(row['ours_no_upcast']['median_s'])} s "
                f"({_pair_ratio(row.get('no_upcast_ratio'))} diffusers)" for row in plain) + "."]  # fmt: skip
        lines += ["", *targets(out), ""]
    q = r.get("quality")
    if q:
        lines += [f"Pictures in `--dtype auto` ({q['auto']}) against fp32, {q['size']} px, 20 steps, same seed: mean "
                  f"difference {q['mean_abs']:.2f} / 255 per pixel, 99th percentile {q['p99_abs']:.0f}, largest "
                  f"{q['max_abs']:.0f} (the picture's own spread: {q['fp32_std']:.0f}).", ""]  # fmt: skip
    if r.get("vae"):
        cells = []
        for row in r["vae"]:
            ours, theirs = row["ours"]["median_s"], (row.get("diffusers") or {}).get("median_s")
            ratio = _pair_ratio(row.get("ratio"), ours, theirs)
            cells.append([f"{row['size']} px {row['dtype']}", f"{_s(ours)} s", f"{_s(theirs)} s", ratio])
        lines += _table(["VAE decode, 1 picture", "ours", "diffusers", "ratio"], cells)
    if r.get("generate"):
        cells = [[f"{row['impl']}, {row['size']} px, {row['steps']} steps", row["dtype"], _s(row["seconds"]),
                  _pair_ratio(row.get("ours_ratio"))]
                 for row in r["generate"]]  # fmt: skip
        lines += _table(["whole generation (steps + decode)", "dtype", "seconds", "ours / it (pairs)"], cells)
    if r.get("few-step"):
        cells = [[f"{row['impl']}, {row['size']} px, {row['sampler']} {row['steps']} steps, guidance {row['cfg']:g}",
                  row["dtype"], _s(row["seconds"]), _pair_ratio(row.get("ours_ratio"))]
                 for row in r["few-step"]]  # fmt: skip
        lines += _table(["few-step whole picture (prompt, hint, steps, decode)", "dtype", "seconds",
                         "ours / it (pairs)"], cells)  # fmt: skip
        ours = r["few-step"][0]
        if "vs_diffusers" in ours:
            v, t = ours["vs_diffusers"], ours["timings"]
            lines += [f"Ours' parts: text {_s(t.get('encode'))} s, steps {_s(t.get('sampling'))} s, decode "
                      f"{_s(t.get('decode'))} s. The two pictures differ by {v['mean_abs']:.2f} / 255 per pixel "
                      f"on average, {v['max_abs']} at most (the picture's own spread: {v['picture_std']:.0f}).",
                      ""]  # fmt: skip
    if r.get("load"):
        lines += ["| loading | dtype | cold | warm |", "|---|---|---|---|"]
        for row in r["load"]:
            cold = f"{_s(row['cold_s'])} s" if "cold_s" in row else "-"
            warm = row["warm"]["median_s"] if "warm" in row else row.get("warm_s")
            lines.append(f"| {row['what']}, {row['impl']} | {row['dtype']} | {cold} | {_s(warm)} s |")
        lines.append("")
    for row in r.get("switch", []):
        lines += [f"Switching ControlNets in a running manager ({row['dtype']}): first load {_s(row['cold_s'])} s, "
                  f"from the cache {1000 * row['warm_s']:.1f} ms.", ""]  # fmt: skip
    if r.get("memory"):
        kind = r["memory"][0]["kind"]
        what = "base + N ControlNets, one step each"
        if out.get("family", "sd15") != "sd15":
            what = (f"base (with its text encoders) + 1 ControlNet, a {r['memory'][0]['size']} px generation (1 step with "
                    "guidance, decode), each in a fresh process")  # fmt: skip
        lines += [f"| peak {'VRAM' if kind == 'vram' else 'resident memory'}, {what} | "
                  "ours | ours, --no-prepack | diffusers |", "|---|---|---|---|"]  # fmt: skip
        cells: dict[tuple, dict] = {}
        for row in r["memory"]:
            cells.setdefault((row["dtype"], row["controlnets"]), {})[row["impl"]] = row["peak_bytes"]
        for (d, n), v in cells.items():
            plain, theirs = (_gib(v[k]) if k in v else "-" for k in ("ours-no-prepack", "diffusers"))
            lines.append(
                f"| {d}, {n} ControlNet{'s' if n > 1 else ''} | {_gib(v.get('ours', 0))} | {plain} | {theirs} |"
            )
        lines.append("")
        phased = [row for row in r["memory"] if "phases" in row]
        if phased:
            lines += ["Each phase's own peak (the peak counter restarted between them): " + "; ".join(
                f"{row['impl']} {row['dtype']}: {_gib(row['phases']['held_after_build'])} held after building, "
                f"building {_gib(row['phases']['build'])}, text encoders + hint + step "
                f"{_gib(row['phases']['encode_and_step'])}, decode {_gib(row['phases']['decode'])}"
                for row in phased if "encode_and_step" in row["phases"]) + ".", ""]  # fmt: skip
    return "\n".join(lines)


def targets(out: dict) -> list[str]:
    """The issue's targets at the largest size: our default dtype against diffusers' fp32 (its CPU default) and its
    bf16."""
    steps = out["results"]["step"]
    size = max(row["size"] for row in steps)
    at = {row["dtype"]: row for row in steps if row["size"] == size}
    default = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(out["dtype_auto"], out["dtype_auto"])
    ours = (at.get(default) or {}).get("ours", {}).get("median_s")
    said = []
    for d in ("fp32", "bf16"):
        row = at.get(d) or {}
        theirs = (row.get("diffusers") or {}).get("median_s")
        if ours is not None and theirs is not None:  # the same dtype: the alternating pairs' ratio
            ratio = row["ratio"] if d == default and row.get("ratio") is not None else ours / theirs
            said.append(f"ours by default ({default}) / diffusers {d}: **{ratio:.2f}x**")
    return [f"At {size} px, " + "; ".join(said) + "."] if said else []
