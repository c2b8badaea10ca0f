"""Batch and serving on a local Ray cluster started here (CPU, the shipped demo model): the Ray Data batch gives the
in-process batch's bytes, a replica killed mid-job loses nothing, bad rows land in the manifest, and two clients of
a 2-replica Ray Serve deployment behind the real app get their serial pictures at the same time.

Skipped where Ray is not installed (it is an optional extra: requirements-scale.txt)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from cldm.scale.batch import MANIFEST, Batch, run_local  # noqa: E402
from cldm.scale.jobs import read_jobs  # noqa: E402
from cldm.scale.render import Setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
BASE = str(DEMO / "shapes_sd.safetensors")
ROWS = 50
BAD = {"nofile", "badcfg", "nodepth"}


@pytest.fixture(scope="module")
def cluster():
    from cldm.scale.ray_batch import connect

    connect("local", num_cpus=3)  # two replicas and a preprocessing slot
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory):
    """About 50 rows over the demo model's three ControlNets: pictures with a preprocessor, hints used as they are,
    two pictures per row, another sampler; and three bad rows."""
    from cldm.training.shapes import make_sample

    folder = tmp_path_factory.mktemp("jobs")
    rows = []
    for i in range(ROWS - len(BAD)):
        s = make_sample(5_000 + i, 64)
        kind = ("canny", "scribble", "seg")[i % 3]
        Image.fromarray(s.image).save(folder / f"p{i}.png")
        Image.fromarray(s.hint(kind)).save(folder / f"h{i}.png")
        row = {"id": f"r{i}", "controlnet": kind, "prompt": s.caption, "seed": 100 + i, "steps": 8}
        if kind == "canny" and i % 2:
            row.update(image=f"p{i}.png", preprocessor="canny")
        else:
            row.update(hint=f"h{i}.png")
        if i % 7 == 0:
            row["pictures"] = 2
        if i % 5 == 0:
            row["sampler"] = "euler_a"
        rows.append(row)
    rows += [{"id": "nofile", "hint": "gone.png", "controlnet": "canny"},
             {"id": "badcfg", "hint": "h0.png", "controlnet": "canny", "cfg": -3},
             {"id": "nodepth", "hint": "h0.png", "controlnet": "depth"}]  # fmt: skip
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _batch(jobs_file: Path, out: Path) -> Batch:
    jobs, bad = read_jobs(jobs_file)
    return Batch(jobs, bad, out, Setup(BASE, str(DEMO)))


def _latest(out: Path) -> dict[str, dict]:
    state = {}
    for line in (out / MANIFEST).read_text().splitlines():
        r = json.loads(line)
        state[r["id"]] = r
    return state


@pytest.fixture(scope="module")
def in_process(jobs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    summary = run_local(_batch(jobs_file, out))
    assert summary.failed == len(BAD) and summary.done == ROWS - len(BAD)
    return {p.name: p.read_bytes() for p in out.glob("*.png")}


def test_ray_batch_gives_the_in_process_bytes(cluster, jobs_file, in_process, tmp_path):
    from cldm.scale.ray_batch import run_ray

    out = tmp_path / "ray"
    summary = run_ray(_batch(jobs_file, out), workers=2)
    assert (summary.done, summary.failed) == (ROWS - len(BAD), len(BAD))
    made = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert made.keys() == in_process.keys() and len(made) > ROWS - len(BAD)  # some rows have two pictures
    assert [n for n in made if made[n] != in_process[n]] == []
    state = _latest(out)
    assert {k for k, r in state.items() if r["status"] == "failed"} == BAD
    assert "Image not found: gone.png" in state["nofile"]["error"] and "cfg" in state["badcfg"]["error"]
    workers = {r["worker"] for r in state.values() if r["status"] == "done"}
    assert len(workers) == 2  # both replicas made pictures, neither of them this process
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)


def _replica_pids() -> list[int]:
    """The Ray worker processes that hold a batch model replica (Ray names them by their actor)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapBatches(Replica)" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def test_a_killed_replica_restarts_and_the_job_finishes(cluster, jobs_file, in_process, tmp_path):
    """One model replica gets SIGKILL after about ten rows. Ray Data must start a replica in its place and retry the
    killed one's rows: the same run_ray call finishes with every row done, the new replica made pictures, and every
    picture is the in-process batch's. A job that fails instead (or never replaces the replica) fails this test."""
    from cldm.scale.ray_batch import run_ray

    out = tmp_path / "killed"
    killed: dict[str, object] = {}
    finished = threading.Event()

    def killer():
        while not finished.is_set() and not killed:
            if (out / MANIFEST).is_file() and len((out / MANIFEST).read_text().splitlines()) >= 10:
                replicas = _replica_pids()
                if len(replicas) == 2:  # both replicas up: a third pid later can only be a replacement
                    os.kill(replicas[0], signal.SIGKILL)
                    killed.update(pid=replicas[0], replicas=set(replicas))
            finished.wait(0.05)  # the next look at the manifest

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_ray(_batch(jobs_file, out), workers=2)  # no retry here: this one call must finish the job
    finally:
        finished.set()
        thread.join(timeout=10)
    assert killed, "no replica was killed: the test did not test anything"
    assert (summary.done, summary.failed) == (ROWS - len(BAD), len(BAD))
    state = _latest(out)
    assert {k for k, r in state.items() if r["status"] == "done"} == {k for k in state if k not in BAD}
    pids = {int(r["worker"].rpartition(":")[2]) for r in state.values() if r["status"] == "done"}
    replacements = pids - killed["replicas"]
    assert replacements, f"replica {killed['pid']} was killed and no new replica made a picture (workers: {pids})"
    made = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert made == in_process


