"""The numpy side of the ONNX detector: letterbox, NMS, and the box comparison that gates a
detector export (the export itself is in tests/integration/test_onnx_export.py)."""

from __future__ import annotations

import numpy as np

from training.detector.onnx_runtime import letterbox, nms
from training.publish.export import compare_boxes


def test_letterbox_keeps_the_aspect_and_centres_the_image() -> None:
    rgb = np.full((50, 100, 3), 200, dtype=np.uint8)
    x, gain, (left, top) = letterbox(rgb, 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    assert gain == 0.64 and left == 0 and top == 16
    assert np.isclose(x[0, :, 0, 0], 114 / 255).all()  # padding, Ultralytics' grey
    assert np.isclose(x[0, :, 32, 32], 200 / 255).all()


def test_nms_drops_overlaps_and_keeps_the_best_first() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.7], dtype=np.float32)
    assert nms(boxes, scores, iou=0.5).tolist() == [1, 2]


def _box(x1: float, conf: float, label: str = "WBC") -> dict:
    return {"x1": x1, "y1": 0.0, "x2": x1 + 10, "y2": 10.0, "label": label, "confidence": conf}


def test_compare_boxes_names_what_differs() -> None:
    same = [_box(0, 0.9), _box(50, 0.6)]
    assert compare_boxes(same, [_box(0.1, 0.9), _box(50, 0.605)], 0.9, 0.01, 0.25) == []
    assert compare_boxes(same, [_box(0, 0.9)], 0.9, 0.01, 0.25)  # a box missing
    assert compare_boxes(same, [_box(0, 0.9), _box(53, 0.6)], 0.9, 0.01, 0.25)  # moved
    assert compare_boxes(same, [_box(0, 0.9), _box(50, 0.6, "RBC")], 0.9, 0.01, 0.25)
    assert compare_boxes(same, [_box(0, 0.8), _box(50, 0.6)], 0.9, 0.01, 0.25)  # score
    # a box at the threshold may be on one side only
    assert compare_boxes([_box(0, 0.255)], [], 0.9, 0.01, 0.25) == []
