"""`python -m cldm batch` in-process and the app's Batch tab, on the shipped demo model: jobs files read as
documented, pictures equal to `python -m cldm generate`, bad rows in the manifest, reruns that do exactly the
missing rows (also after the process was killed)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cldm.__main__ import main as cldm_main
from cldm.scale.batch import MANIFEST
from cldm.scale.jobs import read_jobs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
BASE = str(DEMO / "shapes_sd.safetensors")


def _pictures(folder: Path, n: int) -> list[str]:
    """n pictures of coloured shapes (the demo model's world) and their canny-style edge hints."""
    from cldm.training.shapes import make_sample

    names = []
    for i in range(n):
        s = make_sample(1_000 + i, 64)
        Image.fromarray(s.image).save(folder / f"pic{i}.png")
        Image.fromarray(s.hint("canny")).save(folder / f"edges{i}.png")
        names.append(s.caption)
    return names


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def _runs(out: Path) -> list[list[dict]]:
    """The manifest's records grouped by run, in order."""
    groups: dict[str, list[dict]] = {}
    for r in _manifest(out):
        groups.setdefault(r["run"], []).append(r)
    return list(groups.values())


def _batch(*args: str) -> int:
    return cldm_main(["batch", "--base", BASE, "--dtype", "fp32", *args])


def test_jobs_files_are_read_as_documented(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "jobs.csv").write_text(
        "id,hint,image,module,model,prompt,seed,steps,cfg_scale,colour,control_scale\n"
        "first,in/a.png,,,canny,a {colour} circle,5,,7,red,0.5\n"
        ",,in/b.png,canny,canny,,6,10,,blue,\n"
        "bad,in/c.png,,,canny,x,seven,2.5,,,\n"
        "both,in/c.png,in/d.png,,canny,x,1,,,,\n"
        "first,in/e.png,,,my/cn.safetensors,{missing} star,1,,,,\n"
        ",,,,canny,no picture,1,,,,\n"
    )  # fmt: skip
    jobs, bad = read_jobs(tmp_path / "jobs.csv", {"prompt": "{stem} in {colour}", "steps": 30, "cfg": 4.0})
    a, b, dup = jobs
    assert (a.id, a.image, a.preprocessor, a.controlnet) == ("first", str(tmp_path / "in/a.png"), "none", "canny")
    assert (a.prompt, a.seed, a.steps, a.cfg, a.scale) == ("a red circle", 5, 30, 7.0, 0.5)
    # row 1: the defaults fill the empty cells; the template gets the picture's name and the row's column
    assert (b.id, b.prompt, b.steps, b.cfg, b.preprocessor, b.scale) == ("00001", "b in blue", 10, 4.0, "canny", 1.0)
    # a repeated id gets its row number; a ControlNet given as a path is made absolute; unknown {words} stay
    assert dup.id == "first~4" and dup.controlnet == str(tmp_path / "my/cn.safetensors")
    assert dup.prompt == "{missing} star" and dup.file_names() == ["first~4.png"]
    assert [(r.row, r.id) for r in bad] == [(2, "bad"), (3, "both"), (5, "00005")]
    assert (
        "seed must be a whole number (got 'seven')" in bad[0].error and "steps must be a whole number" in bad[0].error
    )
    assert "not both" in bad[1].error and "no picture" in bad[2].error
    assert a.fingerprint(BASE) != a.fingerprint("other.safetensors")  # the base is part of what a row makes

    (tmp_path / "jobs.jsonl").write_text(
        '{"hint": "in/a.png", "controlnet": "seg", "pictures": 2, "seed": 1e3}\n\n[1, 2]\n{not json\n'
        '{"hint": "in/a.png", "controlnet": "seg", "steps": true}\n'
    )  # fmt: skip
    jobs, bad = read_jobs(tmp_path / "jobs.jsonl")
    assert [j.file_names() for j in jobs] == [["00000-0.png", "00000-1.png"]] and jobs[0].seed == 1000
    assert [r.row for r in bad] == [1, 2, 3] and "not a JSON object" in bad[0].error and "not JSON" in bad[1].error


def test_a_batch_row_is_the_generate_command_s_picture(tmp_path, capsys):
    _pictures(tmp_path, 1)
    (tmp_path / "jobs.csv").write_text("hint,prompt,seed\nedges0.png,a red circle on a blue background,41\n")
    assert _batch("--jobs", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "out"), "--controlnet", "canny",
                  "--steps", "12", "--cfg", "5") == 0  # fmt: skip
    assert "1 rows done (1 pictures" in capsys.readouterr().out
    assert cldm_main(["generate", "--base", BASE, "--controlnet", str(DEMO / "control_v11p_sd15_canny.safetensors"),
                      "--hint", str(tmp_path / "edges0.png"), "--prompt", "a red circle on a blue background",
                      "--seed", "41", "--steps", "12", "--cfg", "5", "--dtype", "fp32", "--out",
                      str(tmp_path / "cli.png")]) == 0  # fmt: skip
    ours, cli = Image.open(tmp_path / "out" / "00000.png"), Image.open(tmp_path / "cli.png")
    assert np.array_equal(np.asarray(ours), np.asarray(cli))
    assert "Seed: 41" in ours.info["parameters"] and "Steps: 12" in ours.info["parameters"]


