"""Jobs files and Batch tab uploads built to break a batch: ids whose file names collide (repeated, case, after
sanitising, a picture number), ids too long for a file name, JSON nested 100,000 deep, CSV cells over the csv
module's limit, numbers too large, lines that are not UTF-8, a million rows (streamed: the first picture comes
before the file is read), a zip bomb and names too long in a zip. Each bad row fails alone; the rest are done."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from cldm.__main__ import main as cldm_main
from cldm.scale.batch import MANIFEST, Batch, prepare_or_error, run_local
from cldm.scale.jobs import Job, make_job, read_jobs
from cldm.scale.render import Prepared, Setup

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
BASE = str(DEMO / "shapes_sd.safetensors")
TEMP_NAME_EXTRA = len(".") + len(".4194304.18446744073709551615.part")  # write_atomic's at the largest pid, thread id
NAME_LIMIT = 255  # bytes in a file name (ext4, APFS, NTFS)
BOMB_MIB = 200  # zeros in the zip bomb: over batch_tab.MAX_PICTURE_BYTES, under MAX_ZIP_BYTES


def _edges(folder: Path, n: int) -> None:
    from cldm.training.shapes import make_sample

    for i in range(n):
        Image.fromarray(make_sample(2_000 + i, 64).hint("canny")).save(folder / f"edges{i}.png")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_rows_that_used_to_break_the_batch_fail_alone(tmp_path, capsys):
    """Every id collision gets its own files, a 300-character id is shortened, a line nested 100,000 deep and a
    number of 5000 digits fail their own row, a file that cannot be written fails its row, and the rows after them
    are done. The exit status says rows failed; a rerun maps every row to the same files and skips them all."""
    _edges(tmp_path, 2)
    long_id = "x" * 300
    rows = [{"id": "dup"}, {"id": "dup"}, {"id": "dup-2"}, {"id": "DUP"}, {"id": "é1"}, {"id": "è1"},
            {"id": "b", "pictures": 2}, {"id": "b-1"}, {"id": long_id}, {"id": long_id + "y"}, {"id": "con"},
            {"id": "blocked"}, {"id": "after"}]  # fmt: skip
    lines = [json.dumps({**r, "hint": f"edges{i % 2}.png", "seed": i}) for i, r in enumerate(rows)]
    lines[3:3] = ["[" * 100_000, '{"hint": "edges0.png", "seed": ' + "9" * 5000 + "}"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    (out / "blocked.png").mkdir(parents=True)  # its PNG cannot be written: that row fails, not the batch
    args = ["batch", "--base", BASE, "--dtype", "fp32", "--jobs", str(jobs), "--out", str(out), "--controlnet",
            "canny", "--steps", "2", "--prompt", "a circle"]  # fmt: skip
    assert cldm_main(args) == 1
    assert "error: 3 of 15 rows failed" in capsys.readouterr().err
    records = _records(out)
    failed = {r["row"]: r["error"] for r in records if r["status"] == "failed"}
    assert sorted(failed) == [3, 4, 13]
    assert "nested too deeply" in failed[3] and "number too long" in failed[4] and "cannot write" in failed[13]
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == len(rows) - 1 and done[-1]["id"] == "after"
    files = [f for r in done for f in r["files"]]
    on_disk = {p.name for p in out.glob("*.png") if p.is_file()}
    assert len({f.lower() for f in files}) == len(files) == len(on_disk)  # no two pictures share a name
    assert on_disk == set(files)
    assert max(len(f.encode()) for f in files) + TEMP_NAME_EXTRA <= NAME_LIMIT
    assert {"dup.png", "dup-2.png", "b-0.png", "b-1.png", "_con.png", "after.png"} <= on_disk
    from cldm.scale.jobs import MAX_ID

    longs = [f for f in files if f.startswith("xxxx")]  # shortened, and still two names
    assert len(set(longs)) == 2 and all(len(f) == MAX_ID + len(".png") for f in longs)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.is_file()}
    assert cldm_main(args) == 1  # the same bad rows fail again
    rerun = [r for r in _records(out) if r["run"] != records[0]["run"]]
    assert sorted(r["files"][0] for r in rerun if r["status"] == "skipped") == sorted(
        r["files"][0] for r in done
    )  # every row got the same names
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.is_file()}


def test_unreadable_lines_and_cells_are_their_rows_errors(tmp_path):
    """CSV: a cell over the csv module's limit, a line that is not UTF-8, a line of 2,000,000 characters; JSON: a
    number too large for a float, a path with a NUL, a ControlNet name too long for a file, no pictures. Each is its
    own row's error."""
    (tmp_path / "jobs.csv").write_bytes(
        b"id,hint,controlnet,prompt\n"
        + b"huge,a.png,canny," + b"x" * 140_000 + b"\n"
        + b"latin\xe9,a.png,canny,x\n"
        + b"long,a.png,canny," + b"y" * 2_000_000 + b"\n"
        + b"fine,a.png,canny,a circle\n"
    )  # fmt: skip
    jobs, bad = read_jobs(tmp_path / "jobs.csv")
    assert [j.id for j in jobs] == ["fine"] and jobs[0].row == 3
    assert [r.row for r in bad] == [0, 1, 2]
    assert "field larger than field limit" in bad[0].error and "not UTF-8" in bad[1].error
    assert "longer than" in bad[2].error

    rows = [{"seed": "1" * 400}, {"seed": 10**400}, {"hint": "a\u0000.png"}, {"controlnet": "c" * 5000},
            {"pictures": 0}, {"pictures": 10**9}, {"id": "ok"}]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps({"hint": "a.png", "controlnet": "canny", **r})
                                                   for r in rows))  # fmt: skip
    jobs, bad = read_jobs(tmp_path / "jobs.jsonl")
    assert [j.id for j in jobs] == ["00003", "ok"]  # a name too long to be a file: a ControlNet _controlnet refuses
    assert [r.row for r in bad] == [0, 1, 2, 4, 5]
    assert "seed must be a whole number" in bad[0].error and "seed" in bad[1].error
    assert "hint is not a usable path" in bad[2].error
    assert "pictures must be 1..64" in bad[3].error and "pictures must be" in bad[4].error


