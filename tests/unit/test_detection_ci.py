"""mAP50 from per-image matches, and its bootstrap interval over images."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.detection import ap50, bootstrap_map50, match_image

BOX = np.array([[10, 10, 50, 50], [60, 60, 90, 90]], dtype=float)


def _image(pred: np.ndarray, conf: list[float], truth: np.ndarray = BOX):
    return match_image(pred, np.zeros(len(pred)), np.array(conf), truth, np.zeros(len(truth)))


def test_perfect_detections_score_the_top_with_a_degenerate_interval() -> None:
    images = [_image(BOX + 1, [0.9, 0.8]) for _ in range(6)]
    # 0.995, not 1: the 101-point integral Ultralytics uses ends on precision 0 at recall 1
    assert ap50(images) == pytest.approx(0.995)
    assert bootstrap_map50(images, n=50) == pytest.approx((0.995, 0.995, 0.995))


def test_a_miss_and_a_false_alarm_lower_ap_and_widen_the_interval() -> None:
    good = [_image(BOX + 1, [0.9, 0.8]) for _ in range(5)]
    bad = [_image(np.array([[100, 100, 120, 120]]), [0.95]) for _ in range(5)]  # wrong place
    point, low, high = bootstrap_map50(good + bad, n=300, seed=1)
    assert 0.2 < point < 0.8
    assert low < point < high and high - low > 0.1


def test_a_box_matches_one_label_only_and_needs_iou_half() -> None:
    twice = _image(np.array([[10, 10, 50, 50], [11, 11, 51, 51]]), [0.9, 0.8],
                   truth=BOX[:1])
    assert twice.true_positive[0].tolist() == [True, False]  # the duplicate is a false alarm
    shifted = _image(np.array([[30, 30, 70, 70]]), [0.9], truth=BOX[:1])  # IoU 400/2800
    assert shifted.true_positive[0].tolist() == [False]


def test_no_labels_anywhere_is_undefined_not_zero() -> None:
    empty = _image(np.zeros((0, 4)), [], truth=np.zeros((0, 4)))
    assert np.isnan(ap50([empty]))
