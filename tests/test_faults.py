"""The server killed in the middle of a generation, then restarted; and the load test (slow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from tools.load_test import EXAMPLES, PLAIN, SIZE, params, run, serve_demo

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def _request(steps: int, batch: int, seed: int) -> list:
    from gradio_client import handle_file

    return [handle_file(str(EXAMPLES / "shapes.png")), "canny", SIZE, 1.0, 0.0, 1.0, *params("canny"),
            "a blue circle on a pink background", "", "", batch, SIZE, SIZE, steps, 5.0, "ddim", seed, False, 1.0]  # fmt: skip


@pytest.mark.integration  # runs the app as a subprocess and kills it
def test_killed_mid_generation_leaves_nothing_half_done(tmp_path):
    from gradio_client import Client
    from gradio_client.utils import Status
    from waits import wait_for_sampling_step

    models_before = _tree_hashes(DEMO)
    out = tmp_path / "out"
    with serve_demo(out) as (url, proc):
        client = Client(url, verbose=False)
        # about 10 s here
        job = client.submit(*_request(steps=100, batch=4, seed=3), **PLAIN, api_name="/canny_generate")
        wait_for_sampling_step(job, 2)  # the server says so: inside the sampling loop, far from its end
        assert job.status().code == Status.PROGRESS
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
    for png in out.glob("*.png"):  # whatever is there is complete
        with Image.open(png) as img:
            img.load()
            assert "parameters" in img.text
    assert _tree_hashes(DEMO) == models_before  # the models folder is untouched
    with serve_demo(out) as (url, _):  # restarted on the same folders
        assert not list(out.glob(".*.part"))
        _, status, files = Client(url, verbose=False).predict(
            *_request(steps=4, batch=1, seed=4), **PLAIN, api_name="/canny_generate"
        )
        assert len(files) == 1 and "seed 4" in status
        assert Image.open(files[0]).size == (SIZE, SIZE)


@pytest.mark.slow
def test_load_4_clients_several_tabs_with_bad_requests():
    """A short version of `python tools/load_test.py --clients 4` (the README has the long runs' figures)."""
    report = run(clients=4, seconds=60, queue_size=16)
    assert report.good > 20 and report.good_wrong == 0, report.summary()
    assert report.bad > 0 and report.bad_wrong == 0, report.summary()
    assert not report.other_errors, report.other_errors[:3]
    assert report.rss_end_mb < report.rss_start_mb + 300, report.summary()


@pytest.mark.slow
def test_load_16_clients_on_a_short_queue_get_immediate_refusals():
    report = run(clients=16, seconds=60, queue_size=4)
    assert report.good > 20 and report.good_wrong == 0 and report.bad_wrong == 0, report.summary()
    assert report.queue_full > 0 and report.queue_full_max_s < 2.0, report.summary()
    assert not report.other_errors, report.other_errors[:3]
