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


@pytest.mark.integration  # the whole bench beside diffusers: ~11 s, kept out of the fast tier's 5 minutes
def test_bench_runs_every_part_beside_diffusers(tmp_path):
    out = _bench(
        tmp_path, "--dtypes", "fp32", "bf16", "--parts", "peak", "step", "quality", "vae", "generate", "few-step", "load",
        "switch",
    )  # fmt: skip
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
    few, their_few = r["few-step"]  # the few-step whole picture, ours and diffusers' LCM pipeline in turn
    assert (few["sampler"], few["steps"], few["cfg"]) == ("lcm", 4, 1.0) and their_few["ours_ratio"] > 0
    assert few["timings"]["sampling"] > 0 and 0 <= few["vs_diffusers"]["mean_abs"] < 3  # same weights, seed, dtype
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
        and "| ours, 64 px, lcm 4 steps, guidance 1 |" in table
    )
    if prepack.available():
        assert "a second manager with --no-prepack, the two stepping in turn" in table
    from cldm.bench import openvino_step

    if openvino_step.available():  # the second comparison, in pairs with ours
        assert all(row["openvino"]["median_s"] > 0 and row["openvino_ratio"] > 0 for row in r["step"])
        assert "| one step, OpenVINO" in table


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


@pytest.mark.integration  # OpenVINO's conversion takes ~10-30 s even for the tiny model
def test_openvino_step_is_our_step(tmp_path):
    """The OpenVINO row times the same function: its fp32 output equals our fp32 step's."""
    from cldm.bench import measure, openvino_step

    if not openvino_step.available():
        pytest.skip("openvino is not installed (an optional dependency of the bench)")
    paths = measure.write_models(tmp_path, tiny=True, controlnets=1)
    sd, cn = measure.ours(paths, torch.device("cpu"), torch.float32, prepack_cpu=False)
    ours = measure.our_step(sd, cn, 64)()
    theirs = torch.from_numpy(next(iter(openvino_step.openvino_step(sd, cn, 64, torch.float32)().values())))
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-3 * ours.abs().max()


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


# ------------------------------------------------------------------------------------------------ SDXL and SD2.x
def _family_bench(tmp_path, family: str, *extra) -> dict:
    args = ["bench", "--family", family, "--tiny", "--runs", "1", "--device", "cpu", "--out", str(tmp_path / "out"),
            *extra]  # fmt: skip
    assert main(args) == 0
    assert not (tmp_path / "out" / "bench.json").exists()  # the SD1.5 figures are left alone
    return json.loads((tmp_path / "out" / f"bench-{family}.json").read_text())


def test_bench_sdxl_family_beside_diffusers(tmp_path):
    """`--family sdxl` on a tiny model of SDXL's layout: random weights made in memory, diffusers on the same
    tensors checked equal to ours, one step and one decode timed in pairs at the family's size (64 px when tiny)."""
    out = _family_bench(tmp_path, "sdxl", "--dtypes", "fp32", "--parts", "peak", "step", "vae")
    r = out["results"]
    assert out["family"] == "sdxl" and out["runs"] == 1 and len(out["machine"]["load_average"]) == 3
    assert r["build"][0]["params"]["unet"] > 0 and r["build"][0]["params"]["text"] > 0
    check = r["check"][0]
    assert check["dtype"] == "fp32" and check["step"]["mean_rel"] < 1e-4 and check["vae"]["mean_rel"] < 1e-4
    assert check["step"]["ref_std"] > 0  # the ControlNet and UNet give something to compare
    (step,) = r["step"]
    assert (step["size"], step["dtype"]) == (64, "fp32") and step["flops"] > 1e6
    assert step["ours"]["median_s"] > 0 and step["diffusers"]["median_s"] > 0 and step["ratio"] > 0
    (vae,) = r["vae"]
    assert vae["size"] == 64 and not vae["tiled"] and vae["ratio"] > 0
    table = (tmp_path / "out" / "bench-sdxl.md").read_text()
    assert "weights: tiny" in table and "| 64 px fp32 |" in table and "Same function" in table
    assert "VAE decode" in table and "Load average" in table


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_family_models_are_the_same_function_in_both(family):
    """Ours and diffusers' modules share the tensors; the step (with SDXL's y against its added_cond_kwargs) and the
    decode agree in fp32, and within the bench's tolerance in bf16; the meta-device FLOP count is torch's count."""
    from cldm.bench import family_models, family_run, measure

    cfg = family_models.family_config(family, tiny=True)
    sd, cn = family_models.random_family(cfg, torch.float32)
    theirs = family_models.as_diffusers(sd, cn)
    assert theirs["unet"].conv_in.weight.data_ptr() == sd.unet.input_blocks[0][0].weight.data_ptr()  # one copy
    row = family_run.check_row(sd, cn, theirs, 64, "fp32")
    assert row["step"]["max_rel"] < 1e-4 and row["vae"]["max_rel"] < 1e-4
    ours, _ = family_models.family_steps(sd, cn, None, 64)
    assert family_models.meta_step_flops(cfg, 64) == measure.step_flops(ours) > 0
    sd, cn = family_models.random_family(cfg, torch.bfloat16)
    assert sd.unet.out[2].weight.dtype == cn.zero_convs[0][0].weight.dtype == torch.bfloat16
    family_run.check_row(sd, cn, family_models.as_diffusers(sd, cn), 64, "bf16")  # raises beyond the tolerance


