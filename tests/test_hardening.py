"""Hostile and unlucky inputs (issue 11): each test here failed on the code before the fix."""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_app import HINT, _rest

from cldm.errors import CheckpointError, InputError
from cldm.io.images import load_rgb, save_png

SIZE = 64
SETTINGS = dict(prompt="a red square", added_prompt="", negative_prompt="", batch=1, width=SIZE, height=SIZE, steps=2,
                cfg=5.0, sampler="ddim", seed=7, randomize=False, denoise=0.75)  # fmt: skip


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds one empty data chunk (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ picture shapes
@pytest.mark.parametrize("size", [(60000, 8), (1, 4000)])
def test_degenerate_shapes_are_refused_before_any_work(size):
    import annotators

    data = _png(Image.new("L", size))
    assert len(data) < 3000  # a tiny upload...
    with pytest.raises(InputError, match=r"at most 8:1 between its sides"):
        load_rgb(data)  # ...refused from its header, before decoding
    with pytest.raises(annotators.AnnotatorError, match=r"at most 8:1"):
        annotators.run("canny", np.zeros((size[1], size[0], 3), np.uint8), resolution=512)
    with pytest.raises(InputError, match=r"8:1"):
        from cldm.io.images import array_to_rgb

        array_to_rgb(np.zeros((size[1], size[0]), np.uint8))


def test_a_long_side_over_the_cap_is_refused():
    with pytest.raises(InputError, match=r"each side must be 1..16384 px"):
        load_rgb(_png_header_only(16400, 2100))


def test_a_decompression_bomb_is_called_too_large_not_the_wrong_format():
    with pytest.raises(InputError) as e:
        load_rgb(_png_header_only(16000, 16000))  # 256 MP: Pillow's bomb check fires inside Image.open
    assert "too large" in str(e.value) and "Use a PNG" not in str(e.value)


# ------------------------------------------------------------------------------------ brightness, not range
def _tiff(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "TIFF")
    return buf.getvalue()


def test_float_pictures_mean_brightness_0_to_1():
    flat = load_rgb(_tiff(np.full((8, 8), 0.5, np.float32)))
    assert (flat == 128).all()  # was all black: a flat picture has no range to stretch
    narrow = load_rgb(_tiff(np.linspace(0.4, 0.6, 64, dtype=np.float32).reshape(8, 8)))
    assert narrow.min() == 102 and narrow.max() == 153  # was stretched to 0..255
    assert (load_rgb(_tiff(np.full((8, 8), 7.0, np.float32))) == 255).all()  # above 1: clipped


def test_16_bit_pictures_are_16_bit_whatever_their_values():
    dark = np.full((8, 8), 200, np.uint16)  # a very dark 16-bit picture, not an 8-bit one
    buf = io.BytesIO()
    Image.fromarray(dark).save(buf, "PNG")
    assert (load_rgb(buf.getvalue()) == 1).all()  # 200 / 65535 * 255 = 0.78 -> 1; was 200
    from cldm.io.images import array_to_rgb

    assert (array_to_rgb(dark) == 1).all()
    assert (array_to_rgb(np.full((8, 8, 3), 0.5)) == 128).all()


# --------------------------------------------------------------------------------------------- checkpoints
def test_a_pickle_named_safetensors_says_what_it_is(tmp_path):
    import pickle

    from cldm.io.files import read_file

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        read_file(path)
    msg = str(e.value)
    assert "plain Python pickle" in msg and "named .safetensors" in msg and "damaged" not in msg


def test_a_shard_index_may_not_name_files_outside_its_folder(tmp_path):
    import json

    from cldm.io.files import read_folder
    from cldm.io.writers import save_file

    outside = tmp_path / "secret.safetensors"
    save_file({"w": torch.zeros(2)}, outside)
    folder = tmp_path / "cn"
    folder.mkdir()
    for shard in ("../secret.safetensors", str(outside), "sub/x.safetensors"):
        index = {"weight_map": {"w": shard}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="not a file in that folder"):
            read_folder(folder)
    save_file({"w": torch.ones(2)}, folder / "part-1.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "part-1.safetensors"}})
    )
    assert torch.equal(read_folder(folder)["w"], torch.ones(2))


# ----------------------------------------------------------------------------------- manager and pipeline
def test_a_tiny_cache_never_drops_what_the_request_just_loaded(tiny_dirs, ours, other_controlnet, tmp_path):
    from cldm.io import writers
    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.runtime.manager import ModelManager

    sd_dir, _ = tiny_dirs
    paths = []
    for i, cn in enumerate((ours[1], other_controlnet, ours[1])):
        paths.append(tmp_path / f"cn{i}.safetensors")
        writers.save_controlnet(cn, paths[-1])
    m = ModelManager(str(sd_dir), device="cpu", dtype="fp32", cache_bytes=1)  # smaller than any ControlNet
    hint = np.zeros((SIZE, SIZE, 3), np.uint8)
    request = GenerationRequest("a", units=[ControlUnit(str(p), hint) for p in paths], steps=1, width=SIZE, height=SIZE)
    assert m.run(request).images.shape == (1, SIZE, SIZE, 3)
    assert m.run(request).images.shape == (1, SIZE, SIZE, 3)  # and again, all three on the device


@pytest.mark.integration  # 1000 sampler steps: ~10 s, kept out of the fast tier's 5 minutes
def test_1000_steps_is_a_clear_message_not_an_index_error(ours):
    from cldm.pipeline.request import GenerationRequest
    from cldm.pipeline.stages import generate
    from cldm.sampling.samplers import SAMPLERS, make_sampler

    with pytest.raises(InputError, match=r"steps must be 1..999"):
        generate(ours[0], GenerationRequest("a", steps=1000, width=SIZE, height=SIZE))
    # 999 steps: every sampler walks its whole schedule (the schedules are what overflowed; a stand-in model's eps)
    for name in SAMPLERS:
        s, g = make_sampler(name, 999), torch.Generator().manual_seed(0)
        x = s.init_noise(torch.randn(1, 4, 2, 2, generator=g))
        for i in range(len(s.timesteps)):
            x = s.step(x, 0.1 * s.scale_input(x, i), i, g)
        assert torch.isfinite(x).all(), name
    # and through the pipeline: img2img builds the 999-step schedule and runs its last steps (5 model calls)
    init = np.full((SIZE, SIZE, 3), 128, np.uint8)
    r = GenerationRequest("a", steps=999, width=SIZE, height=SIZE, cfg_scale=1.0, init_image=init, strength=0.005)
    assert np.isfinite(generate(ours[0], r).images.astype(float)).all()


def test_the_detector_cache_is_bounded_and_loads_once_under_threads(monkeypatch):
    from annotators import cache

    monkeypatch.setattr(cache, "MAX_LOADED", 2)
    cache.clear()
    builds = []

    def build(kind):
        def make(paths):
            builds.append(kind)
            threading.Event().wait(0.05)  # a slow load: every thread arrives while it runs
            return object()

        return make

    threads = [threading.Thread(target=cache.cached_load, args=("a", (), build("a"), None, "a")) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["a"]
    for kind in ("b", "c"):
        cache.cached_load(kind, (), build(kind), None, kind)
    assert [k[0] for k in cache.loaded()] == ["b", "c"]  # "a" (least recently used) went
    cache.clear()


def test_the_detector_cache_is_bounded_by_bytes_and_follows_the_device(monkeypatch):
    import torch

    from annotators import cache

    monkeypatch.setattr(cache, "MAX_BYTES", 3 * 1024 * 4)  # three 32x32 fp32 networks' worth
    cache.clear()

    class Detector:  # a controlnet-aux detector: a plain object holding its network
        def __init__(self):
            self.model = torch.nn.Linear(32, 32, bias=False)

    for kind in "abcd":
        cache.cached_load(kind, (), lambda paths: Detector(), None, kind)
    assert cache.detector_bytes(Detector()) == 32 * 32 * 4
    assert [k[0] for k in cache.loaded()] == ["b", "c", "d"]  # "a" went: four would pass the byte bound
    pose = {"body": Detector(), "hand": Detector()}  # the pose parts come as a dict
    assert cache.detector_bytes(pose) == 2 * 32 * 32 * 4
    try:
        cache.use_device("meta")  # another device: detectors are built again and moved there
        moved = cache.cached_load("a", (), lambda paths: Detector(), None, "a")
        assert moved.model.weight.device.type == "meta" and cache.loaded()[-1] == ("a", "", "meta")
    finally:
        cache.use_device("cpu")
        cache.clear()


# --------------------------------------------------------------------------------------------- outputs
def test_save_png_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    real_write = Path.write_bytes

    def crash(self, data):
        real_write(self, data[:50])  # half written...
        raise OSError("disk full")  # ...then the crash

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError):
        save_png(np.zeros((8, 8, 3), np.uint8), target, "x")
    assert list(tmp_path.iterdir()) == []  # no half PNG under the final name, no temporary left
    monkeypatch.setattr(Path, "write_bytes", real_write)
    save_png(np.zeros((8, 8, 3), np.uint8), target, "x")
    assert Image.open(target).text["parameters"] == "x"


def test_output_folder_is_bounded_and_cleared_of_partial_files(tmp_path):
    import os
    import time

    from studio.service import Limits, Studio

    (tmp_path / ".half.png.1.2.part").write_bytes(b"x")
    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    studio = Studio(manager, None, str(tmp_path), limits=Limits(keep_outputs=3, keep_hours=1))
    assert not list(tmp_path.glob("*.part"))  # left by a killed server: gone at start-up
    now = time.time()
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(b"png")
        os.utime(tmp_path / f"{i}.png", (now - 60 * (6 - i), now - 60 * (6 - i)))
    os.utime(tmp_path / "5.png", (now - 7200, now - 7200))  # the newest name, but two hours old
    studio._prune_outputs()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["2.png", "3.png", "4.png"]


# ------------------------------------------------------------------------------------------- the running app
@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app[0], verbose=False)


