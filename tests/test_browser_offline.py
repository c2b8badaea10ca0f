"""Offline in a real browser: the demo app (HF_HUB_OFFLINE=1, as conftest sets it) greys the tabs that cannot run,
says in one line which file to get, and answers anything asked of such a tab at once, never after a hub lookup."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_browser import _open, browser  # noqa: F401 (the module's chromium fixture)

EXAMPLES = Path(__file__).parents[1] / "assets" / "examples"
AT_ONCE = 2.0  # seconds: what "at once" means here (the Depth preview took 43 s, seg_ade20k 24 s)


@pytest.fixture(scope="module")
def offline_page(browser, demo_app):  # noqa: F811 (the fixture imported above)
    pg = _open(browser, demo_app[0])
    yield pg
    pg.close()


def test_a_dead_tab_is_greyed_and_answers_at_once(offline_page, demo_app):
    from playwright.sync_api import expect

    page = offline_page
    depth = page.get_by_role("tab", name="Depth", exact=True)
    t0 = time.perf_counter()
    depth.click()
    note = page.locator("#depth-note")
    expect(note).to_contain_text("control_v11f1p_sd15_depth.pth", timeout=AT_ONCE * 1000)
    expect(page.locator("#depth-preview")).to_be_disabled(timeout=AT_ONCE * 1000)
    expect(page.locator("#depth-run")).to_be_disabled(timeout=AT_ONCE * 1000)
    assert time.perf_counter() - t0 < AT_ONCE
    assert note.inner_text().strip().count("\n") == 0  # one line
    # greyed: its name in the tab bar, and its widgets (not its note)
    opacity = "e => parseFloat(getComputedStyle(e).opacity)"
    assert depth.evaluate(opacity) < 0.6
    assert page.get_by_role("tab", name="Canny", exact=True).evaluate(opacity) == 1.0
    assert page.locator("#depth-run").evaluate("e => getComputedStyle(e.closest('.block') || e).filter") != "none"
    # a click on its buttons starts nothing
    for button in ("#depth-preview", "#depth-run"):
        page.locator(button).click(force=True)
    page.wait_for_timeout(500)
    assert page.locator("#depth-status").inner_text().strip() == ""
    assert page.locator("#depth-hint img").count() == 0


def test_the_api_of_a_dead_tab_answers_at_once(demo_app, tmp_path):
    """The same tab through the API (the buttons are off in the page): its Generate is refused with the reason at
    once, and its preprocessor, whose weights are not here, says which file to get, with no hub lookup."""
    from gradio_client import Client, handle_file

    client = Client(demo_app[0], verbose=False)
    picture = handle_file(str(EXAMPLES / "house.png"))
    calls = {
        "/depth_generate": ("only has ControlNets for", dict(prompt="a house", init_image=None, image_prompt=None)),
        "/depth_hint": ("dpt_hybrid-midas-501f0c75.pt", {}),
        "/seg_hint": ("openmmlab/upernet-convnext-small", {}),  # a tab that runs, asked for seg_ade20k
    }
    for api, (said, nulls) in calls.items():
        preprocessor = "seg_ade20k" if api == "/seg_hint" else "depth_midas"
        t0 = time.perf_counter()
        with pytest.raises(Exception, match=said):
            client.predict(image=picture, preprocessor=preprocessor, api_name=api, **nulls)
        assert time.perf_counter() - t0 < AT_ONCE, api


def test_every_default_runs_offline_in_the_page(offline_page):
    """The tabs that run start on preprocessors that run here (the model card's examples: Segmentation on "none",
    its example being a seg map), and the Multi tab's units on conditions of the demo model."""
    from playwright.sync_api import expect

    from cldm.hints.conditions import CONDITIONS
    from cldm.io.model_card import card_for
    from studio.availability import DEMO_BASE, DEMO_DIR, tab_states

    card = card_for(DEMO_DIR / DEMO_BASE)
    states = tab_states(card, str(DEMO_DIR), offline=True)
    assert states["seg"].preprocessor == "none"
    page = offline_page
    page.get_by_role("tab", name="Segmentation", exact=True).click()
    seg = page.locator("#seg-tab")
    expect(seg.get_by_role("combobox", name="Preprocessor", exact=True)).to_have_value("none")
    expect(page.locator("#seg-run")).to_be_enabled()
    assert page.locator("#seg-note").count() == 0  # nothing missing: no note
    page.get_by_role("tab", name="Multi", exact=True).click()
    shown = "input[role=combobox][aria-label='{}']:visible"
    conditions, preprocessors = page.locator(shown.format("Condition")), page.locator(shown.format("Preprocessor"))
    expect(conditions).to_have_count(3)
    by_label = {c.label: c.key for c in CONDITIONS}
    for i in range(3):
        label = conditions.nth(i).input_value()
        key = by_label.get(label, label)  # the page shows the condition's name
        assert key in card.conditions and states[key].ready, label
        expect(preprocessors.nth(i)).to_have_value(states[key].preprocessor)
