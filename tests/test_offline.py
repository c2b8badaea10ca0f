"""Offline mode: detected once at start-up, every later weight lookup local-only and answered at once, and each
condition tab's state (can it run, the preprocessor and example it starts on, its one-line note) decided from what
is on this machine. No test here touches the network: the probe is replaced, and sockets refuse to connect."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import annotators
from annotators import MissingAnnotatorWeights
from cldm.errors import InputError, MissingWeightsError
from cldm.hints.conditions import BY_KEY, CONDITIONS, EXAMPLES_DIR
from cldm.io import locate
from cldm.io.images import load_rgb
from cldm.io.model_card import card_for
from studio.availability import DEMO_BASE, DEMO_DIR, HINT_EXAMPLES, ready_first, tab_state, tab_states
from studio.service import Studio, UnitSettings


@pytest.fixture
def hub_constants(monkeypatch):
    """huggingface_hub as a process finds it at start-up: imported, with HF_HUB_OFFLINE unset."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


@pytest.fixture
def no_network(monkeypatch, tmp_path, hub_constants):
    """Offline as `detect_offline` leaves a process whose hub did not answer, with an empty hub cache; any attempt to
    open a connection is recorded and refused."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("the network is not there in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert locate.detect_offline(lambda: False)
    return tried


# ------------------------------------------------------------------------------------------ start-up detection
def test_offline_is_detected_once_and_kept_for_the_process(monkeypatch, hub_constants):
    probes = []

    def probe(answer):
        return lambda: probes.append(answer) or answer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate.detect_offline(probe(True)) is True and probes == []  # set by the user: nothing is probed
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert locate.detect_offline(probe(True)) is False and not locate.offline()  # the hub answered
    assert not hub_constants.HF_HUB_OFFLINE
    assert locate.detect_offline(probe(False)) is True  # it did not: offline from now on, for every lookup
    assert probes == [True, False]
    assert locate.offline() and annotators.weights.hub_is_offline()
    assert hub_constants.is_offline_mode()  # huggingface_hub's own requests too, though it was imported before
    assert locate.detect_offline(probe(True)) is True and probes == [True, False]  # decided: not probed again


def test_the_probe_waits_at_most_its_time_out(monkeypatch):
    """A hub that never answers (a DNS or a firewall that swallows packets) costs the probe's time-out, no more."""

    def hang(request, timeout):
        time.sleep(5)
        raise TimeoutError("no answer")

    monkeypatch.setattr(locate.urllib.request, "urlopen", hang)
    t0 = time.perf_counter()
    assert locate.hub_reachable(timeout=0.3) is False
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(("code", "up"), [(404, True), (403, True), (503, False)])
def test_the_probe_counts_any_answer_but_a_server_error(monkeypatch, code, up):
    def answer(request, timeout):
        raise urllib.error.HTTPError(request.full_url, code, "answer", {}, None)

    monkeypatch.setattr(locate.urllib.request, "urlopen", answer)
    assert locate.hub_reachable(timeout=1.0) is up


def test_the_probe_says_unreachable_without_a_network(no_network):
    assert locate.hub_reachable(timeout=1.0) is False
    assert no_network  # it tried: the refusal is what the tests below would see


# ------------------------------------------------------------------------------ lookups after offline was found
def test_missing_preprocessor_weights_fail_at_once_without_the_network(no_network, tmp_path):
    picture = np.full((64, 64, 3), 200, np.uint8)
    for name, file in (("depth_midas", "dpt_hybrid-midas-501f0c75.pt"), ("seg_ade20k", "upernet-convnext-small")):
        t0 = time.perf_counter()
        with pytest.raises(MissingAnnotatorWeights) as info:
            annotators.run(name, picture, resolution=64, models_dir=tmp_path / "models")
        assert time.perf_counter() - t0 < 2.0, name
        message = str(info.value)
        assert file in message and str(tmp_path / "models" / "annotators") in message
        assert "works offline" in message and "hub lookup" not in message  # the cache was all it looked in
    assert no_network == []


def test_a_missing_controlnet_fails_at_once_without_the_network(no_network, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="works offline, so nothing is downloaded"):
        locate.locate_controlnet("control_v11f1p_sd15_depth", "lllyasviel/control_v11f1p_sd15_depth", tmp_path)
    assert time.perf_counter() - t0 < 2.0 and no_network == []


def test_missing_weights_are_listed_without_the_network(no_network, tmp_path):
    models = tmp_path / "models"
    assert [f.filename for f in annotators.missing_weights("openpose_hand", models)] == [
        "body_pose_model.pth",
        "hand_pose_model.pth",
    ]
    (models / "annotators").mkdir(parents=True)
    (models / "annotators" / "body_pose_model.pth").write_bytes(b"")
    assert [f.filename for f in annotators.missing_weights("openpose_hand", models)] == ["hand_pose_model.pth"]
    assert annotators.missing_weights("canny", models) == ()
    assert no_network == []


# ---------------------------------------------------------------------------------------- each tab's decision
def _controlnets(folder: Path, keys) -> Path:
    """A models folder with (empty) ControlNet files of `keys`: the decision only looks for them."""
    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (folder / BY_KEY[key].model_file).write_bytes(b"")
    return folder