def _unit(image, preprocessor, params=(100, 200)):
    return [image, preprocessor, SIZE, 1.0, 0.0, 1.0, *params]


def test_messages_show_no_server_paths_and_escape_user_text(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(AppError, match=r"Cannot read the image \(.*\)\. Use a PNG, JPEG or WebP file") as e:
        client.predict(
            *_unit(handle_file(str(tmp_path / "broken.png")), "canny"), SIZE, SIZE, *HINT, api_name="/canny_hint"
        )
    assert "/tmp" not in str(e.value) and "gradio" not in str(e.value)
    with pytest.raises(AppError, match="Cannot read the image") as e:  # the picture is read before the ControlNet
        client.predict(*_unit(handle_file(str(tmp_path / "broken.png")), "none", (0.1, 0.1)), *SETTINGS.values(),
                       *_rest(), api_name="/mlsd_generate")  # fmt: skip
    assert "/tmp" not in str(e.value) and "mlsd" not in str(e.value)
    good = tmp_path / "ok.png"
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(good)
    # a missing ControlNet: named relative to the models folder
    with pytest.raises(AppError, match=r"ControlNet control_v11p_sd15_mlsd weights are not on this machine") as e:
        client.predict(
            *_unit(handle_file(str(good)), "none", (0.1, 0.1)), *SETTINGS.values(), *_rest(), api_name="/mlsd_generate"
        )
    assert "/tmp" not in str(e.value)
    with pytest.raises(AppError, match=r"'&lt;img src=x onerror=alert\(1\)&gt;' is not a preprocessor for Canny") as e:
        client.predict(*_unit(handle_file(str(good)), "<img src=x onerror=alert(1)>"), SIZE, SIZE, *HINT,
                       api_name="/canny_hint")  # fmt: skip
    assert "<img" not in str(e.value)


def test_a_path_that_was_not_uploaded_is_refused_without_naming_server_folders(running_app):
    """Issue 24: Gradio refuses a file path that was not uploaded, and used to say so with the server's working
    directory ("Cannot move /srv/app/file:/etc/passwd ..."); the refusal now names nothing of the server."""
    import os

    import httpx

    url = running_app[0]
    for path in ("file:/etc/passwd", "/etc/passwd", "../../etc/passwd"):
        picture = {"path": path, "meta": {"_type": "gradio.FileData"}}
        r = httpx.post(url + "gradio_api/call/canny_hint", json={"data": [*_unit(picture, "canny"), SIZE, SIZE, *HINT]})
        answer = httpx.get(url + f"gradio_api/call/canny_hint/{r.json()['event_id']}", timeout=60).text
        assert answer.startswith("event: error") and os.getcwd() not in answer and "passwd" not in answer


def test_each_request_is_shown_its_own_hint_file(running_app, tmp_path):
    """Gradio's cache names a picture by its content and rewrites the file in place: two users shown the same hint
    at once could download it half-written (the 30-minute load runs lost 1-4 answers in ~750 that way). Hints are
    now files of their own per request, under the output folder's shown/ (pruned like the results)."""
    import httpx

    url, out_dir = running_app[0], running_app[2]
    picture = tmp_path / "square.png"
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(picture)
    with open(picture, "rb") as f:
        uploaded = httpx.post(url + "gradio_api/upload", files={"files": f}).json()[0]
    data = _unit({"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "canny") + [SIZE, SIZE, "Balanced",
                                                                                        "Crop and Resize", False]  # fmt: skip
    paths = []
    for _ in range(2):  # the same request twice: the same pixels, two files
        event = httpx.post(url + "gradio_api/call/canny_hint", json={"data": data}).json()["event_id"]
        answer = httpx.get(url + f"gradio_api/call/canny_hint/{event}", timeout=60).text
        assert answer.startswith("event: complete"), answer
        paths.append(json.loads(answer.split("data: ", 1)[1])[0]["path"])
    names = [Path(p).name for p in paths]  # Gradio serves its copy of each of our files, under our file's name
    assert names[0] != names[1] and all((out_dir / "shown" / n).is_file() for n in names)
    assert Path(paths[0]).read_bytes() == Path(paths[1]).read_bytes()


def test_missing_values_through_the_api_are_named(client, tmp_path):
    from gradio_client import handle_file

    good = tmp_path / "ok.png"
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(good)
    for field in ("steps", "prompt", "sampler"):
        with pytest.raises(Exception, match=f"Missing value for {field}"):
            client.predict(*_unit(handle_file(str(good)), "canny"), *dict(SETTINGS, **{field: None}).values(), *_rest(),
                           api_name="/canny_generate")  # fmt: skip
    with pytest.raises(Exception, match="Missing value for preprocessor"):
        client.predict(*_unit(handle_file(str(good)), None), SIZE, SIZE, *HINT, api_name="/canny_hint")


def test_a_request_over_the_work_budget_is_refused_at_once(client, tmp_path):
    import time

    from gradio_client import handle_file

    good = tmp_path / "ok.png"
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(good)
    huge = dict(SETTINGS, width=1024, height=1024, steps=100, batch=4)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=r"419 megapixel-steps .*this server allows 32"):
        client.predict(*_unit(handle_file(str(good)), "canny"), *huge.values(), *_rest(), api_name="/canny_generate")
    assert time.perf_counter() - t0 < 5  # refused before any preprocessor or model ran


def test_user_errors_log_one_line_internal_errors_one_traceback(caplog):
    import gradio as gr

    from studio import handlers
    from studio.service import Studio

    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    wrap = handlers.friendly(Studio(manager, "/srv/models"))

    @wrap
    def user_error():
        raise InputError("Image not found: /srv/models/x.png")

    @wrap
    def bug():
        raise KeyError("oops")

    with caplog.at_level(logging.INFO, logger="app"):
        with pytest.raises(gr.Error) as e:
            user_error()
        assert e.value.print_exception is False and str(e.value.message) == "Image not found: x.png"
        assert len(caplog.records) == 1 and caplog.records[0].exc_info is None
        caplog.clear()
        with pytest.raises(gr.Error) as e:
            bug()
        assert e.value.print_exception is False and "Internal error (KeyError)" in e.value.message
        assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


def test_auth_pairs_and_file(tmp_path):
    from studio import launch

    (tmp_path / "users").write_text("# team\nana:s3cret\n\nbo:pa:ss\n")
    assert launch.read_auth(["x:y"], str(tmp_path / "users")) == [("x", "y"), ("ana", "s3cret"), ("bo", "pa:ss")]
    with pytest.raises(SystemExit, match="user:password"):
        launch.read_auth(["nopassword"], None)
    with pytest.raises(SystemExit, match="cannot read the auth file"):
        launch.read_auth([], str(tmp_path / "missing"))


def _every_route(routes):
    """The app's routes, those of included routers (Gradio's /gradio_api one) flattened in."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _every_route(inner.routes) if inner is not None else [route]


@pytest.mark.integration  # starts a server of its own
def test_a_server_with_auth_refuses_anonymous_clients(ours, tmp_path):
    """Issue 24: under --auth no route answers without a login but the login page and the login form's handler.
    Gradio alone served its page config (every endpoint, the model lists) on `/`, the heartbeat, and `/cancel`,
    which stopped a logged-in user's job for anyone who knew its session hash and event id."""
    import re
    import socket

    import httpx
    from gradio_client import Client
    from starlette.routing import Mount

    from studio import launch, page
    from studio.gate import OPEN_PATHS
    from studio.service import Studio

    # no model is needed to check the door
    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    blocks = page.build_app(Studio(manager, None, str(tmp_path)))
    assert blocks.delete_cache == (3600, 86400)  # Gradio's upload copies go once a day old
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    launch.serve(blocks, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
              auth=[("ana", "s3cret")])  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        page = httpx.get(url + "/")
        assert page.status_code == 200 and 'type="password"' in page.text
        assert "canny" not in page.text and "gradio_api_info" not in page.text and str(tmp_path) not in page.text
        answered, routes = [], list(_every_route(blocks.app.routes))
        for route in routes:
            path = re.sub(r"\{[^}]*\}", "x", route.path) + ("/x" if isinstance(route, Mount) else "")
            methods = sorted(getattr(route, "methods", None) or {"GET"})
            for method in methods:
                if path in OPEN_PATHS or method == "HEAD":
                    continue
                r = httpx.request(method, url + path, json={"session_hash": "s", "fn_index": 0, "event_id": "e"},
                                  timeout=10)  # fmt: skip
                if r.status_code != 401:
                    answered.append((method, path, r.status_code))
        assert not answered
        assert len(routes) > 80  # every route was tried, Gradio's API router's included
        assert httpx.post(url + "/login", data={"username": "ana", "password": "wrong"}).status_code in (400, 401)
        Client(url + "/", auth=("ana", "s3cret"), verbose=False)  # logs in and reads the API
        with httpx.Client() as browser:
            assert browser.post(url + "/login", data={"username": "ana", "password": "s3cret"}).status_code == 200
            assert "gradio_api_info" in browser.get(url + "/").text  # the real page once logged in
            cancel = browser.post(url + "/gradio_api/cancel", json={"session_hash": "s", "fn_index": 0,
                                                                    "event_id": "e"})  # fmt: skip
            assert cancel.status_code == 200
    finally:
        blocks.close()


def app_without_a_server(monkeypatch) -> dict:
    """`app.main` with stand-ins for the page and the model: what it would launch the server with lands in the
    returned dict (launch's keyword arguments), and nothing is loaded or served."""
    import app

    launched = {}

    class FakeBlocks:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(app, "build_app", lambda studio, banner: FakeBlocks())
    fake = {"device": torch.device("cpu"), "dtype": torch.float32, "prepack_cpu": False, "base_path": "sd",
            "load_embeddings": lambda self, folder: {}}  # fmt: skip
    monkeypatch.setattr(app, "ModelManager", lambda *a, **kw: type("M", (), fake)())
    return launched


def test_sharing_without_auth_warns(monkeypatch, caplog):
    import app

    launched = app_without_a_server(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="app"):
        app.main(["--demo", "--share"])
    assert launched["share"] and launched["auth"] is None
    assert any("without --auth" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"):
        app.main(["--demo", "--share", "--auth", "ana:s3cret", "--max-work", "5"])
    assert launched["auth"] == [("ana", "s3cret")] and not any("without --auth" in r.message for r in caplog.records)


def test_the_work_budget_counts_dpmpp_sde_twice(tmp_path):
    """DPM++ SDE calls the model twice per step: 512 px x 20 steps x 4 pictures fits the default budget (21 of 32
    megapixel-steps) with one call per step and not with two."""
    from studio.service import Studio
    from studio.settings import Settings

    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    studio = Studio(manager, str(tmp_path), str(tmp_path / "out"))
    s = Settings(width=512, height=512, steps=20, batch=4)
    studio.check_work([], s)  # DPM++ 2M Karras: allowed
    with pytest.raises(InputError, match=r"42 megapixel-steps .*2 model calls per step \(dpmpp_sde_karras\)"):
        studio.check_work([], replace(s, sampler="dpmpp_sde_karras"))
