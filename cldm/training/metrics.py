"""How well a picture follows its hint: F1 of its canny edges against the reference edges, with a tolerance."""

from __future__ import annotations

import cv2
import numpy as np

from cldm.training.shapes import CANNY_HIGH, CANNY_LOW

EDGE_TOLERANCE_PX = 2  # an edge pixel counts as matched when one of the other side lies within this distance


def canny_edges(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 picture -> HxW bool edges, with the thresholds the canny hints were made with."""
    return cv2.Canny(np.ascontiguousarray(image), CANNY_LOW, CANNY_HIGH) > 0


def _near(edges: np.ndarray, tolerance: int) -> np.ndarray:
    k = 2 * tolerance + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.dilate(edges.astype(np.uint8), kernel) > 0


def edge_f1(pred: np.ndarray, ref: np.ndarray, tolerance: int = EDGE_TOLERANCE_PX) -> float:
    """F1 of two HxW bool edge maps: precision = predicted edges near a reference edge, recall the other way.

    Both empty counts as a perfect match; one empty as zero.
    """
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    precision = float((pred & _near(ref, tolerance)).sum()) / n_pred
    recall = float((ref & _near(pred, tolerance)).sum()) / n_ref
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
