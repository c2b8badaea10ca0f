"""A real browser (Debian's chromium, driven by playwright) against the real app with tiny weights."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOT = Path(__file__).parents[1] / "assets" / "screenshot.png"
EXAMPLE = Path(__file__).parents[1] / "assets" / "examples" / "house.png"


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module (playwright's sync API allows one instance per thread)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def _open(browser, url: str):
    """A page on `url`, once the app has rendered."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(60_000)
    pg.goto(url)
    pg.get_by_text("ControlNet studio").first.wait_for()
    return pg


@pytest.fixture(scope="module")
def page(browser, running_app):
    pg = _open(browser, running_app[0])
    yield pg
    pg.close()


def _picture(page, img) -> np.ndarray:
    """The RGB pixels an <img> on the page shows, fetched as the browser fetched them."""
    body = page.request.get(img.get_attribute("src")).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def _small_and_fast(page, key: str) -> None:
    """64 x 64 px, 2 steps in the tab's Settings; each number is typed again until the page holds it (a value typed
    while the accordion is still opening can be lost, and the picture is then 512 px wide)."""
    from playwright.sync_api import expect

    page.locator(f"#{key}-settings").get_by_text("Settings").first.click()
    for name, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        box = page.locator(f"#{key}-{name} input[type=number]")
        for attempt in range(3):
            box.fill(value)
            box.press("Enter")
            try:
                expect(box).to_have_value(value, timeout=2_000)
                break
            except AssertionError:
                if attempt == 2:
                    raise
    for name, value in (("width", "64"), ("height", "64"), ("steps", "2")):  # none undone by a later one
        expect(page.locator(f"#{key}-{name} input[type=number]")).to_have_value(value)


def test_browser_canny_upload_preview_generate(page):
    page.locator("#canny-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#canny-preview").click()
    page.locator("#canny-hint img").wait_for()
    _small_and_fast(page, "canny")
    page.locator("#canny-prompt textarea").fill("a cozy cottage in a meadow")
    page.locator("#canny-run").click()
    page.locator("#canny-gallery img").nth(1).wait_for(timeout=120_000)  # the hint and one picture
    assert page.locator("#canny-gallery img").count() >= 2
    page.locator("#canny-status").get_by_text("seed").wait_for()