def test_a_million_row_file_gives_its_first_picture_before_it_is_read(tmp_path):
    """The jobs file is a pipe fed a million rows: the first picture is made while the writer has put in only a
    few of them (the file is read as the rows run, not first), and stopping the batch stops the reading."""
    from cldm.scale.jobs import iter_jobs

    _edges(tmp_path, 1)
    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    line = json.dumps({"hint": "edges0.png", "controlnet": "canny", "prompt": "a circle", "steps": 2}) + "\n"
    written = [0]

    def feed() -> None:
        try:
            with open(fifo, "w") as f:
                for _ in range(1_000_000):
                    f.write(line)
                    written[0] += 1
        except BrokenPipeError:  # the batch stopped reading
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    stop = threading.Event()
    batch = Batch(iter_jobs(fifo), [], tmp_path / "out", Setup(BASE, str(DEMO), dtype="fp32"))
    summary = run_local(batch, progress=lambda i, n: stop.set(), stop=stop)
    assert summary.done == 1 and (tmp_path / "out" / "00000.png").is_file()
    assert written[0] < 10_000  # a pipe's buffer of rows, not the file
    del batch  # the reader's end closes: the writer stops
    writer.join(timeout=60)


@pytest.mark.integration  # a long batch: 4 s (keeps the fast tier under 5 minutes)
def test_streaming_keeps_memory_flat(tmp_path):
    """Reading 10,000 rows holds one row at a time: after the first thousand, the memory held grows no more."""
    import pathlib

    from cldm.scale.jobs import iter_jobs

    line = json.dumps({"hint": "a.png", "controlnet": "canny", "prompt": "a red circle on a blue background"})
    (tmp_path / "jobs.jsonl").write_text("".join(f'{{"id": "r{i}", {line[1:]}\n' for i in range(10_000)))
    ignore = [tracemalloc.Filter(False, pathlib.__file__)]  # sys.intern's table (the interpreter's), resized at times
    tracemalloc.start()
    try:
        rows = iter_jobs(tmp_path / "jobs.jsonl")
        for _ in range(1000):
            next(rows)
        before = tracemalloc.take_snapshot().filter_traces(ignore)
        assert sum(1 for _ in rows) == 9000
        after = tracemalloc.take_snapshot().filter_traces(ignore)
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 2**20, grown  # a Job kept per row would be over 10 MB


