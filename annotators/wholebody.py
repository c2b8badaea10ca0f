"""DWPose's two ONNX networks and the numbers around them: YOLOX finds people, RTMPose (DW-LL, 133 COCO-WholeBody
keypoints) places each one's keypoints by SimCC, and the keypoints are reordered into OpenPose's 18 body points.

The files are those of yzd-v/DWPose that the A1111 extension runs; their inputs and outputs:
- yolox_l.onnx: 1x3x640x640 float pixels 0..255 (the picture scaled to fit, padded with grey 114 right and below)
  -> 1xNx85: per anchor (dx, dy, log w, log h, objectness, 80 class scores), anchors on strides 8, 16, 32.
- dw-ll_ucoco_384.onnx: Nx3x384x288 ImageNet-normalised crops (each person's box, widened by 1.25 to 3:4)
  -> SimCC x (Nx133x576) and y (Nx133x768): a score per half pixel of the crop for each keypoint.
"""

from __future__ import annotations

import cv2
import numpy as np

DETECT_SIZE = 640  # YOLOX's square input
PAD_GREY = 114
STRIDES = (8, 16, 32)
PERSON = 0  # the COCO class DWPose keeps
SCORE_MIN = 0.1  # boxes below this are not even compared
NMS_IOU = 0.45  # a box overlapping a better one more than this is the same person
PERSON_MIN = 0.3  # a person box kept for pose estimation
POSE_SIZE = (288, 384)  # RTMPose's crop (width, height)
BOX_PADDING = 1.25  # the crop is the person box widened by this much
SIMCC_SPLIT = 2.0  # SimCC bins per crop pixel
PIXEL_MEAN = np.array((123.675, 116.28, 103.53))
PIXEL_STD = np.array((58.395, 57.12, 57.375))
KEYPOINT_MIN = 0.3  # below this score a keypoint is not drawn (and the neck needs both shoulders above it)


def detector_input(image: np.ndarray) -> tuple[np.ndarray, float]:
    """HxWx3 uint8 -> (1x3x640x640 float32, scale): the picture scaled to fit 640 px, padded grey right and below."""
    height, width = image.shape[:2]
    scale = min(DETECT_SIZE / height, DETECT_SIZE / width)
    fitted = cv2.resize(image, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_LINEAR)
    padded = np.full((DETECT_SIZE, DETECT_SIZE, 3), PAD_GREY, np.uint8)
    padded[: fitted.shape[0], : fitted.shape[1]] = fitted
    return padded.transpose(2, 0, 1)[None].astype(np.float32), scale


def decode_boxes(raw: np.ndarray) -> np.ndarray:
    """YOLOX's Nx4 raw box outputs -> Nx4 (x0, y0, x1, y1) in the 640 px input: centres are cell offsets, sizes
    log-sizes, both in units of each anchor's stride."""
    cells, strides = [], []
    for stride in STRIDES:
        side = DETECT_SIZE // stride
        ys, xs = np.mgrid[0:side, 0:side]
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))  # row-major: x fastest
        strides.append(np.full((side * side, 1), stride))
    cell, stride = np.concatenate(cells), np.concatenate(strides)
    centre = (raw[:, :2] + cell) * stride
    size = np.exp(raw[:, 2:4]) * stride
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Indices of the boxes kept, best first: each drops the later ones that overlap it more than NMS_IOU (areas
    counted in whole pixels, +1, as YOLOX's demo does)."""
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order, kept = list(np.argsort(-scores, kind="stable")), []
    while order:
        best, rest = order[0], np.array(order[1:], dtype=int)
        kept.append(int(best))
        lo = np.maximum(boxes[best, :2], boxes[rest, :2])
        hi = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.maximum(0.0, hi - lo + 1), axis=1)
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = list(rest[overlap <= NMS_IOU])
    return kept


def people(raw: np.ndarray, scale: float) -> np.ndarray:
    """YOLOX's 1xNx85 output -> Mx4 person boxes (x0, y0, x1, y1) in the picture's pixels."""
    raw = raw[0].astype(np.float64)
    boxes = decode_boxes(raw[:, :4]) / scale
    scores = raw[:, 4:5] * raw[:, 5:]  # objectness x class score
    person = scores[:, PERSON]
    candidates = np.flatnonzero(person > SCORE_MIN)
    kept = candidates[non_max_suppression(boxes[candidates], person[candidates])]
    return boxes[kept[person[kept] > PERSON_MIN]]


def crop_box(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, size) of the crop for a person box: widened by BOX_PADDING, then to the crop's 3:4 shape."""
    centre = (box[:2] + box[2:]) / 2
    w, h = (box[2:] - box[:2]) * BOX_PADDING
    aspect = POSE_SIZE[0] / POSE_SIZE[1]
    size = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return centre, size


def pose_input(image: np.ndarray, centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The crop of `size` around `centre`, warped to POSE_SIZE and normalised: 3xHxW float32."""
    out_w, out_h = POSE_SIZE
    k = out_w / size[0]  # the crop keeps the 3:4 shape, so one scale serves both axes
    warp = np.array([[k, 0.0, out_w / 2 - k * centre[0]], [0.0, k, out_h / 2 - k * centre[1]]])
    crop = cv2.warpAffine(image, warp, (out_w, out_h), flags=cv2.INTER_LINEAR)
    return ((crop - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1).astype(np.float32)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SimCC NxKxBx, NxKxBy -> (NxKx2 positions in crop pixels, NxK scores): each axis's best bin, divided by the
    bins per pixel; the score is the weaker axis's peak, and a keypoint with no positive peak is at -1."""
    where = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    where[scores <= 0] = -1
    return where / SIMCC_SPLIT, scores


def to_picture(crop_xy: np.ndarray, centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Kx2 positions in the crop -> the picture's pixels."""
    return crop_xy / np.array(POSE_SIZE) * size + centre - size / 2


# COCO-WholeBody's 17 body points -> OpenPose's 18 (OpenPose adds the neck, between the shoulders, as point 1).
# OpenPose order: nose, neck, r shoulder, r elbow, r wrist, l shoulder, l elbow, l wrist, r hip, r knee, r ankle,
# l hip, l knee, l ankle, r eye, l eye, r ear, l ear. COCO: nose, l eye, r eye, l ear, r ear, l/r shoulder, l/r
# elbow, l/r wrist, l/r hip, l/r knee, l/r ankle.
OPENPOSE_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)  # -1: the neck
L_SHOULDER, R_SHOULDER = 5, 6
BODY, FEET, FACE, HANDS = slice(0, 17), slice(17, 23), slice(23, 91), slice(91, 133)  # COCO-WholeBody's parts


def openpose_order(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nx133x2, Nx133 COCO-WholeBody -> Nx134x2, Nx134: 18 OpenPose body points (the neck the shoulders' midpoint,
    scored 1 when both shoulders are seen, else 0), then the feet, face and hands as they were."""
    neck = keypoints[:, [L_SHOULDER, R_SHOULDER]].mean(axis=1, keepdims=True)
    seen = (scores[:, [L_SHOULDER, R_SHOULDER]] > KEYPOINT_MIN).all(axis=1, keepdims=True).astype(scores.dtype)
    body_xy = np.concatenate([keypoints[:, BODY], neck], axis=1)  # neck at index 17
    body_score = np.concatenate([scores[:, BODY], seen], axis=1)
    order = [17 if i < 0 else i for i in OPENPOSE_FROM_COCO]
    rest = slice(BODY.stop, None)
    return (
        np.concatenate([body_xy[:, order], keypoints[:, rest]], axis=1),
        np.concatenate([body_score[:, order], scores[:, rest]], axis=1),
    )
