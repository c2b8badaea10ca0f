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
    # an image prompt with an SD1.5 IP-Adapter on the SDXL base: refused before anything loads, both families named
    from gradio_client.exceptions import AppError

    rest = _rest()
    rest[-4] = hint  # the image prompt's picture; rest[-3] is the adapter ("ip-adapter_sd15")
    with pytest.raises(AppError, match="ip-adapter_sd15 is an IP-Adapter for SD1.5 and the base model is SDXL"):
        client.predict(*_unit(hint, "canny", (100, 200)), *SETTINGS.values(), *rest[:-1], "tiny-sdxl",
                       api_name="/canny_generate")  # fmt: skip
    status, again, _ = run(None)  # back to the demo base: the same picture as before, byte for byte
    assert manager.sd.family.name == "SD1.5" and np.array_equal(again, demo_picture)


def test_picking_an_sdxl_base_in_the_page_sets_its_size(family_app):
    """In a real browser: choosing the SDXL base in the list at the top sets the tabs' width and height to 1024 (and
    a toast says which family it is); choosing the first base again puts 512 back."""
    from playwright.sync_api import expect

    from tests.test_browser import CHROMIUM, FLAGS

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url = family_app[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.get_by_text("ControlNet studio").first.wait_for()
        width = page.locator("#canny-width input[type=number]")
        page.locator("#canny-settings").get_by_text("Settings").first.click()
        expect(width).to_have_value("512")

        def pick(name: str) -> None:
            page.locator("#base-model input").click()
            page.get_by_role("option", name=name).click()

        pick("tiny-sdxl")
        expect(width).to_have_value("1024", timeout=60_000)  # the handler waits its turn in a busy server's queue
        expect(page.locator("#canny-height input[type=number]")).to_have_value("1024")
        expect(page.get_by_text("SDXL base, pictures of 1024 x 1024 px").first).to_be_visible()
        pick("shapes_sd.safetensors")
        expect(width).to_have_value("512", timeout=60_000)
        browser.close()