def test_ray_gets_the_rows_a_window_at_a_time():
    """Ray Data is given the pending rows in windows, each read only when the one before is done."""
    from cldm.scale.ray_batch import windows

    assert list(windows(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]  # a list: each row once
    read = []

    def rows():
        for i in range(1_000_000):
            read.append(i)
            yield i

    assert next(windows(rows(), 3)) == [0, 1, 2] and read == [0, 1, 2]


def test_a_rerun_knows_a_whole_picture_without_decoding_it(tmp_path):
    """A done row's PNG is checked chunk by chunk to its end: cut short, without its end chunk, or with a byte
    changed, its row runs again."""
    import numpy as np

    from cldm.io.images import encode_png
    from cldm.scale.render import JOB_CHUNK, is_complete

    rng = np.random.default_rng(0)
    data = encode_png((rng.random((64, 64, 3)) * 255).astype(np.uint8), "x", {JOB_CHUNK: "abc"})
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    for name, content in [("whole", data), ("half", data[: len(data) // 2]), ("no end", data[:-12]),
                          ("damaged", bytes(damaged))]:  # fmt: skip
        (tmp_path / f"{name}.png").write_bytes(content)
    assert is_complete(tmp_path / "whole.png", "abc") and not is_complete(tmp_path / "whole.png", "abd")
    assert [n for n in ("half", "no end", "damaged") if is_complete(tmp_path / f"{n}.png", "abc")] == []


# ------------------------------------------------------------------------------------------------ Batch tab
def test_a_zip_bomb_is_refused_with_bounded_memory_and_leaves_nothing(tmp_path):
    """A zip of under 1 MB holding 200 MiB of zeros named bomb.png: unpacking stops past the largest picture the
    loader reads, in pieces (memory traced stays far under the entry's size), says which entry, leaves no file."""
    from cldm.errors import InputError
    from studio.batch_tab import unpack

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.write(tmp_path / "ok.png", "ok.png")
        with z.open("bomb.png", "w", force_zip64=True) as f:
            for _ in range(BOMB_MIB):
                f.write(bytes(2**20))
    assert (tmp_path / "bomb.zip").stat().st_size < 2**20
    folder = tmp_path / "inputs"
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="bomb.png in bomb.zip is larger than"):
            unpack([str(tmp_path / "bomb.zip")], folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, peak
    assert list(folder.iterdir()) == []
    from studio.batch_tab import MAX_PICTURE_BYTES

    assert MAX_PICTURE_BYTES < BOMB_MIB * 2**20  # the bomb is over the limit (not refused for its total)


def test_long_names_and_fake_pictures_in_a_zip_are_rows(tmp_path):
    """A picture whose name has 240 characters (its temporary and its PNG's names would pass the 255-byte limit),
    and text named fake.png: both unpack; the long one is prepared as any row, the fake one fails as its row, with
    the loader's message."""
    from studio.batch_tab import unpack

    _edges(tmp_path, 1)
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as z:
        z.write(tmp_path / "edges0.png", "é" * 10 + "n" * 230 + ".png")
        z.writestr("fake.png", "not a picture")
    pictures = unpack([str(tmp_path / "in.zip")], tmp_path / "inputs")
    assert len(pictures) == 2
    assert all(len(p.name.encode()) + TEMP_NAME_EXTRA <= NAME_LIMIT for p in pictures)
    setup = Setup(BASE, str(DEMO))
    results = {}
    for i, picture in enumerate(pictures):
        item = make_job(i, {"image": picture.name, "id": picture.stem, "controlnet": "canny",
                            "preprocessor": "none"}, {}, tmp_path / "inputs")  # fmt: skip
        assert isinstance(item, Job) and all(len(n.encode()) + TEMP_NAME_EXTRA <= NAME_LIMIT for n in item.file_names())
        results[picture.stem] = prepare_or_error(item, setup)
    assert "Cannot read the image" in results.pop("fake")
    assert isinstance(results.popitem()[1], Prepared)


def test_the_batch_tab_deletes_the_unpacked_uploads_when_the_batch_ends(tmp_path):
    """Review of issue 24: a zip of ~1 MB may unpack to ~1 GB under the per-picture and per-batch caps, and the
    last 20 batch folders are kept: the unpacked copies go when the batch ends (its PNGs and zip stay)."""
    import torch

    from studio.batch_tab import run_batch
    from studio.service import Studio

    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()  # no row reaches the model
    studio = Studio(manager, str(tmp_path / "models"), str(tmp_path / "out"))
    with zipfile.ZipFile(tmp_path / "up.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(3):
            z.writestr(f"p{i}.png", b"\0" * 4_000_000)  # not pictures: each row fails alone
    gallery, status, archive = run_batch(studio, [str(tmp_path / "up.zip")], "canny", "none", "x", "", 1, 2, 5.0,
                                         "ddim", 64, 64, 1.0, 0.75, lambda *a, **k: None)  # fmt: skip
    assert "3 failed" in status and gallery == []
    folder = Path(archive[0]).parent
    assert folder.name.startswith("batch-") and not (folder / "inputs").exists()
    assert zipfile.ZipFile(archive[0]).namelist() == ["manifest.jsonl"]
