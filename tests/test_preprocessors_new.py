"""Depth Anything v2, TEED, AnyLine and DWPose: each hint compared with its reference implementation on random
weights written where users put the real files (no network), the DWPose path through real ONNX files, the clear
message for a missing weight offline, and the tabs that list them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network (conftest sets it too)

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotators import ANNOTATORS, MissingAnnotatorWeights, run, wholebody
from annotators import cache as annotator_cache
from cldm.hints.conditions import BY_KEY

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*mediapipe.*:UserWarning", "ignore:Overwriting tiny_vit.*:UserWarning", "ignore::DeprecationWarning"
)

# 64x128 at resolution 64: controlnet-aux's detection size is the picture's own, so no resize blurs the comparison.
H, W, RES = 64, 128, 64


@pytest.fixture(autouse=True)
def _fresh_cache():
    annotator_cache.clear()
    yield
    annotator_cache.clear()


def picture(seed: int = 0) -> np.ndarray:
    """Smooth colour blobs with dark strokes (lines for the line-art layer) and a 2x2 dark speck."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (H // 8 + 1, W // 8 + 1, 3), dtype=np.uint8)
    img = cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
    cv2.line(img, (5, 10), (120, 50), (10, 10, 10), 2)
    cv2.circle(img, (40, 32), 14, (20, 20, 20), 1)
    img[55:57, 100:102] = 0
    return img


