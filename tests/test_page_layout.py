"""The page's layout as the browser gets it (the built Blocks' config; no server, no model): every tab in a tab bar,
progress beside the gallery, the denoising slider beside its picture, one steps limit, tab names in "Send to"."""

from __future__ import annotations

import pytest
import torch

from cldm.hints.conditions import CONDITIONS


@pytest.fixture(scope="module")
def page_config(tmp_path_factory) -> dict:
    from studio import page
    from studio.service import Studio

    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()  # no model is needed to lay out
    return page.build_app(Studio(manager, None, str(tmp_path_factory.mktemp("out")))).config


class Layout:
    """The config's components by id and by elem_id, and each one's parent in the layout tree."""

    def __init__(self, config: dict):
        self.by_id = {c["id"]: c for c in config["components"]}
        self.by_elem = {c["props"]["elem_id"]: c for c in config["components"] if c["props"].get("elem_id")}
        self.parent: dict[int, int] = {}
        self.children: dict[int, list[int]] = {}
        stack = [config["layout"]]
        while stack:
            node = stack.pop()
            kids = [k["id"] for k in node.get("children", [])]
            self.children[node["id"]] = kids
            self.parent.update((k, node["id"]) for k in kids)
            stack += node.get("children", [])

    def ancestors(self, elem_id: str) -> list[str]:
        """The elem_ids of the blocks around `elem_id`, innermost first (blocks with none are left out)."""
        out, at = [], self.by_elem[elem_id]["id"]
        while at in self.parent:
            at = self.parent[at]
            if at in self.by_id and self.by_id[at]["props"].get("elem_id"):
                out.append(self.by_id[at]["props"]["elem_id"])
        return out

    def tab_labels(self, elem_id: str) -> list[str]:
        return [self.by_id[k]["props"]["label"] for k in self.children[self.by_elem[elem_id]["id"]]]


@pytest.fixture(scope="module")
def layout(page_config) -> Layout:
    return Layout(page_config)


def test_no_tab_is_hidden_in_an_overflow_menu(layout):
    """Five tabs on top, the conditions' tabs inside the ControlNet one; both bars wrap rather than hide tabs."""
    assert layout.tab_labels("tabs") == ["ControlNet", "Multi", "Image prompt", "Batch", "PNG info"]
    assert layout.tab_labels("condition-tabs") == [c.label for c in CONDITIONS]  # a tab per condition stays
    assert "tabs" in layout.ancestors("condition-tabs")
    for bar in ("tabs", "condition-tabs"):
        assert layout.by_elem[bar]["props"]["overflow_behavior"] == "wrap"


@pytest.mark.parametrize("key", [*(c.key for c in CONDITIONS), "multi", "image_prompt", "batch"])
def test_progress_shows_on_the_status_line_not_over_the_gallery(page_config, layout, key):
    """Generate's progress bar covers the status line only: the live previews in the gallery stay in sight. Generate,
    Stop, the status line and the gallery open the right column, in that order."""
    api = "batch_run" if key == "batch" else f"{key}_generate"
    (generate,) = [d for d in page_config["dependencies"] if d["api_name"] == api]
    status, gallery = layout.by_elem[f"{key}-status"]["id"], layout.by_elem[f"{key}-gallery"]["id"]
    assert generate["show_progress_on"] == [status] and generate["show_progress"] == "full"
    assert gallery in generate["outputs"] and gallery not in generate["show_progress_on"]
    column = layout.parent[status]
    buttons = layout.parent[layout.by_elem[f"{key}-run"]["id"]]
    assert layout.parent[layout.by_elem[f"{key}-stop"]["id"]] == buttons
    assert layout.children[column][:3] == [buttons, status, gallery]


def test_denoising_sits_beside_the_picture_it_applies_to(layout):
    """Beside the init picture on a text-to-image tab (in the img2img accordion, not in Settings); under the tab's own
    picture where that is the init picture (tile, inpaint)."""
    for key in ("canny", "scribble", "multi", "image_prompt"):
        around = layout.ancestors(f"{key}-denoise")
        assert f"{key}-pass" in around and f"{key}-settings" not in around, (key, around)
        init = layout.by_elem[f"{key}-init"]["id"]
        siblings = layout.children[layout.parent[init]]
        after = siblings[siblings.index(init) + 1]  # the block right after the init picture holds the slider
        assert layout.by_elem[f"{key}-denoise"]["id"] in (after, *layout.children[after])
    for key in ("tile", "inpaint"):
        around = layout.ancestors(f"{key}-denoise")
        assert f"{key}-pass" not in around and f"{key}-settings" not in around, (key, around)
        column = layout.parent[layout.by_elem[f"{key}-image"]["id"]]
        denoise = layout.by_elem[f"{key}-denoise"]["id"]
        assert denoise in layout.children[column] or layout.parent[denoise] in layout.children[column]


def test_the_resolution_slider_starts_greyed_out_under_pixel_perfect(layout):
    sliders = [c for c in layout.by_id.values() if c["props"].get("label") == "Preprocessor resolution"]
    perfect = [c for c in layout.by_id.values() if str(c["props"].get("label")).startswith("Pixel perfect")]
    assert len(sliders) == len(perfect) == len(CONDITIONS) + 3  # each tab's unit and Multi's three
    assert all(p["props"]["value"] is True for p in perfect)
    assert all(s["props"]["interactive"] is False for s in sliders)


def test_one_steps_limit_everywhere(layout):
    from studio.settings import MAX_UI_STEPS

    steps = [c for c in layout.by_id.values() if c["props"].get("label") == "Steps"]
    assert len(steps) == len(CONDITIONS) + 3  # each tab's, Multi's, Image prompt's and the Batch tab's
    assert {(s["props"]["minimum"], s["props"]["maximum"]) for s in steps} == {(1, MAX_UI_STEPS)}


def test_send_to_and_multi_list_tab_names_not_keys(layout):
    target = layout.by_elem["png_info-target"]["props"]["choices"]
    assert [tuple(c) for c in target] == [*((c.label, c.key) for c in CONDITIONS), ("Multi", "multi")]
    conditions = [
        c for c in layout.by_id.values() if c["props"].get("label") == "Condition" and c["type"] == "dropdown"
    ]
    multi = [c for c in conditions if tuple(c["props"]["choices"][0]) == ("Canny", "canny")]
    assert len(multi) >= 3  # Multi's three units (and the Batch tab's)