def test_bad_rows_are_recorded_and_a_rerun_does_exactly_the_missing_rows(tmp_path, capsys):
    captions = _pictures(tmp_path, 4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        {"id": "a", "image": "pic0.png", "preprocessor": "canny", "prompt": captions[0], "seed": 1},
        {"id": "b", "hint": "edges1.png", "prompt": captions[1], "seed": 2, "pictures": 2},
        {"id": "c", "image": "pic2.png", "controlnet": "scribble", "preprocessor": "scribble_sketch", "seed": 3},
        {"id": "hed", "image": "pic2.png", "controlnet": "scribble", "preprocessor": "scribble_hed"},
        {"id": "d", "hint": "edges3.png", "prompt": captions[3], "seed": 4, "sampler": "euler_a"},
        {"id": "missing", "hint": "nowhere.png"},
        {"id": "unreadable", "hint": "broken.png"},
        {"id": "depth", "hint": "edges0.png", "controlnet": "depth"},
        {"id": "huge", "hint": "edges0.png", "cfg": 1e9},
        {"id": "sampler", "hint": "edges0.png", "sampler": "nope"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    args = ("--jobs", str(jobs), "--out", str(out), "--controlnet", "canny", "--steps", "8", "--prompt", "a shape")
    assert _batch(*args) == 1  # rows failed: the exit status says so
    assert "error: 6 of 10 rows failed" in capsys.readouterr().err
    first = _runs(out)[0]
    state = {r["id"]: r for r in first}
    assert {k for k, r in state.items() if r["status"] == "done"} == {"a", "b", "c", "d"}
    errors = {k: r["error"] for k, r in state.items() if r["status"] == "failed"}
    assert "Image not found: nowhere.png" in errors["missing"]
    assert "Cannot read the image" in errors["unreadable"]
    assert "ControlNetHED.pth" in errors["hed"]  # the preprocessor's weights are missing here: it says which file
    assert "no depth ControlNet" in errors["depth"] and "cfg" in errors["huge"] and "sampler" in errors["sampler"]
    made = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert set(made) == {"a.png", "b-0.png", "b-1.png", "c.png", "d.png"}
    assert state["b"]["seeds"] == [2, 3]

    # nothing changed: every good row is skipped, no file is written again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert _batch(*args) == 1
    second = _runs(out)[1]
    assert {r["id"] for r in second if r["status"] == "skipped"} == {"a", "b", "c", "d"}
    assert not [r for r in second if r["status"] == "done"]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    # one picture deleted, one cut short, one row's prompt changed: exactly those three rows run again
    (out / "b-1.png").unlink()
    (out / "c.png").write_bytes(made["c.png"][: len(made["c.png"]) // 2])
    next(r for r in rows if r["id"] == "d")["prompt"] = "a green square on a white background"
    jobs.write_text("\n".join(json.dumps(r) for r in rows))
    assert _batch(*args) == 1
    third = _runs(out)[2]
    assert {r["id"] for r in third if r["status"] == "done"} == {"b", "c", "d"}
    assert {r["id"] for r in third if r["status"] == "skipped"} == {"a"}
    assert (out / "b-1.png").read_bytes() == made["b-1.png"] and (out / "c.png").read_bytes() == made["c.png"]
    assert (out / "d.png").read_bytes() != made["d.png"]
    assert "failed: row 5 (missing)" in capsys.readouterr().out


@pytest.mark.integration  # `python -m cldm batch` as subprocesses, one of them killed
@pytest.mark.parametrize("rows", [12])
def test_a_killed_batch_completes_on_rerun(tmp_path, rows):
    """SIGKILL in the middle of a run, then the same command again: the missing rows are made, the others kept,
    and every picture is the one an uninterrupted run makes."""
    _pictures(tmp_path, rows)
    (tmp_path / "jobs.csv").write_text("hint,seed\n" + "".join(f"edges{i}.png,{i}\n" for i in range(rows)))
    cmd = [sys.executable, "-m", "cldm", "batch", "--base", BASE, "--dtype", "fp32", "--jobs",
           str(tmp_path / "jobs.csv"), "--controlnet", "canny", "--prompt", "a circle", "--steps", "10"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], env=env, cwd=ROOT, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / MANIFEST).is_file() and len(_manifest(out)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["id"] for r in _manifest(out) if r["status"] == "done"}
    assert 3 <= len(before) < rows, "the kill should land in the middle of the run"
    subprocess.run([*cmd, "--out", str(out)], env=env, cwd=ROOT, check=True, capture_output=True)
    rerun = _runs(out)[-1]
    assert {r["id"] for r in rerun if r["status"] == "done"} == {f"{i:05d}" for i in range(rows)} - before
    assert {r["id"] for r in rerun if r["status"] == "skipped"} == before
    for i in range(rows):
        assert (out / f"{i:05d}.png").read_bytes() == (tmp_path / "clean" / f"{i:05d}.png").read_bytes()
    assert not list(out.glob(".*.part"))


def test_the_batch_tab(demo_app, tmp_path):
    """Pictures and a zip (with a path-escaping name and a non-picture in it) through the running app; each picture
    is the command line batch's for the same settings."""
    from gradio_client import Client, handle_file

    _pictures(tmp_path, 3)
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as z:
        z.write(tmp_path / "edges2.png", "../../escape/edges2.png")
        z.writestr("notes.txt", "not a picture")
        z.write(tmp_path / "edges1.png", "sub/edges1.png")  # the same name as an upload: made unique
    client = Client(demo_app[0], verbose=False)
    uploads = [handle_file(str(tmp_path / f)) for f in ("edges0.png", "edges1.png", "more.zip")]
    gallery, status, archive = client.predict(
        uploads, "canny", "none", "a {stem} shape", "", 100, 8, 5.0, "ddim", 64, 64, 1.0, 0.75, api_name="/batch_run"
    )  # fmt: skip
    assert "4 rows done (4 pictures" in status
    assert "failed" not in status and "skipped" not in status  # counts of none are left out
    with zipfile.ZipFile(archive[0]) as z:
        names = sorted(z.namelist())
        assert names == ["edges0.png", "edges1-2.png", "edges1.png", "edges2.png", "manifest.jsonl"]
        tab = {n: z.read(n) for n in names}
    assert not list(Path(archive[0]).parents[1].glob("escape"))
    # the same rows on the command line (seeds 100, 101, ... in file-name order)
    (tmp_path / "jobs.csv").write_text("id,hint,seed\nedges0,edges0.png,100\nedges1-2,edges1.png,101\n"
                                       "edges1,edges1.png,102\nedges2,edges2.png,103\n")  # fmt: skip
    assert _batch("--jobs", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "cli"), "--controlnet", "canny",
                  "--steps", "8", "--cfg", "5", "--prompt", "a {stem} shape") == 0  # fmt: skip
    for name in ("edges0.png", "edges1-2.png", "edges1.png", "edges2.png"):
        cli = np.asarray(Image.open(tmp_path / "cli" / name))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(tab[name]))), cli), name
    with pytest.raises(Exception, match="Upload pictures|Invalid file type"):
        client.predict([handle_file(str(tmp_path / "jobs.csv"))], "canny", "none", "x", "", 1, 8, 5.0, "ddim", 64, 64,
                       1.0, 0.75, api_name="/batch_run")  # fmt: skip


def test_old_batch_folders_are_pruned(tmp_path):
    """A shared server keeps its output folder bounded: the newest batch folders, none older than the limit."""
    from studio.batch_tab import prune_batches

    now = time.time()
    for i in range(6):
        (tmp_path / f"batch-{i}" / "pictures").mkdir(parents=True)
        os.utime(tmp_path / f"batch-{i}", (now - i * 60, now - i * 60))  # batch-0 newest
    (tmp_path / "batch-old").mkdir()
    os.utime(tmp_path / "batch-old", (now - 30 * 3600, now - 30 * 3600))
    (tmp_path / "keep.png").write_bytes(b"x")  # not a batch folder: left alone
    prune_batches(tmp_path, keep=4, hours=24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-0", "batch-1", "batch-2", "batch-3", "keep.png"]