@pytest.fixture
def offline_empty(tmp_path, monkeypatch) -> Path:
    """The hub offline and an empty HF cache, whatever this machine has downloaded; an empty models folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


# ---- the table and the app ----


NEW = {
    "depth": ("depth_anything_v2", "depth_anything_v2_base", "depth_anything_v2_large"),
    "softedge": ("softedge_teed", "softedge_anyline"),
    "lineart": ("softedge_anyline",),
    "openpose": ("dw_openpose_full", "dw_openpose", "dw_openpose_hand", "dw_openpose_face"),
}


def test_conditions_list_the_new_preprocessors_after_their_defaults():
    for key, names in NEW.items():
        cond = BY_KEY[key]
        assert set(names) <= set(cond.preprocessors) and cond.preprocessors[0] not in names, key
        assert all(ANNOTATORS[n].needs_weights for n in names)
    assert ANNOTATORS["softedge_teed"].params[0].default == 2  # the extension's "Safe Steps"


def test_the_app_tabs_offer_them(tmp_path):
    from studio import page
    from studio.service import Studio

    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()  # no model is needed to lay out
    config = page.build_app(Studio(manager, None, str(tmp_path / "out"))).config
    menus = [
        [c[1] if isinstance(c, (list, tuple)) else c for c in comp["props"]["choices"]]
        for comp in config["components"]
        if comp.get("type") == "dropdown" and comp["props"].get("label") == "Preprocessor"
    ]
    for key, names in NEW.items():
        tab = list(BY_KEY[key].preprocessors)
        assert tab in menus, key  # the condition's tab shows its table row, new names included
        assert set(names) <= set(tab)


# ---- missing weights, offline ----


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("softedge_teed", ["7_model.pth", "bdsqlsz/qinglong_controlnet-lllite", "blob/main/Annotators/7_model.pth"]),
        ("softedge_anyline", ["MTEED.pth", "TheMistoAI/MistoLine", "blob/main/Anyline/MTEED.pth"]),
        ("dw_openpose_full", ["yolox_l.onnx", "dw-ll_ucoco_384.onnx", "yzd-v/DWPose"]),
        ("depth_anything_v2", ["depth-anything/Depth-Anything-V2-Small-hf", "Depth-Anything-V2-Small-hf/"]),
        ("depth_anything_v2_large", ["depth-anything/Depth-Anything-V2-Large-hf"]),
    ],
)
def test_missing_weights_say_what_to_get_and_where(offline_empty, name, wanted):
    with pytest.raises(MissingAnnotatorWeights) as info:
        run(name, picture(), resolution=RES, models_dir=offline_empty)
    message = str(info.value)
    assert all(w in message for w in wanted), message
    assert str(offline_empty / "annotators") in message and "offline" in message


def test_the_app_knows_at_start_up_which_files_are_missing(offline_empty):
    from annotators import missing_weights

    assert [f.filename for f in missing_weights("dw_openpose_full", offline_empty)] == [
        "yolox_l.onnx",
        "dw-ll_ucoco_384.onnx",
    ]
    assert [f.local_name for f in missing_weights("depth_anything_v2", offline_empty)] == [
        "Depth-Anything-V2-Small-hf/config.json"
    ]
    (offline_empty / "annotators").mkdir()
    (offline_empty / "annotators" / "7_model.pth").write_bytes(b"")  # found in the models folder by its name
    assert missing_weights("softedge_teed", offline_empty) == ()


# ---- Depth Anything v2 ----


def tiny_depth_anything(folder: Path) -> torch.nn.Module:
    """A tiny DepthAnythingForDepthEstimation in the -hf repos' layout, with weights big enough to vary."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            patch_size=14, image_size=518, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
                                 fusion_hidden_size=8, head_hidden_size=8, patch_size=14)  # fmt: skip
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # the default init gives an almost flat map (std 1e-8): nothing to compare
        for p in model.parameters():
            p.normal_(0, (1.0 / p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1)
        model.head.conv3.bias.fill_(3.0)  # above the closing ReLU: a depth everywhere
    model.save_pretrained(folder)
    return model


def test_depth_anything_v2_matches_the_extensions_recipe(tmp_path):
    from transformers import DPTImageProcessor

    model = tiny_depth_anything(tmp_path / "annotators" / "Depth-Anything-V2-Small-hf")
    img = picture()
    ours = run("depth_anything_v2", img, resolution=RES, models_dir=tmp_path)
    # The reference: the short side brought to 518 and both sides multiples of 14 (64x128 -> 518x1036), bicubic on
    # 0..1 pixels, ImageNet-normalised by transformers' processor, the model, bilinear back, min..max to 0..255.
    big = cv2.resize(img.astype(np.float32) / 255.0, (1036, 518), interpolation=cv2.INTER_CUBIC)
    processor = DPTImageProcessor(do_resize=False, do_rescale=False, do_normalize=True,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    pixels = processor(big, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    assert pixels.shape == (1, 3, 518, 1036)
    with torch.no_grad():
        depth = model(pixel_values=pixels).predicted_depth
    depth = torch.nn.functional.interpolate(depth[None], (H, W), mode="bilinear", align_corners=False)[0, 0]
    expected = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).numpy().astype(np.uint8)
    assert ours.shape == (H, W, 3) and ours.dtype == np.uint8
    assert (ours == ours[:, :, :1]).all()  # grey, 3 channels
    assert np.abs(ours[:, :, 0].astype(int) - expected).max() <= 1  # float rounding of one step at most
    assert ours.min() == 0 and ours.max() == 255 and len(np.unique(ours)) > 50


# ---- TEED and AnyLine ----


def random_ted(path: Path) -> torch.nn.Module:
    from controlnet_aux.teed.ted import TED

    torch.manual_seed(1)
    model = TED().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("safe_steps", [2, 0])
def test_teed_equals_controlnet_aux(tmp_path, safe_steps):
    from controlnet_aux import TEEDdetector

    model = random_ted(tmp_path / "annotators" / "7_model.pth")
    img = picture()
    ours = run("softedge_teed", img, resolution=RES, models_dir=tmp_path, safe_steps=safe_steps)
    expected = TEEDdetector(model)(img, detect_resolution=RES, safe_steps=safe_steps, output_type="np")
    assert ours.shape == expected.shape == (H, W, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, expected)
    levels = set(np.unique(ours).tolist())
    assert levels <= {0, 127, 255} and len(levels) > 1 if safe_steps == 2 else len(levels) > 10


def test_anyline_is_the_comfyui_nodes_screen_of_mteed_and_cleaned_line_art(tmp_path):
    from controlnet_aux import LineartStandardDetector, TEEDdetector
    from skimage.morphology import remove_small_objects

    model = random_ted(tmp_path / "annotators" / "MTEED.pth")
    img = picture()
    ours = run("softedge_anyline", img, resolution=RES, models_dir=tmp_path)
    # TheMistoAI's node, with ComfyUI's float pictures in 0..1: MTEED edges (2 safe steps), lineart_standard
    # (sigma 2, threshold 3) with its objects under 36 voxels of the 3-channel map removed, screen-blended.
    mteed = TEEDdetector(model)(img, detect_resolution=RES, safe_steps=2, output_type="np") / 255.0
    lines = LineartStandardDetector()(img, guassian_sigma=2, intensity_threshold=3, detect_resolution=RES,
                                      output_type="np") / 255.0  # fmt: skip
    kept = remove_small_objects(lines > 0, max_size=35, connectivity=1)
    screen = 1 - (1 - lines * kept) * (1 - mteed)
    expected = (screen * 255.0).clip(0, 255).astype(np.uint8)
    assert ours.shape == (H, W, 3) and np.abs(ours.astype(int) - expected).max() <= 1
    raw = (1 - (1 - lines) * (1 - mteed)) * 255.0
    assert (raw[55:57, 100:102] > ours[55:57, 100:102]).all()  # the speck is dropped
    assert (ours[:, :, 0] > np.median(ours)).sum() > 100  # the strokes are there


# ---- DWPose ----


def test_simcc_decoding():
    simcc_x = np.zeros((1, 3, 576), np.float32)
    simcc_y = np.zeros((1, 3, 768), np.float32)
    simcc_x[0, 0, 100], simcc_y[0, 0, 301] = 0.9, 0.7  # the weaker axis's peak is the score
    simcc_x[0, 1, 575], simcc_y[0, 1, 0] = 0.4, 0.8
    simcc_x[0, 2] -= 1.0  # no positive peak: nowhere
    where, score = wholebody.decode_simcc(simcc_x, simcc_y)
    assert where[0].tolist() == [[50.0, 150.5], [287.5, 0.0], [-0.5, -0.5]]
    assert np.allclose(score[0], [0.7, 0.4, -1.0])


# The detector's one person box: the stride-32 cell (5, 6), centre offset (0.5, 0.5), 128x192 px in YOLOX's 640 px
# input, where a 64x128 picture is scaled by 5: the box (22.4, 22.4)-(48, 60.8) in the picture.
PERSON_BOX = np.array([22.4, 22.4, 48.0, 60.8])
STRIDE32_CELL = 80 * 80 + 40 * 40 + 6 * 20 + 5
STRIDE16_CELL = 80 * 80 + 13 * 40 + 11  # an overlapping, weaker person box (NMS drops it)
STRIDE8_CELL = 3 * 80 + 70  # a confident box of class 1, not a person


def detector_output() -> torch.Tensor:
    out = torch.zeros(1, 8400, 85)
    out[0, STRIDE32_CELL, :6] = torch.tensor([0.5, 0.5, np.log(4.0), np.log(6.0), 0.9, 0.9])
    out[0, STRIDE16_CELL, :6] = torch.tensor([0.0, 0.0, np.log(8.0), np.log(12.0), 0.7, 0.7])
    out[0, STRIDE8_CELL, :5] = torch.tensor([0.5, 0.5, np.log(8.0), np.log(8.0), 0.95])
    out[0, STRIDE8_CELL, 6] = 0.95
    return out


def pose_output() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """SimCC with one peak per keypoint: (x, y, crop positions in pixels, scores); a few body points and one hand
    point score too low to be drawn."""
    rng = np.random.default_rng(3)
    bins_x, bins_y = rng.integers(40, 536, 133), rng.integers(40, 728, 133)
    scores = rng.uniform(0.5, 1.0, 133).astype(np.float32)
    scores[[3, 9, 100]] = 0.2  # l ear, l wrist, a left-hand point
    x, y = torch.zeros(1, 133, 576), torch.zeros(1, 133, 768)
    x[0, np.arange(133), bins_x] = torch.from_numpy(scores)
    y[0, np.arange(133), bins_y] = torch.from_numpy(scores)
    return x, y, np.stack([bins_x, bins_y], axis=1) / 2.0, scores


class Constant(torch.nn.Module):
    """An ONNX-exportable network that reads its input (a 1x1 conv) and answers fixed tensors."""

    def __init__(self, *outputs: torch.Tensor):
        super().__init__()
        self.read = torch.nn.Conv2d(3, 1, 1)
        self.count = len(outputs)
        for i, o in enumerate(outputs):
            self.register_buffer(f"out{i}", o)

    def forward(self, x):
        touch = self.read(x).mean() * 0.0
        return tuple(getattr(self, f"out{i}") + touch for i in range(self.count))


def export(module: torch.nn.Module, shape: tuple[int, ...], path: Path, outputs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, (torch.zeros(shape),), str(path), dynamo=False, input_names=["input"],
                      output_names=outputs)  # fmt: skip


def reference_keypoints(crop_xy: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The expected 134 keypoints, OpenPose order, written out by joint name: the crop is the box widened by 1.25
    (32x48) and made 3:4 (36x48) around its centre."""
    centre, size = (PERSON_BOX[:2] + PERSON_BOX[2:]) / 2, np.array([36.0, 48.0])
    xy = crop_xy / np.array([288.0, 384.0]) * size + centre - size / 2
    coco = ["nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_sho", "r_sho", "l_elb", "r_elb", "l_wri", "r_wri",
            "l_hip", "r_hip", "l_knee", "r_knee", "l_ank", "r_ank"]  # fmt: skip
    openpose = ["nose", "neck", "r_sho", "r_elb", "r_wri", "l_sho", "l_elb", "l_wri", "r_hip", "r_knee", "r_ank",
                "l_hip", "l_knee", "l_ank", "r_eye", "l_eye", "r_ear", "l_ear"]  # fmt: skip
    at = {n: (xy[i], scores[i]) for i, n in enumerate(coco)}
    both = at["l_sho"][1] > 0.3 and at["r_sho"][1] > 0.3
    at["neck"] = ((at["l_sho"][0] + at["r_sho"][0]) / 2, float(both))
    body_xy = np.array([at[n][0] for n in openpose])
    body_score = np.array([at[n][1] for n in openpose])
    return np.concatenate([body_xy, xy[17:]])[None], np.concatenate([body_score, scores[17:]])[None]


def reference_map(img: np.ndarray, keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """controlnet-aux's DWposeDetector (its keypoint handling and drawing) fed the expected keypoints."""
    from controlnet_aux.dwpose import DWposeDetector

    detector = object.__new__(DWposeDetector)  # without its mmpose networks: the keypoints are given
    detector.pose_estimation = lambda _: (keypoints.copy(), scores.copy())
    return detector(img, detect_resolution=RES, image_resolution=RES, output_type="np")


@pytest.fixture
def dwpose_models(tmp_path):
    x, y, crop_xy, scores = pose_output()
    folder = tmp_path / "annotators"
    export(Constant(detector_output()), (1, 3, 640, 640), folder / "yolox_l.onnx", ["output"])
    export(Constant(x, y), (1, 3, 384, 288), folder / "dw-ll_ucoco_384.onnx", ["simcc_x", "simcc_y"])
    return tmp_path, crop_xy, scores


def test_dwpose_full_path_through_onnx_equals_the_reference_drawing(dwpose_models):
    models, crop_xy, scores = dwpose_models
    img = picture()
    keypoints, expected_scores = reference_keypoints(crop_xy, scores)
    from annotators.dwpose import Wholebody

    estimate = Wholebody(models / "annotators" / "yolox_l.onnx", models / "annotators" / "dw-ll_ucoco_384.onnx", "cpu")
    found, found_scores = estimate(img)  # the person box, crop, SimCC and reordering, through onnxruntime
    assert found.shape == (1, 134, 2) and np.allclose(found, keypoints, atol=1e-3)
    assert np.allclose(found_scores, expected_scores)
    ours = run("dw_openpose_full", img, resolution=RES, models_dir=models)
    assert ours.shape == (H, W, 3) and np.array_equal(ours, reference_map(img, keypoints, expected_scores))
    assert (ours > 0).any(axis=2).mean() > 0.05  # a body, two hands and a face are drawn
    body_only = expected_scores.copy()
    body_only[:, 18:] = 0.0  # the reference draws everything: hide the hands and face from it
    assert np.array_equal(run("dw_openpose", img, resolution=RES, models_dir=models),
                          reference_map(img, keypoints, body_only))  # fmt: skip


def test_dwpose_with_nobody_found_draws_nothing(tmp_path):
    x, y, _, _ = pose_output()
    folder = tmp_path / "annotators"
    export(Constant(torch.zeros(1, 8400, 85)), (1, 3, 640, 640), folder / "yolox_l.onnx", ["output"])
    export(Constant(x, y), (1, 3, 384, 288), folder / "dw-ll_ucoco_384.onnx", ["simcc_x", "simcc_y"])
    out = run("dw_openpose_full", picture(), resolution=RES, models_dir=tmp_path)
    assert out.shape == (H, W, 3) and not out.any()
