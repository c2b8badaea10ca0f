"""DWPose on onnxruntime: the "dw_openpose*" preprocessors (the A1111 extension's "dw_openpose_full", plus the body,
body + hands and body + face variants the OpenPose preprocessors have), drawn in OpenPose's colours.

onnxruntime runs yzd-v/DWPose's two ONNX files (yolox_l.onnx, dw-ll_ucoco_384.onnx); the steps around them are in
annotators/wholebody.py. Neither mmpose nor rtmlib is needed (rtmlib would pull in opencv-python and
opencv-contrib-python beside the headless OpenCV the app uses). The drawing is controlnet-aux's DWPose drawing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from annotators import wholebody
from annotators.cache import cached_load, current_device
from annotators.detectors import DetectFn
from annotators.weights import WeightFile

DWPOSE_REPO = "yzd-v/DWPose"
DETECTOR_FILE = WeightFile(DWPOSE_REPO, "yolox_l.onnx")
POSE_FILE = WeightFile(DWPOSE_REPO, "dw-ll_ucoco_384.onnx")
DWPOSE_FILES = (DETECTOR_FILE, POSE_FILE)
BODY_POINTS = 18
FACE, LEFT_HAND, RIGHT_HAND = slice(24, 92), slice(92, 113), slice(113, 134)  # in OpenPose order (after the neck)


class Wholebody:
    """The two ONNX sessions: a picture in, every person's 134 keypoints (OpenPose body order) and scores out."""

    def __init__(self, detector_path: Path, pose_path: Path, device: str):
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.detector = onnxruntime.InferenceSession(str(detector_path), providers=providers)
        self.pose = onnxruntime.InferenceSession(str(pose_path), providers=providers)

    def _run(self, session: Any, pixels: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {session.get_inputs()[0].name: pixels})

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HxWx3 uint8 RGB -> (Nx134x2 keypoints in pixels, Nx134 scores); N = 0 when nobody is found."""
        pixels, scale = wholebody.detector_input(image)
        boxes = wholebody.people(self._run(self.detector, pixels)[0], scale)
        keypoints, scores = [], []
        for box in boxes:
            centre, size = wholebody.crop_box(box)
            simcc_x, simcc_y = self._run(self.pose, wholebody.pose_input(image, centre, size)[None])[:2]
            where, score = wholebody.decode_simcc(simcc_x, simcc_y)
            keypoints.append(wholebody.to_picture(where[0], centre, size))
            scores.append(score[0])
        if not keypoints:
            return np.zeros((0, 134, 2)), np.zeros((0, 134))
        return wholebody.openpose_order(np.stack(keypoints), np.stack(scores))


def draw(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int, hands: bool, face: bool) -> np.ndarray:
    """The pose picture: every person's body (and hands, face) on black; keypoints scored below KEYPOINT_MIN are
    left out, positions are scaled to the canvas."""
    from controlnet_aux.dwpose.util import draw_bodypose, draw_facepose, draw_handpose

    where = keypoints / np.array([width, height], dtype=np.float64)  # 0..1, as the drawing takes them
    where[scores < wholebody.KEYPOINT_MIN] = -1  # drawn nowhere (the drawing skips points at or below 0)
    people = len(where)
    body = where[:, :BODY_POINTS].reshape(people * BODY_POINTS, 2)
    # the drawing's "subset": for each person and body point, its row in `body`, or -1 when not seen
    rows = np.arange(people * BODY_POINTS, dtype=np.float64).reshape(people, BODY_POINTS)
    subset = np.where(scores[:, :BODY_POINTS] > wholebody.KEYPOINT_MIN, rows, -1.0)
    canvas = draw_bodypose(np.zeros((height, width, 3), np.uint8), body, subset)
    if hands:
        canvas = draw_handpose(canvas, np.concatenate([where[:, LEFT_HAND], where[:, RIGHT_HAND]]))
    if face:
        canvas = draw_facepose(canvas, where[:, FACE])
    return canvas


def _build(paths: list[Path]) -> Wholebody:
    return Wholebody(paths[0], paths[1], current_device())


def _dwpose(name: str, hands: bool, face: bool) -> DetectFn:
    def run(image: np.ndarray, resolution: int, models_dir: str | os.PathLike[str] | None,
            params: Mapping[str, float]) -> np.ndarray:  # fmt: skip
        estimate = cached_load("dwpose", DWPOSE_FILES, _build, models_dir, name)
        from controlnet_aux.util import resize_image  # after the weights: a missing file is said without it

        detect = resize_image(image, resolution)
        keypoints, scores = estimate(detect)
        return draw(keypoints, scores, *detect.shape[:2], hands=hands, face=face)

    return run


dw_openpose = _dwpose("dw_openpose", hands=False, face=False)
dw_openpose_hand = _dwpose("dw_openpose_hand", hands=True, face=False)
dw_openpose_face = _dwpose("dw_openpose_face", hands=False, face=True)
dw_openpose_full = _dwpose("dw_openpose_full", hands=True, face=True)
