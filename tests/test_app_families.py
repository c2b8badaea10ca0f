"""The app across families: the demo base (SD1.5), then an SDXL base with an SDXL ControlNet, then back, on one
server, through its HTTP API (gradio_client), as a user picks the base at the top of the page."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import tiny_families as tf
from tests.conftest import DEMO_DIR, _free_port
from tests.test_app import _rest, _unit

SIZE = 64
SETTINGS = dict(prompt="a red circle", added_prompt="", negative_prompt="", batch=1, width=SIZE, height=SIZE,
                steps=3, cfg=5.0, sampler="euler_a", seed=11, randomize=False, denoise=0.75)  # fmt: skip


@pytest.fixture(scope="module")
def family_app(tmp_path_factory):
    """The app started on the demo base (no demo card: every base of the models folder is offered), with a tiny
    SDXL base (diffusers folder) in models/checkpoints/ and the SDXL canny ControlNet where the tab looks for it."""
    from cldm.runtime.manager import ModelManager
    from studio import launch, page, service

    models = tmp_path_factory.mktemp("models")
    shutil.copy(DEMO_DIR / "control_v11p_sd15_canny.safetensors", models)
    built = tmp_path_factory.mktemp("sdxl")
    pipe = tf.make_sdxl_pipeline(built)
    (models / "checkpoints").mkdir()
    shutil.copytree(pipe, models / "checkpoints" / "tiny-sdxl")
    shutil.copytree(tf.make_sdxl_controlnet(built, pipe, seed=1), models / "controlnet-canny-sdxl-1.0")
    manager = ModelManager(str(DEMO_DIR / "shapes_sd.safetensors"), device="cpu", dtype="fp32")
    studio = service.Studio(manager, str(models), str(tmp_path_factory.mktemp("out")))
    demo = page.build_app(studio)
    demo.queue(max_size=8)
    port = _free_port()
    launch.serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                 allowed_paths=[str(studio.out_dir)])  # fmt: skip
    yield f"http://127.0.0.1:{port}/", manager, studio
    demo.close()


def _circle(path: Path) -> str:
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img[(yy - 32) ** 2 + (xx - 30) ** 2 < 18**2] = (40, 40, 200)
    Image.fromarray(img).save(path)
    return str(path)


def test_switch_to_sdxl_and_back(family_app, tmp_path):
    from gradio_client import Client, handle_file

    url, manager, studio = family_app
    client = Client(url, verbose=False)
    hint = handle_file(_circle(tmp_path / "circle.png"))
    assert "tiny-sdxl" in studio.bases
    # picking the SDXL base in the page's list sets the tabs' sizes to its native size (the family's, from its files)
    assert studio.native_size("tiny-sdxl") == 1024 and studio.native_size(None) == 512

    def run(base):
        _, status, files = client.predict(*_unit(hint, "canny", (100, 200)), *SETTINGS.values(),
                                          *_rest()[:-1], base, api_name="/canny_generate")  # fmt: skip
        return status, np.asarray(Image.open(files[0])), Image.open(files[0]).text["parameters"]

    status, demo_picture, _ = run(None)
    assert "control_v11p_sd15_canny" in status and manager.sd.family.name == "SD1.5"
    status, sdxl_picture, text = run("tiny-sdxl")
    # the SDXL base is loaded in place of the demo's, and the canny tab took the SDXL canny ControlNet
    assert manager.sd.family.name == "SDXL" and "controlnet-canny-sdxl-1.0" in status
    assert sdxl_picture.shape == (SIZE, SIZE, 3) and "Model: tiny-sdxl" in text
    assert manager.base_loads == 2
    status, again, _ = run(None)  # back to the demo base: the same picture as before, byte for byte
    assert manager.sd.family.name == "SD1.5" and np.array_equal(again, demo_picture)
