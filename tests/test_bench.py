"""`python -m cldm bench` on a tiny model of the SD1.5 layout: every part runs, the figures are there and sane, the
tables are written. (The figures themselves are the README's, measured on SD1.5-size weights; never timed here.)"""

from __future__ import annotations

import json

import pytest
import torch

from cldm.__main__ import main


def _bench(tmp_path, *extra) -> dict:
    args = ["bench", "--tiny", "--sizes", "64", "--runs", "1", "--steps", "2", "--device", "cpu",
            "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out"), *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((tmp_path / "out" / "bench.json").read_text())


def test_bench_runs_every_part_beside_diffusers(tmp_path):
    out = _bench(
        tmp_path, "--dtypes", "fp32", "bf16", "--parts", "peak", "step", "quality", "vae", "generate", "load", "switch"
    )
    r = out["results"]
    assert set(r["peak_flops"]) == {"fp32", "bf16"} and all(v > 1e8 for v in r["peak_flops"].values())
    assert [(row["size"], row["dtype"]) for row in r["step"]] == [(64, "fp32"), (64, "bf16")]
    for row in r["step"]:
        assert row["flops"] > 1e6 and 0 < row["ours"]["median_s"] and 0 < row["diffusers"]["median_s"]
        assert row["ours"]["min_s"] <= row["ours"]["median_s"] <= row["ours"]["max_s"]
    from cldm.runtime import prepack

    if prepack.available():  # bf16 on the CPU: the packing measured against a --no-prepack manager, in pairs
        bf16 = r["step"][1]
        assert bf16["packed_ratio"] > 0 and bf16["ours_unpacked"]["median_s"] > 0 and "packed_ratio" not in r["step"][0]
    assert {row["impl"] for row in r["generate"]} == {"ours", "diffusers"}
    ours, same = r["generate"][:2]  # ours and diffusers in ours' dtype, generating in turn
    assert same["impl"] == "diffusers" and same["dtype"] == ours["dtype"] and same["ours_ratio"] > 0
    assert ours["min_s"] <= ours["seconds"] <= ours["max_s"] and ours["timings"]["sampling"] > 0
    if ours["dtype"] != "float32":  # and diffusers' own default once more
        assert [(row["impl"], row["dtype"]) for row in r["generate"][2:]] == [("diffusers", "float32")]
    assert 0 <= r["quality"]["mean_abs"] <= r["quality"]["max_abs"] <= 255
    assert {(row["what"], row["impl"]) for row in r["load"]} >= {("controlnet", "ours"), ("controlnet", "diffusers")}
    assert r["switch"][0]["warm_s"] < r["switch"][0]["cold_s"]  # from the cache, not from the file
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| 64 px fp32 |" in table and "| 64 px bf16 |" in table and "ours by default" in table
    assert (
        "Peak matmul rate (the best seen in the run): fp32" in table
        and "VAE decode" in table
        and "Switching ControlNets" in table
        and "| ours / it (pairs) |" in table
    )
    if prepack.available():
        assert "a second manager with --no-prepack, the two stepping in turn" in table


def test_the_same_weights_give_the_same_step(tmp_path):
    """The bench compares like with like: its two step closures compute the same function on the same weights."""
    from cldm.bench import measure

    paths = measure.write_models(tmp_path, tiny=True, controlnets=1)
    sd, cn = measure.ours(paths, torch.device("cpu"), torch.float32)
    pipe = measure.theirs(paths, torch.device("cpu"), torch.float32)
    ours, theirs = measure.our_step(sd, cn, 64)(), measure.their_step(pipe, sd.config, 64)()
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4
    assert measure.step_flops(measure.our_step(sd, cn, 64)) > 0
    from cldm.runtime import prepack

    packed_models = measure.ours(paths, torch.device("cpu"), torch.bfloat16)
    plain_models = measure.ours(paths, torch.device("cpu"), torch.bfloat16, prepack_cpu=False)
    unet_and_controlnet = [(sd.unet, cn) for sd, cn in (packed_models, plain_models)]
    assert not any(prepack.is_enabled(m) for m in unet_and_controlnet[1])  # the pair's plain side really is plain
    assert all(prepack.is_enabled(m) for m in unet_and_controlnet[0]) or not prepack.available()
    packed, plain = measure.our_step(*packed_models, 64)(), measure.our_step(*plain_models, 64)()
    assert torch.equal(packed.contiguous(), plain.contiguous())  # the packing's pair: the same step, the same bits


def test_auto_dtype_follows_the_cpu(monkeypatch):
    from cldm.runtime import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.resolve_dtype("auto", cpu) == torch.float32
    assert devices.resolve_dtype("fp32", cpu) == torch.float32  # asked for: kept


@pytest.mark.slow
def test_bench_memory_in_fresh_processes(tmp_path):
    out = _bench(tmp_path, "--dtypes", "fp32", "bf16", "--parts", "memory")
    rows = out["results"]["memory"]
    expected = {("fp32", i, n) for i in ("ours", "diffusers") for n in (1, 3)}
    expected |= {("bf16", i, n) for i in ("ours", "ours-no-prepack", "diffusers") for n in (1, 3)}
    assert {(row["dtype"], row["impl"], row["controlnets"]) for row in rows} == expected
    assert all(row["peak_bytes"] > 50 * 1024**2 for row in rows)
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| ours | ours, --no-prepack | diffusers |" in table and "| fp32, 3 ControlNets |" in table


def test_step_flops_count_the_cpu_attention_kernel():
    """torch's counter alone misses the CPU flash-attention op; the bench's count has it, at 2 * 2 b h s^2 d."""
    import torch.nn.functional as F

    from cldm.bench import measure

    b, h, s, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    assert measure.step_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * b * h * s * s * d)


def test_paired_timing_alternates_and_takes_the_median_ratio(monkeypatch):
    """A slow moment of the machine slows one pair, not one side: the ratio is the median of the pairs' ratios."""
    from cldm.bench import measure

    calls = []
    # ours takes 1 unit and theirs 4, except in one slow pair (10 and 40)
    ticks = iter([0, 1, 1, 5, 5, 15, 15, 55, 55, 56, 56, 60])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    mine, theirs, ratio = measure.timed_pair(
        lambda: calls.append("ours"), lambda: calls.append("theirs"), torch.device("cpu"), runs=3, warmup=1
    )
    assert calls == ["ours", "theirs"] * 4  # a warm-up pair, then three timed pairs, alternating
    assert (mine.median, mine.low, mine.high) == (1, 1, 10) and (theirs.median, theirs.low, theirs.high) == (4, 4, 40)
    assert ratio == 0.25
