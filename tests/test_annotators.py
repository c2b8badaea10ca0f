"""annotators/: real behaviour of the hint extractors, offline, on small images, random weights where needed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network (conftest sets it too)

import cv2
import numpy as np
import pytest
import torch

from annotators import ANNOTATORS, AnnotatorError, MissingAnnotatorWeights, Param, run
from annotators import cache as annotator_cache
from annotators.segmentation import ADE20K_PALETTE, colorize
from annotators.sketch import EMPTY_SKETCH

# controlnet-aux's package import warns about optional extras (mediapipe) and timm name clashes; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*mediapipe.*:UserWarning", "ignore:Overwriting tiny_vit.*:UserWarning")

REQUIRED = {
    "none", "invert", "canny", "mlsd", "depth_midas", "depth_zoe", "depth_leres", "normal_bae", "seg_ade20k",
    "openpose", "openpose_hand", "openpose_face", "openpose_full", "scribble_hed", "scribble_pidinet",
    "softedge_hed", "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "lineart", "lineart_coarse",
    "lineart_anime", "shuffle", "scribble_sketch",
}  # fmt: skip
NO_WEIGHTS = {"none", "invert", "canny", "shuffle", "scribble_sketch"}


def square(size: int = 128, lo: int = 32, hi: int = 96) -> np.ndarray:
    """A black square on white, RGB uint8."""
    img = np.full((size, size, 3), 255, np.uint8)
    img[lo:hi, lo:hi] = 0
    return img


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour blobs: edges of every strength, so thresholds matter."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(autouse=True)
def _fresh_cache():
    annotator_cache.clear()
    yield
    annotator_cache.clear()


# ---- registry ----


def test_registry_has_every_required_name_and_weight_flags():
    assert REQUIRED <= set(ANNOTATORS)
    for name in REQUIRED:
        assert ANNOTATORS[name].name == name and ANNOTATORS[name].label
        assert ANNOTATORS[name].needs_weights == (name not in NO_WEIGHTS), name
    canny = {p.name: p for p in ANNOTATORS["canny"].params}
    assert canny["low_threshold"] == Param("low_threshold", canny["low_threshold"].label, 1, 255, 100, 1)
    assert (canny["high_threshold"].minimum, canny["high_threshold"].maximum, canny["high_threshold"].default) == (
        1,
        255,
        200,
    )
    mlsd = {p.name: p for p in ANNOTATORS["mlsd"].params}
    assert (mlsd["value_threshold"].minimum, mlsd["value_threshold"].maximum, mlsd["value_threshold"].default) == (
        0.01,
        2,
        0.1,
    )
    assert (mlsd["distance_threshold"].maximum, mlsd["distance_threshold"].default) == (20, 0.1)


def test_importing_annotators_pulls_in_neither_cldm_nor_gradio():
    code = "import sys, annotators; print(sorted(m for m in ('cldm', 'gradio', 'app') if m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_and_bad_params_raise():
    img = square(64)
    with pytest.raises(AnnotatorError, match="Unknown preprocessor 'cany'"):
        run("cany", img)
    with pytest.raises(AnnotatorError, match="low_threshold.*between 1 and 255"):
        run("canny", img, resolution=64, low_threshold=0)
    with pytest.raises(AnnotatorError, match="high_threshold"):
        run("canny", img, resolution=64, high_threshold=256)
    with pytest.raises(AnnotatorError, match="value_threshold"):
        run("mlsd", img, resolution=64, value_threshold=3.0)
    with pytest.raises(AnnotatorError, match="Unknown parameter"):
        run("canny", img, resolution=64, sigma=2)
    with pytest.raises(AnnotatorError, match="must be a number"):
        run("canny", img, resolution=64, low_threshold="high")
    with pytest.raises(AnnotatorError, match="resolution"):
        run("canny", img, resolution=8)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32, 3), np.float32),
        np.zeros((32, 32, 2), np.uint8),
        np.zeros((0, 32, 3), np.uint8),
        np.zeros((4, 32, 32, 3), np.uint8),
        [[0, 0, 0]],
    ],
    ids=["float", "two-channels", "empty", "batch", "list"],
)
def test_bad_images_raise(bad):
    with pytest.raises(AnnotatorError):
        run("none", bad)


# ---- weight-free annotators ----


def test_none_and_invert():
    img = photo_like(40, 56)
    assert np.array_equal(run("none", img), img)
    assert np.array_equal(run("invert", img), 255 - img)
    grey = img[:, :, 0]
    assert np.array_equal(run("none", grey), np.repeat(grey[:, :, None], 3, axis=2))


def test_canny_finds_the_square_edges_and_thresholds_matter():
    edges = run("canny", square(128), resolution=128)
    assert edges.shape == (128, 128, 3) and edges.dtype == np.uint8
    mask = edges[:, :, 0] > 0
    border = np.zeros_like(mask)
    border[29:100, 29:100] = True
    border[35:93, 35:93] = False  # a ring around the square's outline
    assert mask[border].sum() > 4 * 50  # all four sides are found
    assert not mask[~border].any()  # nothing inside the square or in the white background
    # A strong square (contrast 255) and a faint one (contrast 40): low thresholds see both, high ones only the first.
    two = np.full((128, 128, 3), 200, np.uint8)
    two[16:48, 16:48] = 0
    two[80:112, 80:112] = 160
    faint = np.zeros((128, 128), bool)
    faint[76:116, 76:116] = True
    low = run("canny", two, resolution=128, low_threshold=20, high_threshold=40)[:, :, 0] > 0
    high = run("canny", two, resolution=128, low_threshold=200, high_threshold=250)[:, :, 0] > 0
    assert low[faint].sum() > 100 and not high[faint].any()
    assert high[~faint].sum() > 100  # the strong square is still found


@pytest.mark.parametrize("name", ["none", "invert", "canny", "shuffle", "scribble_sketch"])
@pytest.mark.parametrize("shape", [(67, 101), (120, 45)])
def test_output_has_the_input_size(name, shape):
    img = square(128)
    img = cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    out = run(name, img, resolution=64)
    assert out.shape == (*shape, 3) and out.dtype == np.uint8


def test_shuffle_scrambles_but_keeps_size_and_colours():
    img = photo_like(96, 64, seed=3)
    out = run("shuffle", img, resolution=64)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 10
    # a remap only moves pixels: the colours stay within the input's range
    assert out.min() >= img.min() and out.max() <= img.max()


def test_scribble_sketch_black_on_white_line():
    drawing = np.full((64, 80, 3), 255, np.uint8)
    cv2.line(drawing, (10, 10), (70, 50), (0, 0, 0), 3)
    hint = run("scribble_sketch", drawing, resolution=64)
    assert set(np.unique(hint)) == {0, 255}
    ink = drawing[:, :, 0] < 128
    assert np.array_equal(hint[:, :, 0] == 255, ink)  # strokes white, paper black
    assert (hint == 0).mean() > 0.8


def test_scribble_sketch_white_on_black_and_coloured_strokes():
    drawing = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(drawing, (32, 32), 15, (255, 255, 255), 2)
    hint = run("scribble_sketch", drawing, resolution=64)
    assert np.array_equal(hint[:, :, 0] == 255, drawing[:, :, 0] > 127)
    coloured = np.full((64, 64, 3), 255, np.uint8)
    coloured[20:24, 5:60] = (255, 0, 0)  # a red stroke on white paper is still ink
    hint = run("scribble_sketch", coloured, resolution=64)
    assert hint[21, 30].tolist() == [255, 255, 255] and hint[5, 5].tolist() == [0, 0, 0]


@pytest.mark.parametrize("value", [0, 255])
def test_empty_sketch_raises(value):
    with pytest.raises(AnnotatorError, match=EMPTY_SKETCH):
        run("scribble_sketch", np.full((48, 48, 3), value, np.uint8))


# ---- weights: missing, random, corrupt ----


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """The hub offline and an empty HF cache, whatever this machine has downloaded."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    models = tmp_path / "models"
    models.mkdir()
    return models


