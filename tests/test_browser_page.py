"""The page as a user sees it in a real browser (Debian's chromium, driven by playwright) at 1400 x 1000, on the
shipped demo model: Generate in sight, the live previews in sight while sampling, Stop without an error, every tab
in a tab bar, the resolution slider greyed out under pixel perfect."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_browser import _open, browser  # noqa: F401 (the module's chromium)

EXAMPLE = Path(__file__).parents[1] / "assets" / "examples" / "shapes.png"
VIEWPORT = {"width": 1400, "height": 1000}
LONG_RUN = "150"  # steps: the most a tab takes, long enough to look at a run on the demo model


@pytest.fixture
def page(browser, demo_app):  # noqa: F811 (the fixture imported above)
    pg = _open(browser, demo_app[0])
    yield pg
    pg.close()


def _type_number(page, key: str, name: str, value: str) -> None:
    """A number typed into the tab's Settings (opened first), again until the page holds it (a value typed while the
    accordion opens can be lost)."""
    from playwright.sync_api import expect

    page.locator(f"#{key}-settings").get_by_text("Settings").first.click()
    box = page.locator(f"#{key}-{name} input[type=number]")
    for attempt in range(3):
        box.fill(value)
        box.press("Enter")
        try:
            expect(box).to_have_value(value, timeout=2_000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def _start_long_run(page) -> None:
    """The Canny tab's example picture and a 150-step run (a live preview every 5 steps, the page's default)."""
    page.locator("#canny-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#canny-prompt textarea").fill("a blue circle and a yellow star on a pink background")
    _type_number(page, "canny", "steps", LONG_RUN)
    page.locator("#canny-run").click()


def _no_error_shown(page) -> None:
    assert page.locator(".toast-body.error").count() == 0, "an error toast"
    assert page.get_by_text("Error", exact=True).count() == 0, "an Error badge or toast title"


def test_generate_and_stop_are_in_sight_without_scrolling(page):
    """Issue 27: Generate sat at y 1,694 px, below the fold of a 1000 px window. Now it opens the right column of
    every tab, as in A1111."""
    for tab, key in (("ControlNet", "canny"), ("Multi", "multi"), ("Image prompt", "image_prompt"), ("Batch", "batch")):
        page.get_by_role("tab", name=tab, exact=True).click()
        for button in ("run", "stop"):
            page.locator(f"#{key}-{button}").wait_for()
            box = page.locator(f"#{key}-{button}").bounding_box()
            assert page.evaluate("window.scrollY") == 0
            assert 0 <= box["y"] and box["y"] + box["height"] <= VIEWPORT["height"], (key, button, box)
            assert 0 <= box["x"] and box["x"] + box["width"] <= VIEWPORT["width"], (key, button, box)


def test_every_tab_is_in_a_tab_bar(page):
    """No tab in an overflow menu: five tabs on top, the conditions' tabs (wrapping) inside the ControlNet tab."""
    from cldm.hints.conditions import CONDITIONS

    for name in ("ControlNet", "Multi", "Image prompt", "Batch", "PNG info", *(c.label for c in CONDITIONS)):
        assert page.get_by_role("tab", name=name, exact=True).is_visible(), name
    assert page.locator(".overflow-menu:visible").count() == 0


def test_a_live_preview_is_in_sight_while_sampling(page):
    """Issue 27: Gradio's progress overlay covered the gallery for the whole run, so the live previews were never seen.
    Now the progress is on the status line above the gallery, and the gallery's centre is the preview picture."""
    _start_long_run(page)
    gallery = page.locator("#canny-gallery")
    gallery.locator("img").first.wait_for(timeout=120_000)
    status = page.locator("#canny-status")
    assert "seed" not in status.inner_text(), "the run ended before its preview was looked at"
    assert gallery.get_by_text("preview").count() >= 1  # the live preview, not a result
    box = gallery.bounding_box()
    on_top = page.evaluate(
        """([x, y]) => { const e = document.elementFromPoint(x, y);
                         return {tag: e.tagName, inGallery: !!e.closest('#canny-gallery')}; }""",
        [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2],
    )
    assert on_top == {"tag": "IMG", "inGallery": True}, on_top
    assert re.search(r"sampling \d+/150", status.inner_text()), status.inner_text()  # the progress, beside it
    page.locator("#canny-stop").click()  # (the next test looks at Stop)
    status.get_by_text("Stopped").wait_for(timeout=60_000)


def test_stop_ends_the_run_quietly(page):
    """Issue 27: Stop looked like a crash (a red Error toast, Error badges on the results, the status left on
    "Sampling..."). Now the status line says where it stopped, and nothing says Error."""
    _start_long_run(page)
    status = page.locator("#canny-status")
    status.get_by_text(re.compile(r"sampling \d+/150")).wait_for(timeout=120_000)
    page.locator("#canny-stop").click()
    status.get_by_text("Stopped").wait_for(timeout=60_000)
    said = status.inner_text().strip()
    step = re.fullmatch(r"Stopped at step (\d+) of 150; nothing saved\.", said)
    assert step is not None and int(step[1]) < 150, said
    page.wait_for_timeout(500)  # an error would show with the run's last message
    _no_error_shown(page)


def test_the_resolution_slider_follows_pixel_perfect(page):
    """Pixel perfect sets the preprocessor resolution from the picture: the slider is greyed out while it is on."""
    tab = page.locator("[id^=canny-tab]")
    resolution = tab.get_by_label("Preprocessor resolution").first
    assert resolution.is_disabled()
    tab.get_by_label("Pixel perfect").uncheck()
    page.wait_for_function("e => !e.disabled", arg=resolution.element_handle())
    tab.get_by_label("Pixel perfect").check()
    page.wait_for_function("e => e.disabled", arg=resolution.element_handle())
