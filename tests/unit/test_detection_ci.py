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


# ------------------------------------------------ every gated metric, CIs, the paired test
def test_iou_thresholds_separate_map50_from_map50_95() -> None:
    from training.evaluation.detection import detection_scores

    exact = detection_scores([_image(BOX.copy(), [0.9, 0.8]) for _ in range(4)])
    assert exact == pytest.approx({"precision": 1.0, "recall": 1.0, "map50": 0.995,
                                   "map50_95": 0.995})
    # shifted by one pixel: IoU 1521/1679 = 0.906 passes 0.50..0.90 (9 of 10 thresholds)
    shifted = detection_scores([_image(BOX[:1] + 1, [0.9], truth=BOX[:1]) for _ in range(4)])
    assert shifted["map50"] == pytest.approx(0.995)
    assert shifted["map50_95"] == pytest.approx(0.995 * 0.9)


def test_intervals_cover_every_gated_metric() -> None:
    from training.evaluation.detection import DETECTION_METRICS, detection_intervals

    good = [_image(BOX + 1, [0.9, 0.8]) for _ in range(6)]
    bad = [_image(np.array([[100, 100, 120, 120]]), [0.95]) for _ in range(6)]
    out = detection_intervals(good + bad, n=200, seed=2)
    assert out["n_test_images"] == 12
    for m in DETECTION_METRICS:
        assert out[f"{m}_ci_low"] <= out[f"{m}_image_level"] <= out[f"{m}_ci_high"], m
    assert out["map50_ci_high"] - out["map50_ci_low"] > 0.1


def _paired_candidate(delta: dict[str, float]):
    from training.records import Candidate

    champ = {"map50": 0.5, "map50_ci_low": 0.4, "map50_ci_high": 0.6}
    return Candidate(family="detector", architecture="yolov8n", run_id="r", model_uri="m",
                     metrics={"map50": 0.5 + delta["delta"], **{f"paired_map50_{k}": v
                                                                for k, v in delta.items()}},
                     split_kind="image", test_set_sha256="t" * 64, dataset_version=1,
                     champion_version="1", champion_metrics=champ)


def test_paired_delta_resamples_images_and_the_gate_acts_on_it() -> None:
    from training.config import load_config
    from training.evaluation.detection import paired_detection_delta
    from training.promotion.gate import gate

    found = [_image(BOX + 1, [0.9, 0.8]) for _ in range(8)]
    half = [_image(BOX[:1] + 1, [0.9]) for _ in range(8)]  # misses one cell in each image
    better = paired_detection_delta("map50", found, half, n=200)
    assert better["n_units"] == 8 and better["delta"] > 0.2
    assert 0 < better["delta_ci_low"] <= better["delta"] <= better["delta_ci_high"]
    same = paired_detection_delta("map50", found, found, n=200)
    assert same == pytest.approx({"delta": 0.0, "delta_ci_low": 0.0, "delta_ci_high": 0.0,
                                  "n_units": 8.0})
    with pytest.raises(ValueError, match="same test images"):
        paired_detection_delta("map50", found, half[:3])

    cfg = load_config(gate={"require_paired_improvement": True, "detector_floor": 0.0})
    ok, reasons = gate(cfg, _paired_candidate(same))  # a retrained twin: noise, not progress
    assert not ok and "lower end <= required improvement" in reasons[-1]
    ok, reasons = gate(cfg, _paired_candidate(better))
    assert ok, reasons
    off = load_config(gate={"detector_floor": 0.0})
    ok, reasons = gate(off, _paired_candidate(same))
    assert ok and "informational" in reasons[-1]


def test_detector_comparison_table_has_ci_and_per_class_columns(tmp_path) -> None:
    import pandas as pd

    from training.evaluation.detection import save_detection_comparison

    rows = [{"architecture": arch, "split_kind": "image", "metrics": {
        "precision": 0.5, "recall": 0.4, "map50": m, "map50_ci_low": m - 0.1,
        "map50_ci_high": m + 0.1, "map50_95": m / 2, "map50__WBC": m, "map50__RBC": m / 3,
        "val/map50": m, "total_params": p, "train_time_s": 3.0, "latency_ms_per_image": 9.0,
        "n_test_images": 12.0}} for arch, m, p in (("yolov5nu", 0.6, 2.6e6),
                                                   ("yolov8n", 0.7, 3.0e6))]
    paths = save_detection_comparison(rows, tmp_path)
    assert [p.name for p in paths] == ["detector_comparison.csv", "detector_comparison.md",
                                       "detector_comparison.png"]
    df = pd.read_csv(paths[0])
    assert list(df["architecture"]) == ["yolov5nu", "yolov8n"]
    assert {"map50__WBC", "map50__RBC", "latency_ms", "val/map50"} <= set(df.columns)
    assert df["latency_ms"].tolist() == [9.0, 9.0]
    md = paths[1].read_text()
    assert "0.7000 [0.600, 0.800]" in md and "| Architecture | RBC | WBC |" in md
    assert "| yolov8n | 0.233 / - / - / - | 0.700 / - / - / - |" in md
