"""`python -m cldm generate`'s preprocessors and progress: the README's command-line example makes the triangle it
promises, each --preprocessor goes with its --controlnet, unknown names and missing weights are refused before any
model loads, and the steps show as a bar on a terminal only."""

from __future__ import annotations

import argparse
import io
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cldm import cli
from cldm.__main__ import main
from cldm.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
SECTION = "## Command line"  # the README's section whose first `generate` command is the demo example
NAMED = ("green", "white")  # what its prompt asks for: inside the sketched outline, outside it


def readme_generate() -> list[str]:
    """The README's command-line demo example as an argv for `main` (from `generate` on)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    at = text.find(SECTION)
    assert at >= 0, f"README.md has no {SECTION!r} section"
    block = re.search(r"^```bash\n(.*?)^```", text[at:], re.DOTALL | re.MULTILINE)
    assert block, f"no ```bash block in README.md's {SECTION!r}"
    commands = block.group(1).replace("\\\n", " ").splitlines()
    words = next(shlex.split(c) for c in commands if " -m cldm generate " in c)
    return words[words.index("generate") :]


def outline_regions(sketch: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) of the sketch's closed outline at `size` px, measured on the sketch itself (black strokes on
    white, as the user drew it) and not on the hint the command made, so a wrong hint cannot move the regions."""
    from cldm.training.demo_eval import closed_outline_regions

    scale = sketch.shape[0] // size
    inside, outside = closed_outline_regions(255 - sketch, margin=2 * scale)  # 2 px at the picture's size
    blocks = (size, scale, size, scale)
    return inside.reshape(blocks).all(axis=(1, 3)), outside.reshape(blocks).all(axis=(1, 3))


def named_share(picture: np.ndarray, region: np.ndarray, name: str) -> float:
    """The share of the region's pixels whose nearest named colour is `name`."""
    from cldm.training.demo_eval import nearest_colour

    return float(np.mean([nearest_colour(px) == name for px in picture[region].astype(float)]))


def test_the_readme_cli_example_draws_a_green_triangle_on_white(tmp_path, monkeypatch):
    import cldm
    from cldm.training.demo_eval import nearest_colour

    argv = readme_generate()
    assert "--preprocessor" in argv and "--hint" in argv, argv
    sketch_file = argv[argv.index("--hint") + 1]
    out = argv[argv.index("--out") + 1]
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # the example names the shipped files by relative path
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    with Image.open(tmp_path / out) as img:
        picture = np.asarray(img.convert("RGB"))
    assert "Module: scribble_sketch" in cldm.read_parameters(tmp_path / out)
    sketch = np.asarray(Image.open(ROOT / sketch_file).convert("RGB"))
    inside, outside = outline_regions(sketch, picture.shape[0])
    assert inside.sum() > 150 and outside.sum() > 1000, "the sketch must be a closed outline"
    medians = nearest_colour(np.median(picture[inside], axis=0)), nearest_colour(np.median(picture[outside], axis=0))
    assert medians == NAMED, (medians, np.median(picture[inside], axis=0))  # demo-eval's sketched-triangle test
    # and the shape is the sketch's: not a blob somewhere inside a white page
    assert named_share(picture, inside, "green") > 0.8 and named_share(picture, outside, "white") > 0.9