def test_offline_tab_without_its_controlnet_is_off_with_one_line(no_network, tmp_path):
    models = _controlnets(tmp_path / "models", ["canny"])
    state = tab_state(BY_KEY["depth"], None, str(models), offline=True)
    assert not state.ready
    assert "control_v11f1p_sd15_depth.pth" in state.note and f"{models}/" in state.note
    assert "\n" not in state.note  # one line
    assert tab_state(BY_KEY["canny"], None, str(models), offline=True) == tab_state(
        BY_KEY["canny"], None, str(models), offline=False
    )  # canny has all it needs: offline changes nothing
    online = tab_state(BY_KEY["depth"], None, str(models), offline=False)
    assert online.ready and online.note == "" and online.preprocessor == "depth_midas"  # it can be downloaded
    assert no_network == []


def test_a_controlnet_in_the_hub_cache_counts(no_network, tmp_path):
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--lllyasviel--control_v11p_sd15_mlsd" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    (snapshot / "config.json").write_text("{}")
    assert not tab_state(BY_KEY["mlsd"], None, str(tmp_path), offline=True).ready  # half a download is not one
    (snapshot / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert tab_state(BY_KEY["mlsd"], None, str(tmp_path), offline=True).ready


def test_seg_starts_on_a_map_when_its_preprocessor_cannot_run(no_network, tmp_path):
    """The issue's Segmentation default (seg_ade20k, 24 s then an error offline): with its ControlNet but without
    UperNet, the tab starts on "none" with an example picture that already is a seg map."""
    models = _controlnets(tmp_path / "models", ["seg", "depth"])
    seg = tab_state(BY_KEY["seg"], None, str(models), offline=True)
    assert seg.ready and seg.preprocessor == "none"
    assert seg.example == ("shapes_seg.png", "none", HINT_EXAMPLES["seg"][1])
    assert str(models / "annotators" / "upernet-convnext-small") in seg.note and "\n" not in seg.note
    depth = tab_state(BY_KEY["depth"], None, str(models), offline=True)
    assert depth.ready and depth.preprocessor == "none" and depth.example is None  # no depth map to show
    assert "dpt_hybrid-midas-501f0c75.pt" in depth.note
    (models / "annotators").mkdir()
    (models / "annotators" / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"")
    depth = tab_state(BY_KEY["depth"], None, str(models), offline=True)
    assert depth.preprocessor == "depth_midas" and depth.note == "" and depth.example is not None


def test_demo_mode_follows_the_model_card(no_network, tmp_path):
    """Only the card's conditions run (read from the card: a card with tile has a Tile tab that runs), each tab
    starts on its card example's preprocessor, and a card condition whose file is missing says which file."""
    card = json.loads((DEMO_DIR / "model_card.json").read_text())
    card["conditions"] = ["seg", "tile", "shuffle"]
    card["examples"] = {"seg": card["examples"]["seg"]}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    (tmp_path / DEMO_BASE).write_bytes(b"")
    for key in ("seg", "tile"):
        (tmp_path / f"{BY_KEY[key].stem}.safetensors").write_bytes(b"")
    states = tab_states(card_for(tmp_path / DEMO_BASE), str(tmp_path), offline=False)
    assert [k for k, s in states.items() if s.ready] == ["seg", "tile"]
    assert states["seg"].preprocessor == "none" and states["seg"].example[0] == "shapes_seg.png"
    assert "control_v11e_sd15_shuffle.safetensors" in states["shuffle"].note  # on the card, not in the folder
    assert "only has ControlNets for Segmentation, Tile, Shuffle" in states["canny"].note
    assert all("\n" not in s.note for s in states.values())


def test_multi_units_start_on_conditions_that_run():
    states = tab_states(card_for(DEMO_DIR / DEMO_BASE), str(DEMO_DIR), offline=True)
    choices = [c for c in CONDITIONS if not c.inpaint]
    first = ready_first(states, ("depth", "seg", "canny"), choices)
    assert first[:2] == ["seg", "canny"] and states[first[2]].ready  # then the others that run, table order
    assert set(first) == {c.key for c in choices}


# -------------------------------------------------------------------------------- the studio, on the demo model
@pytest.fixture
def demo_studio(no_network, tmp_path):
    manager = type("M", (), {"device": torch.device("cpu"), "base_path": str(DEMO_DIR / DEMO_BASE)})()
    return Studio(manager, str(DEMO_DIR), str(tmp_path / "out"), card=card_for(DEMO_DIR / DEMO_BASE), offline=True)


def test_every_default_runs_offline(demo_studio, no_network):
    """Each tab that runs makes its hint with the preprocessor it starts on, from its example, with no network."""
    for cond in CONDITIONS:
        state = demo_studio.tabs[cond.key]
        if not state.ready:
            continue
        picture = load_rgb(EXAMPLES_DIR / (state.example[0] if state.example else "house.png"))
        unit = UnitSettings(cond, picture, state.preprocessor, 64)
        assert demo_studio.hint(unit, (64, 64)).shape == (64, 64, 3)
    assert {k for k, s in demo_studio.tabs.items() if s.ready} == set(card_for(DEMO_DIR / DEMO_BASE).conditions)
    assert no_network == []


def test_a_dead_tab_answers_before_any_preprocessor_runs(demo_studio, no_network, monkeypatch):
    from studio.settings import Settings

    def never(*args, **kwargs):
        raise AssertionError("the preprocessor ran")

    monkeypatch.setattr(demo_studio, "hint", never)
    unit = UnitSettings(BY_KEY["depth"], np.zeros((64, 64, 3), np.uint8), "depth_midas", 64)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="only has ControlNets for .*: for Depth, start the app on SD1.5 weights"):
        demo_studio.request([unit], Settings(width=64, height=64), 1, lambda *a, **k: None, family="SD1.5")
    assert time.perf_counter() - t0 < 1.0 and no_network == []
