"""The real app on 127.0.0.1 with tiny weights in the real formats, driven through gradio_client."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from cldm import checkpoints

SIZE = 64
SETTINGS = dict(prompt="a red square", added_prompt="best quality", negative_prompt="lowres", batch=1, width=SIZE,
                height=SIZE, steps=2, cfg=5.0, sampler="ddim", seed=7, randomize=False, guess_mode=False, denoise=0.75)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_dirs, ours, tmp_path_factory):
    import app
    from cldm.manager import ModelManager

    sd_dir, cn_dir = tiny_dirs
    _, cn = ours
    models = tmp_path_factory.mktemp("models")
    checkpoints.save_controlnet(cn, models / "control_v11p_sd15_canny.safetensors")  # 1.1 layout
    checkpoints.save_controlnet(cn, models / "control_v11p_sd15_scribble.safetensors", fmt="bare")
    checkpoints.save_controlnet(cn, models / "control_v11e_sd15_shuffle", fmt="diffusers")
    manager = ModelManager(str(sd_dir), device="cpu", dtype="fp32")
    studio = app.Studio(manager, str(models), str(tmp_path_factory.mktemp("out")))
    demo = app.build_app(studio)
    demo.queue(max_size=8)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True,
                allowed_paths=[str(studio.out_dir)])  # fmt: skip
    yield f"http://127.0.0.1:{port}/", manager
    demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url[0], verbose=False)


@pytest.fixture()
def square(tmp_path):
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    img[16:48, 16:48] = (200, 30, 30)
    path = tmp_path / "square.png"
    Image.fromarray(img).save(path)
    return str(path)


def _unit(image, annotator, params=()):
    # image, annotator, resolution, scale, start, end, then the tab's annotator sliders
    return [image, annotator, SIZE, 1.0, 0.0, 1.0, *params]


def test_canny_preview_and_generate(client, square, app_url):
    from gradio_client import handle_file

    hint = client.predict(*_unit(handle_file(square), "canny", (100, 200)), api_name="/canny_preview")
    edges = np.asarray(Image.open(hint))
    assert edges.shape[:2] == (SIZE, SIZE) and edges.max() == 255 and edges.mean() < 60  # edges only
    gallery, status, files = client.predict(
        *_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values(), api_name="/canny_run"
    )
    assert len(gallery) == 2 and len(files) == 1  # the hint, then one picture
    png = Image.open(files[0])
    assert png.size == (SIZE, SIZE) and "a red square, best quality" in png.text["parameters"]
    assert "control_v11p_sd15_canny" in status and "seed 7" in status
    assert app_url[1].base_loads == 1


def test_scribble_canvas_shuffle_and_multi(client, square, tmp_path, app_url):
    from gradio_client import handle_file

    sketch = np.full((SIZE, SIZE, 3), 255, np.uint8)
    sketch[20:44, 30:34] = 0  # a black stroke on the white canvas
    Image.fromarray(sketch).save(tmp_path / "sketch.png")
    canvas = {
        "background": handle_file(str(tmp_path / "sketch.png")),
        "layers": [],
        "composite": handle_file(str(tmp_path / "sketch.png")),
    }
    hint = np.asarray(Image.open(client.predict(*_unit(canvas, "scribble_sketch"), api_name="/scribble_preview")))
    assert hint[30, 31].max() == 255 and hint[5, 5].max() == 0  # white stroke on black
    _, status, _ = client.predict(*_unit(canvas, "scribble_sketch"), *SETTINGS.values(), api_name="/scribble_run")
    assert "scribble" in status
    _, status, _ = client.predict(*_unit(handle_file(square), "shuffle"), *SETTINGS.values(), api_name="/shuffle_run")
    assert "shuffle" in status
    units = [True, "canny", handle_file(square), "canny", 1.0, 0.0, 1.0,
             True, "scribble", handle_file(str(tmp_path / "sketch.png")), "none", 0.5, 0.2, 0.8,
             False, "depth", None, "depth_midas", 1.0, 0.0, 1.0]  # fmt: skip
    gallery, status, files = client.predict(*units, *SETTINGS.values(), api_name="/multi_run")
    assert len(gallery) == 3 and "canny" in status and "scribble" in status
    assert app_url[1].base_loads == 1


def test_bad_inputs_get_clear_messages_and_the_server_keeps_going(client, square, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(Exception, match="(?i)image|read"):
        client.predict(
            *_unit(handle_file(str(tmp_path / "broken.png")), "canny", (100, 200)), api_name="/canny_preview"
        )
    with pytest.raises(Exception, match="(?i)draw something|empty"):
        blank = np.full((SIZE, SIZE, 3), 255, np.uint8)
        Image.fromarray(blank).save(tmp_path / "blank.png")
        canvas = {
            "background": handle_file(str(tmp_path / "blank.png")),
            "layers": [],
            "composite": handle_file(str(tmp_path / "blank.png")),
        }
        client.predict(*_unit(canvas, "scribble_sketch"), api_name="/scribble_preview")
    with pytest.raises(Exception, match="(?i)not on this machine|put them in"):
        client.predict(*_unit(handle_file(square), "none", (0.1, 0.1)), *SETTINGS.values(), api_name="/mlsd_run")
    bad = dict(SETTINGS, steps=0)
    with pytest.raises(Exception, match="(?i)steps|minimum"):
        client.predict(*_unit(handle_file(square), "canny", (100, 200)), *bad.values(), api_name="/canny_run")
    # and the next request works
    _, status, _ = client.predict(
        *_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values(), api_name="/canny_run"
    )
    assert "seed 7" in status
