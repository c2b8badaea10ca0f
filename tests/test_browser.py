"""A real browser (Debian's chromium, driven by playwright) against the real app with tiny weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOT = Path(__file__).parents[1] / "assets" / "screenshot.png"
EXAMPLE = Path(__file__).parents[1] / "assets" / "examples" / "house.png"


@pytest.fixture(scope="module")
def page(running_app):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(running_app[0])
        pg.get_by_text("ControlNet studio").first.wait_for()
        yield pg
        browser.close()


def _small_and_fast(page, key: str) -> None:
    page.locator(f"#{key}-settings").get_by_text("Settings").first.click()
    for name, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        box = page.locator(f"#{key}-{name} input[type=number]")
        box.fill(value)
        box.press("Enter")


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
    if os.environ.get("UPDATE_SCREENSHOT"):  # the README's picture of the app
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SCREENSHOT), full_page=True)


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
    _small_and_fast(page, "scribble")
    page.locator("#scribble-run").click()
    page.locator("#scribble-gallery img").nth(1).wait_for(timeout=120_000)