def test_browser_switch_tab_draw_on_sketch_canvas(page):
    page.get_by_role("tab", name="Scribble").click()
    canvas = page.locator("#scribble-image canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 20):
        page.mouse.move(x0 + i * box["width"] * 0.02, y0 + i * box["height"] * 0.02)
    page.mouse.up()
    page.locator("#scribble-preview").click()
    # a blank canvas would give "The sketch is empty" instead of a hint
    page.locator("#scribble-hint img").wait_for()
    strokes = _picture(page, page.locator("#scribble-hint img")).max(axis=2) > 127  # white strokes on black
    assert 0 < strokes.mean() < 0.2, strokes.mean()  # a stroke, not an empty or a filled picture
    ys, xs = np.nonzero(strokes)
    assert np.corrcoef(xs, ys)[0, 1] > 0.9  # the line drawn from top left to bottom right, where it was drawn
    _small_and_fast(page, "scribble")
    page.locator("#scribble-run").click()
    page.locator("#scribble-status").get_by_text("seed").wait_for(timeout=120_000)
    gallery = page.locator("#scribble-gallery img")
    assert gallery.count() == 2  # the hint the model saw, then the one picture asked for
    hint, picture = _picture(page, gallery.nth(0)), _picture(page, gallery.nth(1))
    assert hint.shape == picture.shape == (64, 64, 3)  # the size set in Settings
    assert np.corrcoef(*np.nonzero(hint.max(axis=2) > 127))[0, 1] > 0.9  # the same stroke, fitted to 64 px
    assert picture.std() > 0  # a picture, not a blank


# ------------------------------------------------------------------------------------ the demo model, for real
@pytest.fixture(scope="module")
def demo_page(browser, demo_app):
    pg = _open(browser, demo_app[0])
    yield pg
    pg.close()


def test_browser_sketch_a_triangle_get_a_green_triangle(demo_page):
    """The issue's promise: on a fresh machine, draw a triangle, ask for a green one on white, get it."""
    from cldm.training.demo_eval import closed_outline_regions, nearest_colour

    page = demo_page
    page.get_by_role("tab", name="Scribble").click()
    canvas = page.locator("#scribble-image canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    # the picture is a square in the middle of the canvas element (which is wider): draw around the centre
    cx, cy, unit = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 0.6 * min(box["width"], box["height"])
    corners = [(0, -0.5), (0.5, 0.4), (-0.5, 0.4), (0, -0.5)]
    at = [(cx + dx * unit, cy + dy * unit) for dx, dy in corners]
    page.mouse.move(*at[0], steps=5)  # arrive first: the stroke must not start where the pointer was before
    page.wait_for_timeout(200)
    page.mouse.down()
    for (x0, y0), (x1, y1) in zip(at, at[1:]):
        for i in range(1, 21):
            page.mouse.move(x0 + (x1 - x0) * i / 20, y0 + (y1 - y0) * i / 20)
    page.mouse.up()
    page.locator("#scribble-prompt textarea").fill("a green triangle on a white background")
    page.locator("#scribble-settings").get_by_text("Settings").first.click()
    page.locator("#scribble-settings").get_by_label("Randomize seed").uncheck()  # the default seed, every time
    page.locator("#scribble-run").click()
    gallery = page.locator("#scribble-gallery img")
    # live previews come first (one small picture each); the status line names the seed once the result is there
    page.locator("#scribble-status").get_by_text("seed").wait_for(timeout=120_000)
    gallery.nth(1).wait_for(timeout=120_000)  # the hint, then the picture

    def fetch(i: int) -> np.ndarray:
        body = page.request.get(gallery.nth(i).get_attribute("src")).body()
        return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))

    hint, picture = fetch(0), fetch(1)
    assert hint.shape == picture.shape == (64, 64, 3)
    inside, outside = closed_outline_regions(hint)
    assert inside.sum() > 100 and outside.sum() > 300, "the drawn triangle must come through as a closed outline"
    # the strokes reach the model as wide as the demo scribbles it was trained on (2 px at 64 px)
    strokes = hint.max(axis=2) > 127
    base_width = strokes[36:, 24:40].sum(axis=0)  # the middle columns cross the triangle's base once below the centre
    assert base_width.max() <= 3, base_width
    # the same named-colour test as `demo-eval`'s sketched triangle
    inside_colour = nearest_colour(np.median(picture[inside], axis=0))
    outside_colour = nearest_colour(np.median(picture[outside], axis=0))
    assert (inside_colour, outside_colour) == ("green", "white"), np.median(picture[inside], axis=0)
    if os.environ.get("UPDATE_SCREENSHOT"):  # the README's picture of the app: what a user of the demo model sees
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_browser_image_prompt_tab_on_the_demo_model(demo_page, tmp_path):
    """Drop a picture (a red circle on blue) into the Image prompt tab, no text, strength 1: the demo IP-Adapter
    paints the result's background in the picture's colour (92% of pictures at strength 1, docs/demo-model.md)."""
    from playwright.sync_api import expect

    picture = np.zeros((64, 64, 3), np.uint8)
    picture[:] = (40, 90, 220)  # blue
    yy, xx = np.mgrid[:64, :64]
    picture[(yy - 32) ** 2 + (xx - 32) ** 2 < 15**2] = (220, 40, 40)  # red
    Image.fromarray(picture).save(tmp_path / "style.png")
    page = demo_page
    page.get_by_role("tab", name="Image prompt", exact=True).click()
    page.locator("#image_prompt-ip-image input[type=file]").set_input_files(str(tmp_path / "style.png"))
    strength = page.locator("#image_prompt-ip-scale input[type=number]")  # 1: the measured figure's scale
    strength.fill("1")
    strength.press("Enter")
    expect(strength).to_have_value("1")
    page.locator("#image_prompt-settings").get_by_text("Settings").first.click()
    page.locator("#image_prompt-settings").get_by_label("Randomize seed").uncheck()
    page.locator("#image_prompt-run").click()
    gallery = page.locator("#image_prompt-gallery img")
    gallery.first.wait_for(timeout=120_000)
    page.locator("#image_prompt-status").get_by_text("IP-Adapter").wait_for()
    body = page.request.get(gallery.first.get_attribute("src")).body()
    result = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    border = np.concatenate([result[:3].reshape(-1, 3), result[-3:].reshape(-1, 3)])
    r, g, b = np.median(border, axis=0)
    assert b > r + 80 and b > g + 80, (r, g, b)  # blue dominates (v2 gives a purplish blue here: 98, 67, 202)


def test_browser_logs_in_through_the_gate(browser, tmp_path):
    """Under --auth a browser first sees the login page (nothing of the app), a wrong password says so, the right
    one opens the app; the page's files and API answer only after the login."""
    import socket

    import torch

    from studio import launch, page
    from studio.service import Studio

    # no model is needed to check the door
    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    blocks = page.build_app(Studio(manager, None, str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch.serve(blocks, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
              auth=[("ana", "s3cret")])  # fmt: skip
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(60_000)
    try:
        url = f"http://127.0.0.1:{port}/"
        pg.goto(url)
        assert "canny" not in pg.content().lower()
        assert pg.request.get(url + "config").status == 401
        pg.get_by_label("User name").fill("ana")
        pg.get_by_label("Password").fill("wrong")
        pg.get_by_role("button", name="Log in").click()
        pg.get_by_text("Wrong user name or password.").wait_for()
        pg.get_by_label("Password").fill("s3cret")
        pg.get_by_role("button", name="Log in").click()
        pg.get_by_role("tab", name="Canny").wait_for()  # the app itself, built from the condition table
        assert pg.request.get(url + "config").status == 200
    finally:
        pg.close()
        blocks.close()