def test_family_check_refuses_different_functions():
    """The check before timing fails loudly when diffusers' modules do not compute what ours do."""
    from cldm.bench import family_models, family_run

    sd, cn = family_models.random_family(family_models.family_config("sdxl", tiny=True), torch.float32)
    theirs = family_models.as_diffusers(sd, cn)
    # the tensors are shared (changing one in place changes ours too): diffusers' gets a shifted copy
    theirs["unet"].conv_out.bias = torch.nn.Parameter(theirs["unet"].conv_out.bias.detach() + 1.0)
    with pytest.raises(RuntimeError, match="differ in step"):
        family_run.check_row(sd, cn, theirs, 64, "fp32")


@pytest.mark.parametrize("impl", ["ours", "diffusers"])
def test_family_memory_child_generates_once(impl, capsys):
    """The memory part's child (here in-process): one whole generation with a ControlNet, both text encoders, in
    our pipeline or diffusers' SDXL ControlNet pipeline on the same tensors; its JSON line."""
    import argparse

    from cldm.bench import command, family_run

    a = argparse.Namespace(family="sdxl", tiny=True, device="cpu", sizes=None, runs=None,
                           memory_child=[impl, "fp32", "1"])  # fmt: skip
    command._defaults(a)
    row = family_run.family_memory_child(a)
    assert row["impl"] == impl and row["size"] == 64 and row["peak_bytes"] > 50 * 1024**2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    phases = row["phases"]  # each phase's own peak, and the models' footprint once built
    assert set(phases) == {"held_after_build", "build", "encode_and_step", "decode"}
    assert all(v > 0 for v in phases.values()) and row["peak_bytes"] == max(phases["build"], phases["decode"],
                                                                            phases["encode_and_step"])  # fmt: skip
    if impl == "ours":
        assert row["timings"]["sampling"] > 0 and row["timings"]["decode"] > 0


@pytest.mark.slow
def test_family_bench_memory_in_fresh_processes(tmp_path):
    out = _family_bench(tmp_path, "sdxl", "--dtypes", "bf16", "--parts", "memory")
    impls = {row["impl"] for row in out["results"]["memory"]}
    from cldm.runtime import prepack

    assert impls == {"ours", "diffusers"} | ({"ours-no-prepack"} if prepack.available() else set())
    table = (tmp_path / "out" / "bench-sdxl.md").read_text()
    assert (
        "base (with its text encoders) + 1 ControlNet, a 64 px generation" in table
        and "| bf16, 1 ControlNet |" in table
    )


def test_sd2_bench_times_ours_without_the_upcast_too(tmp_path):
    """SD2.1-768-v upcasts its attention; diffusers' processor does not, so in bf16 the bench also times ours
    without it (and puts the upcast back)."""
    out = _family_bench(tmp_path, "sd2", "--dtypes", "bf16", "--parts", "step")
    (step,) = out["results"]["step"]
    assert step["ours_no_upcast"]["median_s"] > 0 and step["no_upcast_ratio"] > 0
    assert "SD2.1's attention upcast" in (tmp_path / "out" / "bench-sd2.md").read_text()
    from cldm.bench import family_models

    sd, cn = family_models.random_family(family_models.family_config("sd2", tiny=True), torch.float32)
    assert (
        family_models.set_upcast([sd.unet, cn], False) > 0
        and not sd.unet.input_blocks[1][1].transformer_blocks[0].attn1.upcast
    )