# ------------------------------------------------------------------------------------------ argument parsing
def _args(tmp_path: Path, *words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_generate_args(parser)
    return parser.parse_args(["--base", str(tmp_path / "no-base"), "--prompt", "a", "--width", "64", "--height", "64",
                              *words])  # fmt: skip


@pytest.fixture
def drawing(tmp_path) -> Path:
    """A black square outline on white, as a user draws it."""
    img = np.full((64, 64, 3), 255, np.uint8)
    img[16:48, 16:18] = img[16:48, 46:48] = img[16:18, 16:48] = img[46:48, 16:48] = 0
    path = tmp_path / "drawing.png"
    Image.fromarray(img).save(path)
    return path


def test_each_preprocessor_goes_with_its_controlnet(tmp_path, drawing):
    picture = np.asarray(Image.open(drawing).convert("RGB"))
    a = _args(tmp_path, "--controlnet", "a.safetensors", "--hint", str(drawing), "--preprocessor", "none",
              "--controlnet", "b.safetensors", "--hint", str(drawing), "--preprocessor", "invert")  # fmt: skip
    request = cli.with_hints(cli.request_from_args(a).validate(), str(tmp_path))
    first, second = request.units
    assert (first.preprocessor, second.preprocessor) == ("", "invert")  # none: not written into the PNG
    assert np.array_equal(first.hint, picture)  # the picture is the hint, as without --preprocessor
    assert np.array_equal(second.hint, 255 - picture)
    assert (first.processor_res, first.pixel_perfect) == (None, False)
    assert (second.processor_res, second.pixel_perfect) == (64, True)  # pixel perfect: 64 px picture, 64 px output


def test_one_preprocessor_and_resolution_serve_every_controlnet(tmp_path, drawing):
    a = _args(tmp_path, "--controlnet", "a", "--hint", str(drawing), "--controlnet", "b", "--hint", str(drawing),
              "--preprocessor", "scribble_sketch", "--processor-res", "128")  # fmt: skip
    request = cli.with_hints(cli.request_from_args(a).validate(), str(tmp_path))
    assert [(u.preprocessor, u.processor_res, u.pixel_perfect) for u in request.units] == [
        ("scribble_sketch", 128, False)
    ] * 2
    strokes = request.units[0].hint.max(axis=2) > 127
    assert strokes[16:48, 16].all() and not strokes[30, 30]  # white strokes on black where the ink was
    a = _args(tmp_path, "--controlnet", "a", "--hint", str(drawing), "--controlnet", "b", "--hint", str(drawing),
              "--preprocessor", "invert", "--processor-res", "128", "--processor-res", "256")  # fmt: skip
    assert [u.processor_res for u in cli.request_from_args(a).units] == [128, 256]


def test_a_count_that_fits_no_controlnet_is_refused(tmp_path, drawing):
    a = _args(tmp_path, "--controlnet", "a", "--hint", str(drawing), "--controlnet", "b", "--hint", str(drawing),
              "--preprocessor", "invert", "--preprocessor", "none", "--preprocessor", "canny")  # fmt: skip
    with pytest.raises(InputError, match=r"give --preprocessor once, or once per --controlnet \(2\); got 3"):
        cli.request_from_args(a)


def test_an_unknown_preprocessor_is_refused_with_the_names(tmp_path, drawing, capsys):
    code = main(["generate", *_argv_tail(tmp_path, drawing), "--preprocessor", "cany"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown --preprocessor cany" in err
    assert "canny, depth_anything_v2, " in err and "scribble_sketch" in err and "dw_openpose_full" in err  # the list
    assert not (tmp_path / "out.png").exists()


def test_missing_preprocessor_weights_are_named_before_the_model_loads(tmp_path, drawing, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # and an empty cache, whatever this machine holds
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    models = tmp_path / "models"
    code = main(["generate", *_argv_tail(tmp_path, drawing), "--preprocessor", "depth_midas", "--models-dir",
                 str(models)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "dpt_hybrid-midas-501f0c75.pt" in err and "lllyasviel/Annotators" in err, err
    assert str(models / "annotators" / "dpt_hybrid-midas-501f0c75.pt") in err  # where to put it
    assert "native size" not in err and not (tmp_path / "out.png").exists()  # refused before the model loads


def _argv_tail(tmp_path: Path, hint: Path) -> list[str]:
    return ["--base", str(DEMO / "shapes_sd.safetensors"), "--controlnet",
            str(DEMO / "control_v11p_sd15_scribble.safetensors"), "--hint", str(hint), "--prompt", "a", "--steps", "2",
            "--out", str(tmp_path / "out.png")]  # fmt: skip


# ------------------------------------------------------------------------------------------------ progress
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_steps_show_as_a_bar_on_a_terminal_and_not_in_a_log(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = cli.StepBar()
    for done in range(1, 21):
        bar(done, 20)
    bar.close()
    frames = terminal.getvalue()
    assert "generate" in frames and "20/20" in frames and "\r" in frames  # one line, redrawn
    log = io.StringIO()  # stderr to a file or a pipe: no frames at all
    monkeypatch.setattr(sys, "stderr", log)
    bar = cli.StepBar()
    for done in range(1, 21):
        bar(done, 20)
    bar.close()
    assert log.getvalue() == ""


def test_training_writes_a_line_per_checkpoint_into_a_log(tmp_path, monkeypatch):
    from cldm.training.trainer import Run, run_loop

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    run_loop(Run(tmp_path), 0, 6, lambda step: {"loss": 1 / (step + 1)}, lambda done: None, None, 3, 3, "base")
    assert log.getvalue() == "base: step 3 of 6, loss 0.3333\nbase: step 6 of 6, loss 0.1667\n"


def test_batch_takes_a_processor_resolution_for_its_rows(tmp_path):
    from cldm.scale import batch
    from cldm.scale.jobs import read_jobs

    parser = argparse.ArgumentParser()
    batch.add_batch_args(parser)
    a = parser.parse_args(["--jobs", "jobs.csv", "--out", "out", "--base", "b", "--processor-res", "256"])
    jobs_file = tmp_path / "jobs.csv"
    jobs_file.write_text("image,controlnet,processor_res\nx.png,canny,\ny.png,canny,512\n", encoding="utf-8")
    jobs, bad = read_jobs(jobs_file, batch.defaults_from_args(a))
    assert not bad and [j.resolution for j in jobs] == [256, 512]  # a row's own column wins


def test_a_preprocessor_makes_the_batch_row_s_picture(tmp_path, capsys):
    """`generate --preprocessor` and a batch row naming the same preprocessor make the same picture (the app's hint)."""
    sketch = ROOT / "assets" / "examples" / "triangle_sketch.png"
    (tmp_path / "jobs.csv").write_text(f"image,preprocessor,controlnet\n{sketch},scribble_sketch,scribble\n")
    common = ["--base", str(DEMO / "shapes_sd.safetensors"), "--dtype", "fp32", "--steps", "8", "--cfg", "5",
              "--prompt", "a green triangle on a white background"]  # fmt: skip
    assert main(["batch", *common, "--jobs", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "out")]) == 0
    assert main(["generate", *common, "--controlnet", str(DEMO / "control_v11p_sd15_scribble.safetensors"),
                 "--preprocessor", "scribble_sketch", "--hint", str(sketch), "--out", str(tmp_path / "cli.png")]) == 0  # fmt: skip
    row, cli_picture = Image.open(tmp_path / "out" / "00000.png"), Image.open(tmp_path / "cli.png")
    assert np.array_equal(np.asarray(row), np.asarray(cli_picture))
    assert (
        "Module: scribble_sketch" in row.info["parameters"]
        and "Module: scribble_sketch" in cli_picture.info["parameters"]
    )