def test_two_clients_through_a_two_replica_deployment(cluster, tmp_path):
    """The real app in front of 2 Ray Serve replicas: two clients at once each get the picture a serial, local
    ModelManager makes for their request, from two different replicas whose work overlapped in time."""
    from gradio_client import Client, handle_file

    from cldm.io.model_card import card_for
    from cldm.runtime.manager import ModelManager
    from cldm.scale.serve import start
    from cldm.training.shapes import make_sample
    from studio import launch, page, service
    from tools.load_test import PLAIN

    remote = start(BASE, replicas=2)
    studio = service.Studio(remote, str(DEMO), str(tmp_path / "out"), card=card_for(BASE))
    blocks = page.build_app(studio, banner="served")
    blocks.queue(max_size=8, default_concurrency_limit=2)
    _, url, _ = launch.serve(blocks, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        samples = [make_sample(9_000 + i, 64) for i in range(2)]
        for i, s in enumerate(samples):
            Image.fromarray(s.hint("canny")).save(tmp_path / f"c{i}.png")

        def call(i: int, out: dict) -> None:
            unit = [handle_file(str(tmp_path / f"c{i}.png")), "none", 64, 1.0, 0.0, 1.0, 100, 200]
            settings = [samples[i].caption, "", "", 1, 64, 64, 40, 5.0, "ddim", 11 + i, False, 1.0]
            _, status, files = Client(url, verbose=False).predict(*unit, *settings, **PLAIN, api_name="/canny_generate")
            out[i] = (status, np.asarray(Image.open(files[0])))

        results: dict[int, tuple] = {}
        threads = [threading.Thread(target=call, args=(i, results)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert sorted(results) == [0, 1]
        served = remote.served[-2:]
        assert len({s.replica for s in served}) == 2
        assert max(s.start for s in served) < min(s.end for s in served)  # both replicas worked at once
        local = ModelManager(BASE, prepack_cpu=False)
        serial = service.Studio(local, str(DEMO), str(tmp_path / "serial"), card=card_for(BASE))
        from studio.service import Settings, UnitSettings, condition

        for i, s in enumerate(samples):
            unit = UnitSettings(condition("canny"), str(tmp_path / f"c{i}.png"), "none", 64, {})
            settings = Settings(prompt=s.caption, width=64, height=64, steps=40, cfg=5.0, sampler="ddim", seed=11 + i,
                                randomize=False, denoise=1.0)  # fmt: skip
            _, _, files = serial.generate([unit], settings, lambda *a, **k: None)
            assert np.array_equal(np.asarray(Image.open(files[0])), results[i][1]), i
        assert "seed 11" in results[0][0] and "seed 12" in results[1][0]
    finally:
        blocks.close()
        from ray import serve

        serve.shutdown()  # its replicas hold two of the cluster's three CPUs


def test_the_batch_command_on_ray_and_a_cluster_too_small(cluster, jobs_file, in_process, tmp_path, capsys):
    """`python -m cldm batch --ray`: the same bytes; asking for more replicas than the cluster holds is an error
    that says what to do (Ray would otherwise wait for them for ever)."""
    from cldm.__main__ import main

    jobs = jobs_file.with_name("four.jsonl")  # beside the pictures: relative paths are the jobs file's
    jobs.write_text("\n".join(jobs_file.read_text().splitlines()[:4]))  # rows r0..r3
    args = ["batch", "--base", BASE, "--jobs", str(jobs), "--out", str(tmp_path / "out"), "--ray"]
    assert main([*args, "--workers", "1"]) == 0
    assert "4 rows done" in capsys.readouterr().out
    made = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")}
    assert made and all(in_process[name] == data for name, data in made.items())
    assert main([*args[:-3], "--out", str(tmp_path / "more"), "--ray", "--workers", "5"]) == 2
    err = capsys.readouterr().err
    assert "the Ray cluster has 3 CPUs" in err and "fewer --workers" in err