@pytest.mark.parametrize(
    ("name", "filename"),
    [
        ("softedge_hed", "ControlNetHED.pth"),
        ("lineart_coarse", "sk_model2.pth"),
        ("openpose_hand", "hand_pose_model.pth"),
        ("depth_midas", "dpt_hybrid-midas-501f0c75.pt"),
    ],
)
def test_missing_weights_name_the_file_and_folder(offline_empty_cache, name, filename):
    with pytest.raises(MissingAnnotatorWeights) as info:
        run(name, square(64), resolution=64, models_dir=offline_empty_cache)
    message = str(info.value)
    assert filename in message and "lllyasviel/Annotators" in message
    assert str(offline_empty_cache / "annotators" / filename) in message
    assert isinstance(info.value, AnnotatorError)


def test_missing_seg_model_names_the_repo(offline_empty_cache):
    with pytest.raises(MissingAnnotatorWeights, match="openmmlab/upernet-convnext-small") as info:
        run("seg_ade20k", square(64), resolution=64, models_dir=offline_empty_cache)
    assert str(offline_empty_cache / "annotators" / "upernet-convnext-small") in str(info.value)


@pytest.fixture
def random_models(tmp_path) -> Path:
    """A models folder laid out like lllyasviel/Annotators, holding randomly initialised networks."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    folder = tmp_path / "annotators"
    folder.mkdir()
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    # PiDiNet's file is a training checkpoint from DataParallel: {"state_dict": {"module.<name>": tensor}}
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in pidinet().state_dict().items()}}, folder / "table5_pidinet.pth"
    )
    # A lineart generator that paints blank paper everywhere (sigmoid(10) ~ 1): the hint must then be all black,
    # because the lineart ControlNets expect white lines on black.
    paper = Generator(3, 1, 3)
    with torch.no_grad():
        paper.model4[1].weight.zero_()
        paper.model4[1].bias.fill_(10.0)
    torch.save(paper.state_dict(), folder / "sk_model.pth")
    return tmp_path


def test_hed_variants_with_random_weights(random_models):
    img = photo_like(64, 128)  # resolution 64 keeps the detection size = input size, so no resize blurs values
    soft = run("softedge_hed", img, resolution=64, models_dir=random_models)
    safe = run("softedge_hedsafe", img, resolution=64, models_dir=random_models)
    scribble = run("scribble_hed", img, resolution=64, models_dir=random_models)
    for out in (soft, safe, scribble):
        assert out.shape == img.shape and out.dtype == np.uint8
    assert len(np.unique(soft)) > 10  # a soft, continuous edge map
    assert set(np.unique(safe)) <= {0, 127, 255}  # safe_step quantises to three levels
    assert set(np.unique(scribble)) <= {0, 255}  # scribble is binary
    pidi = run("scribble_pidinet", photo_like(80, 96), resolution=64, models_dir=random_models)
    assert pidi.shape == (80, 96, 3)


def test_lineart_is_white_on_black_and_needs_only_its_own_file(random_models):
    out = run("lineart", photo_like(72, 90), resolution=64, models_dir=random_models)
    assert out.shape == (72, 90, 3) and out.max() <= 2  # blank paper -> black hint
    with pytest.raises(MissingAnnotatorWeights, match="sk_model2.pth"):
        run("lineart_coarse", photo_like(72, 90), resolution=64, models_dir=random_models)


def test_openpose_body_with_random_weights_needs_no_hand_or_face_file(tmp_path):
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    (tmp_path / "annotators").mkdir()
    # The published file names layers without the stage prefix ("conv1_1.weight" for "model0.conv1_1.weight").
    state = {k.split(".", 1)[1]: v for k, v in bodypose_model().state_dict().items()}
    torch.save(state, tmp_path / "annotators" / "body_pose_model.pth")
    out = run("openpose", photo_like(60, 84), resolution=64, models_dir=tmp_path)
    assert out.shape == (60, 84, 3) and out.dtype == np.uint8
    with pytest.raises(MissingAnnotatorWeights, match="facenet.pth"):
        run("openpose_face", photo_like(60, 84), resolution=64, models_dir=tmp_path)


def test_corrupt_weights_raise_annotator_error(tmp_path):
    (tmp_path / "annotators").mkdir()
    (tmp_path / "annotators" / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AnnotatorError, match="ControlNetHED.pth") as info:
        run("softedge_hed", square(64), resolution=64, models_dir=tmp_path)
    assert not isinstance(info.value, MissingAnnotatorWeights)


def test_seg_with_a_tiny_random_upernet(tmp_path):
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    backbone = ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=150, use_auxiliary_head=False)
    UperNetForSemanticSegmentation(config).save_pretrained(tmp_path / "annotators" / "upernet-convnext-small")
    out = run("seg_ade20k", photo_like(70, 90), resolution=64, models_dir=tmp_path)
    assert out.shape == (70, 90, 3) and out.dtype == np.uint8
    palette = {tuple(c) for c in ADE20K_PALETTE}
    assert {tuple(c) for c in out.reshape(-1, 3)} <= palette  # every pixel is a class colour, none blended


def test_ade20k_palette():
    from controlnet_aux.util import ade_palette

    assert len(ADE20K_PALETTE) == 150
    assert ADE20K_PALETTE[:5] == ((120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3))
    assert ADE20K_PALETTE[-1] == (92, 0, 255)
    assert [list(c) for c in ADE20K_PALETTE] == ade_palette()
    assert colorize(np.array([[0, 2], [149, 1]])).tolist() == [
        [[120, 120, 120], [6, 230, 230]],
        [[92, 0, 255], [180, 120, 120]],
    ]


def test_detectors_are_loaded_once_even_from_many_threads():
    builds = []

    def slow_build(paths):
        time.sleep(0.05)
        builds.append(paths)
        return object()

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(annotator_cache.cached_load("t", (), slow_build, None, "t")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({id(r) for r in results}) == 1


def test_shuffle_is_repeatable_with_its_seed():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    a = run("shuffle", img, resolution=64, seed=1)
    assert np.array_equal(a, run("shuffle", img, resolution=64, seed=1))
    assert not np.array_equal(a, run("shuffle", img, resolution=64, seed=2))


def test_hint_goes_straight_to_the_requested_size():
    img = np.zeros((90, 120, 3), np.uint8)
    img[30:60, 40:80] = 255
    hint = run("canny", img, resolution=64, size=(96, 128))
    assert hint.shape == (96, 128, 3) and hint.max() > 0
    with pytest.raises(AnnotatorError):
        run("canny", img, resolution=64, size=(0, 10))
