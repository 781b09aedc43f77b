"""Uncertainty of detector metrics: mAP50 with a bootstrap 95 % CI over test images.

Ultralytics reports one mAP50 for the test fields and no interval; with a few dozen fields the
number moves a lot from one draw of fields to another. Here every test image's predictions are
matched to its labelled boxes once (IoU >= 0.5, greedy by confidence, per class, as VOC/COCO
AP50 does), then images are resampled with replacement and AP50 is recomputed from the pooled
matches of each resample (101-point interpolated precision, averaged over the classes that have
labelled boxes; the same integral as Ultralytics', so perfect detections score 0.995). The
gate reads ``map50_ci_low`` / ``map50_ci_high`` like the classifier's CIs.
Only numpy: the predictions come from the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ImageMatches", "ap50", "bootstrap_map50", "match_image"]

IOU = 0.5


@dataclass(frozen=True)
class ImageMatches:
    """One image's detections, judged: per class, (confidence, is-true-positive) and #labels."""

    scores: dict[int, np.ndarray]
    true_positive: dict[int, np.ndarray]
    n_labels: dict[int, int]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def match_image(pred_boxes: np.ndarray, pred_cls: np.ndarray, pred_conf: np.ndarray,
                true_boxes: np.ndarray, true_cls: np.ndarray) -> ImageMatches:
    """Greedy matching by confidence: a prediction is a true positive when it overlaps a
    still-unmatched labelled box of its class with IoU >= 0.5. Boxes are ``x1 y1 x2 y2``."""
    pred_boxes, true_boxes = np.asarray(pred_boxes, float), np.asarray(true_boxes, float)
    pred_cls, true_cls = np.asarray(pred_cls, int), np.asarray(true_cls, int)
    pred_conf = np.asarray(pred_conf, float)
    scores, tps, n_labels = {}, {}, {}
    for c in set(pred_cls.tolist()) | set(true_cls.tolist()):
        truth = true_boxes[true_cls == c]
        idx = np.flatnonzero(pred_cls == c)
        idx = idx[np.argsort(-pred_conf[idx], kind="stable")]
        used = np.zeros(len(truth), dtype=bool)
        tp = np.zeros(len(idx), dtype=bool)
        for k, i in enumerate(idx):
            if len(truth) == 0:
                break
            overlap = _iou(pred_boxes[i], truth)
            overlap[used] = -1.0
            j = int(np.argmax(overlap))
            if overlap[j] >= IOU:
                used[j], tp[k] = True, True
        scores[c], tps[c], n_labels[c] = pred_conf[idx], tp, len(truth)
    return ImageMatches(scores, tps, n_labels)


def ap50(images: Sequence[ImageMatches]) -> float:
    """mAP50 over the classes with labelled boxes in ``images`` (nan when there are none)."""
    classes = {c for im in images for c, n in im.n_labels.items() if n}
    aps = []
    for c in classes:
        n = sum(im.n_labels.get(c, 0) for im in images)
        conf = np.concatenate([im.scores.get(c, np.empty(0)) for im in images])
        tp = np.concatenate([im.true_positive.get(c, np.empty(0, bool)) for im in images])
        order = np.argsort(-conf, kind="stable")
        tp_cum = np.cumsum(tp[order])
        fp_cum = np.cumsum(~tp[order])
        recall = np.concatenate([[0.0], tp_cum / n, [1.0]])
        precision = np.concatenate([[1.0], tp_cum / np.maximum(tp_cum + fp_cum, 1e-12), [0.0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
        grid = np.linspace(0, 1, 101)
        aps.append(float(np.trapezoid(np.interp(grid, recall, precision), grid)))
    return float(np.mean(aps)) if aps else math.nan


def bootstrap_map50(images: Sequence[ImageMatches], n: int = 1000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(mAP50, CI low, CI high): the percentile 95 % interval over image resamples."""
    point = ap50(images)
    rng = np.random.default_rng(seed)
    values = [ap50([images[i] for i in rng.integers(0, len(images), len(images))])
              for _ in range(n)] if images else []
    values = np.array([v for v in values if math.isfinite(v)])
    if values.size == 0:
        return point, math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)
