"""The shipped demo model (assets/demo): it follows hints and prompts, and the app runs on it offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cldm.io import files

DEMO = Path(__file__).parents[1] / "assets" / "demo"
N = 12  # a quick version of `python -m cldm demo-eval` (the README reports the full one)


@pytest.fixture(scope="module")
def demo():
    from cldm.training import demo_eval

    assert (DEMO / demo_eval.DEMO_BASE).is_file(), "assets/demo is part of the project: it must be there"
    return demo_eval.load_demo(DEMO)


@pytest.mark.integration  # the training wing's evaluation of the shipped model: ~170 generations, about 2 min
def test_demo_model_follows_hints_and_prompts(demo):
    """demo_eval's measures at N=12, held about two pictures below what demo model v2.3 measured at N=24 (two objects:
    canny F1 0.98, scribble 0.94, seg 0.96, tile 0.92; binding 88 / 83 / 83 / 92%; one object: colour 100%, shape
    96%; sketched triangle 100%). v1 bound the colours of two objects in 8-12% of scenes, v2.2 scribble and seg in
    67 / 62%: they fail here."""
    from cldm.training import demo_eval

    report = demo_eval.evaluate(*demo, n=N)  # the demo settings (demo_eval.STEPS, CFG)
    for hint, least in (("canny", 0.9), ("scribble", 0.85), ("seg", 0.85), ("tile", 0.8)):
        f = report.two_objects[hint]
        assert f["f1_on"] >= least and f["f1_on"] > f["f1_off"] + 0.3, (hint, f)
    for hint, least in (("canny", 8 / 12), ("scribble", 8 / 12), ("seg", 8 / 12), ("tile", 9 / 12)):
        assert report.two_objects[hint]["binding"] >= least, (hint, report.two_objects[hint])
    assert report.colour_rate >= 10 / 12, report
    assert report.shape_rate >= 10 / 12, report
    assert report.both_rate >= 9 / 12, report
    assert report.sketch_rate >= 10 / 12, report


def test_demo_files_are_small():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 60 * 1024**2


def test_offline_app_falls_back_to_the_demo_model(monkeypatch):
    from studio import service as studio

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, card, banner = studio.choose_base("stable-diffusion-v1-5/stable-diffusion-v1-5", demo=False)
    assert card is not None and base.endswith("shapes_sd.safetensors") and "hub cannot be reached" in banner
    assert card.size == 64 and card.conditions == ("canny", "scribble", "seg", "tile", "inpaint", "shuffle")
    local = str(DEMO / "shapes_sd.safetensors")
    base, card, banner = studio.choose_base(local, demo=False)
    assert base == local and card.name == "demo"  # a local file is used as given, with the card beside it
    assert studio.choose_base(str(DEMO / "control_v11p_sd15_canny.safetensors"), demo=False)[1] is None


def test_swapping_controlnets_in_the_running_demo_app(demo_app, tmp_path):
    from gradio_client import Client, handle_file

    from cldm.training.shapes import make_sample
    from tools.load_test import PLAIN

    url, manager = demo_app
    client = Client(url, verbose=False)
    sample = make_sample(2_000_123_456, 64)
    for name in ("canny", "scribble", "seg"):
        Image.fromarray(sample.hint(name)).save(tmp_path / f"{name}.png")
    settings = [sample.caption, "", "", 1, 64, 64, 20, 5.0, "ddim", 3, False, 1.0]

    def run(cond: str, params=()) -> np.ndarray:
        picture = handle_file(str(tmp_path / f"{cond}.png"))
        if cond == "scribble":  # the sketch canvas
            picture = {"background": picture, "layers": [], "composite": picture}
        unit = [picture, "none", 64, 1.0, 0.0, 1.0, *params]
        _, status, files = client.predict(*unit, *settings, **PLAIN, api_name=f"/{cond}_generate")
        assert f"control_v11p_sd15_{cond}" in status
        return np.asarray(Image.open(files[0]))

    first = run("canny", (100, 200))
    settings[0] = sample.caption + ", masterpiece"  # not a word the demo model knows: left out, and said so
    _, status, files = client.predict(handle_file(str(tmp_path / "canny.png")), "none", 64, 1.0, 0.0, 1.0, 100, 200,
                                      *settings, **PLAIN, api_name="/canny_generate")  # fmt: skip
    assert "left out (not in the demo model's vocabulary): masterpiece" in status
    assert np.array_equal(np.asarray(Image.open(files[0])), first)  # the same prompt once the word is gone
    settings[0] = sample.caption
    pictures = {"canny": first, "scribble": run("scribble"), "seg": run("seg", ())}
    again = run("canny", (100, 200))
    assert np.array_equal(first, again)  # back to canny: the same ControlNet, the same picture
    assert not np.array_equal(pictures["canny"], pictures["scribble"])  # another ControlNet really ran
    assert not np.array_equal(pictures["scribble"], pictures["seg"])
    assert manager.base_loads == 1
    with pytest.raises(Exception, match="demo model only has ControlNets"):
        client.predict(handle_file(str(tmp_path / "canny.png")), "none", 64, 1.0, 0.0, 1.0, 0.1, 0.1, *settings,
                       **PLAIN, api_name="/mlsd_generate")  # fmt: skip


@pytest.mark.slow
def test_full_demo_eval_gives_the_readme_figures(demo):
    """`python -m cldm demo-eval --n 24`, docs/demo-model.md's v2.3 column: within about one picture of each figure."""
    from cldm.training import demo_eval

    report = demo_eval.evaluate(*demo, n=24)
    table = {"canny": (0.98, 0.88), "scribble": (0.94, 0.83), "seg": (0.96, 0.83), "tile": (0.92, 0.92)}
    for hint, (f1, binding) in table.items():
        assert abs(report.two_objects[hint]["f1_on"] - f1) < 0.04, (hint, report.two_objects[hint])
        assert abs(report.two_objects[hint]["binding"] - binding) <= 1.5 / 24, (hint, report.two_objects[hint])
    for got, want in ((report.colour_rate, 1.0), (report.shape_rate, 0.96), (report.both_rate, 0.96),
                      (report.sketch_rate, 1.0), (report.inpaint_rate, 0.46)):  # fmt: skip
        assert abs(got - want) <= 1.5 / 24, report


def test_the_shipped_files_configs_are_read():
    """Our safetensors carry their configs under a file-format key ("cldm.config", not a module path): the demo
    VAE's own latent scale comes from it (a key renamed by a refactor once gave SD1.5's 0.18215 and other pictures)."""
    from cldm.io import checkpoints
    from cldm.io.model_configs import CONFIG_METADATA_KEY

    assert CONFIG_METADATA_KEY == "cldm.config"
    assert CONFIG_METADATA_KEY in files.read_metadata(DEMO / "shapes_sd.safetensors")
    sd = checkpoints.load_sd(str(DEMO / "shapes_sd.safetensors"))
    assert abs(sd.vae.cfg.scale_factor - 0.5735) < 1e-3 and sd.vae.cfg.norm_groups == 8
