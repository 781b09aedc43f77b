"""Classification metrics, bootstrap CIs, plots and comparison tables on hand-checkable cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from training.evaluation.metrics import (
    CI_METRICS,
    bootstrap_ci,
    classification_metrics,
    comparison_table,
    majority_baseline,
    save_classification_plots,
    save_comparison,
)

CLASSES4 = ["Benign", "Early", "Pre", "Pro"]


def onehot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[labels]


def noisy_probs(n: int, k: int, seed: int, signal: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.random((n, k))
    p[np.arange(n), y] += signal
    return y, p / p.sum(axis=1, keepdims=True)


def test_perfect_predictor_scores_one_everywhere() -> None:
    y = np.array([0, 1, 2, 3] * 5)
    m = classification_metrics(y, onehot(y, 4), CLASSES4, n_bootstrap=200)
    for key, value in m.items():
        if key == "n_test":
            assert value == 20
        elif key.startswith("support__"):
            assert value == 5
        elif key == "ece":  # calibration error: confident and right -> 0
            assert value == pytest.approx(0.0)
        else:
            assert value == pytest.approx(1.0), key


def test_constant_predictor_has_balanced_accuracy_one_over_k() -> None:
    y = np.array([0] * 10 + [1] * 5 + [2] * 3 + [3] * 2)
    m = classification_metrics(y, np.tile([0.1, 0.2, 0.6, 0.1], (len(y), 1)), CLASSES4,
                               n_bootstrap=0)
    assert m["balanced_accuracy"] == pytest.approx(1 / 4)
    assert m["accuracy"] == pytest.approx(3 / 20)
    assert m["recall__Pre"] == 1.0 and m["recall__Benign"] == 0.0
    assert m["specificity__Pre"] == 0.0 and m["specificity__Benign"] == 1.0
    assert m["roc_auc"] == pytest.approx(0.5)  # constant scores rank nothing
    assert not any(k.endswith("_ci_low") for k in m)  # n_bootstrap=0: no intervals


def test_specificity_from_a_known_confusion_matrix() -> None:
    # true\pred   a  b  c
    #    a        3  1  0
    #    b        2  4  0
    #    c        0  1  5       -> TN/(TN+FP): a 10/12, b 8/10, c 10/10
    rows = [(0, 0)] * 3 + [(0, 1)] + [(1, 0)] * 2 + [(1, 1)] * 4 + [(2, 1)] + [(2, 2)] * 5
    y_true = np.array([t for t, _ in rows])
    y_pred = np.array([p for _, p in rows])
    m = classification_metrics(y_true, onehot(y_pred, 3), ["a", "b", "c"], n_bootstrap=0)
    assert m["specificity__a"] == pytest.approx(10 / 12)
    assert m["specificity__b"] == pytest.approx(8 / 10)
    assert m["specificity__c"] == pytest.approx(1.0)
    assert m["specificity_macro"] == pytest.approx((10 / 12 + 0.8 + 1) / 3)
    assert m["precision__b"] == pytest.approx(4 / 6)
    assert m["recall__a"] == pytest.approx(3 / 4)
    assert m["support__c"] == 6
    assert m["accuracy"] == pytest.approx(12 / 16)


def test_binary_auc_uses_the_positive_class_column() -> None:
    y, p = noisy_probs(300, 2, seed=3, signal=0.3)
    classes = ["all", "hem"]
    m_hem = classification_metrics(y, p, classes, "hem", n_bootstrap=0)
    m_all = classification_metrics(y, p, classes, "all", n_bootstrap=0)
    assert m_hem["roc_auc"] == pytest.approx(roc_auc_score(y == 1, p[:, 1]))
    assert m_all["roc_auc"] == pytest.approx(roc_auc_score(y == 0, p[:, 0]))
    with pytest.raises(ValueError, match="positive_class"):
        classification_metrics(y, p, classes, "blast")


def test_multiclass_auc_is_sklearn_ovr_macro() -> None:
    y, p = noisy_probs(400, 4, seed=4, signal=0.4)
    m = classification_metrics(y, p, CLASSES4, n_bootstrap=0)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, p.argmax(1), average="weighted"))


def test_missing_class_drops_roc_auc_instead_of_failing() -> None:
    y = np.array([0, 1, 0, 1, 0, 1])  # class 2 never occurs in the test rows
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2],
                  [0.3, 0.3, 0.4], [0.6, 0.2, 0.2], [0.1, 0.8, 0.1]])
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=100)
    assert "roc_auc" not in m and "roc_auc_ci_low" not in m
    assert "roc_auc__c" not in m and m["roc_auc__a"] == pytest.approx(1.0)
    assert all(math.isfinite(v) for v in m.values())
    # binary with a single class in y_true: no AUC either
    m2 = classification_metrics(np.zeros(5, int), np.tile([0.6, 0.4], (5, 1)), ["x", "y"],
                                n_bootstrap=50)
    assert "roc_auc" not in m2


def test_labels_may_be_class_names_and_bad_inputs_are_refused() -> None:
    y = np.array(["a", "b", "b"])
    m = classification_metrics(y, onehot(np.array([0, 1, 1]), 2), ["a", "b"], n_bootstrap=0)
    assert m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.array([0, 5]), np.ones((2, 2)) / 2, ["a", "b"])


@pytest.mark.parametrize("k", [2, 4])
def test_vectorised_intervals_match_the_generic_bootstrap(k: int) -> None:
    y, p = noisy_probs(300, k, seed=k, signal=0.5)
    p = np.round(p, 2)  # ties in scores: AUC must count them half, as sklearn does
    classes = [f"c{i}" for i in range(k)]
    m = classification_metrics(y, p, classes, n_bootstrap=150, seed=11)
    labels = list(range(k))
    fns = {
        "accuracy": lambda t, q: accuracy_score(t, q.argmax(1)),
        "balanced_accuracy": lambda t, q: balanced_accuracy_score(t, q.argmax(1)),
        "f1_macro": lambda t, q: f1_score(t, q.argmax(1), labels=labels, average="macro",
                                          zero_division=0),
        "roc_auc": (lambda t, q: roc_auc_score(t == 1, q[:, 1])) if k == 2 else (
            lambda t, q: np.mean([roc_auc_score(t == j, q[:, j]) for j in labels])),
    }
    for name in CI_METRICS:
        low, high = bootstrap_ci(fns[name], y, p, n=150, seed=11)
        assert m[f"{name}_ci_low"] == pytest.approx(low, abs=1e-12), name
        assert m[f"{name}_ci_high"] == pytest.approx(high, abs=1e-12), name


def test_intervals_contain_the_estimate_and_shrink_with_more_rows() -> None:
    widths = []
    for n in (100, 2500):
        y, p = noisy_probs(n, 3, seed=5, signal=0.35)
        m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=500)
        for name in CI_METRICS:
            assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], (n, name)
        widths.append(m["accuracy_ci_high"] - m["accuracy_ci_low"])
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 5x narrower expected


def test_intervals_are_seeded() -> None:
    y, p = noisy_probs(200, 2, seed=6, signal=0.3)
    a = classification_metrics(y, p, ["x", "y"], seed=1)
    b = classification_metrics(y, p, ["x", "y"], seed=1)
    c = classification_metrics(y, p, ["x", "y"], seed=2)
    assert a == b
    assert a["accuracy_ci_low"] != c["accuracy_ci_low"] or (
        a["accuracy_ci_high"] != c["accuracy_ci_high"])


def test_majority_baseline() -> None:
    y_train = np.array([0, 0, 0, 1, 2])
    y_test = np.array([0, 1, 1, 2])
    b = majority_baseline(y_train, y_test, ["a", "b", "c"])
    assert b["majority_class_index"] == 0
    assert b["accuracy"] == pytest.approx(1 / 4)
    assert b["balanced_accuracy"] == pytest.approx(1 / 3)
    assert b["f1_macro"] == pytest.approx((2 * 1 / (1 + 4)) / 3)


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_classification_plots_are_pngs(tmp_path) -> None:
    y, p = noisy_probs(120, 4, seed=8)
    paths = save_classification_plots(y, p, CLASSES4, tmp_path / "plots", title="unit")
    assert [x.name for x in paths] == ["confusion_matrix.png", "roc_curves.png", "reliability.png"]
    for path in paths:
        w, h = _valid_png(path)
        assert w > 300 and h > 300
    # a class absent from y_true still plots (its curve is listed as undefined)
    y[y == 3] = 2
    save_classification_plots(y, p, CLASSES4, tmp_path / "missing")
    _valid_png(tmp_path / "missing" / "roc_curves.png")


def test_comparison_table_and_files(tmp_path) -> None:
    y, p = noisy_probs(200, 2, seed=9)
    m = classification_metrics(y, p, ["all", "hem"], "all")
    rows = [
        {"architecture": "efficientnet_b3", "split_kind": "subject", "metrics": m,
         "trainable_params": 10_700_000, "train_time_s": 321.0, "latency_ms": 14.2},
        {"architecture": "vgg16", "split_kind": "image", **m, "params": 14_700_000},
        {"architecture": "majority baseline", "split_kind": "subject",
         **majority_baseline(y, y, ["all", "hem"])},
    ]
    df = comparison_table(rows)
    assert isinstance(df, pd.DataFrame) and len(df) == 3
    assert df.loc[0, "accuracy"] == pytest.approx(m["accuracy"])
    assert df.loc[0, "accuracy_ci_low"] == pytest.approx(m["accuracy_ci_low"])
    assert df.loc[1, "trainable_params"] == 14_700_000
    assert math.isnan(df.loc[2, "accuracy_ci_low"])
    paths = save_comparison(rows, tmp_path)
    assert [x.name for x in paths] == ["comparison.csv", "comparison.md", "comparison.png"]
    assert pd.read_csv(paths[0]).shape == df.shape
    md = paths[1].read_text()
    assert md.count("\n|") >= 4 and "efficientnet_b3" in md and "subject" in md
    assert f"{m['accuracy']:.4f} [{m['accuracy_ci_low']:.4f}, {m['accuracy_ci_high']:.4f}]" in md
    _valid_png(paths[2])
    with pytest.raises(ValueError, match="architecture"):
        comparison_table([{"accuracy": 0.5}])


def _subject_signal(n_subjects: int = 10, per_subject: int = 60, seed: int = 3):
    """Cells whose correctness is a property of their subject: on some patients the model is
    right on almost every cell, on others wrong on most (what a colour cast does)."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat(np.arange(n_subjects), per_subject)
    y = np.repeat(np.arange(n_subjects) % 2, per_subject)  # one class per subject, as in C-NMC
    skill = rng.uniform(0.1, 0.95, n_subjects)[subjects]
    right = rng.random(len(y)) < skill
    pred = np.where(right, y, 1 - y)
    p = np.full((len(y), 2), 0.2)
    p[np.arange(len(y)), pred] = 0.8
    return y, p, np.array([f"s{s}" for s in subjects])


def test_cluster_bootstrap_is_wider_than_the_cell_level_one() -> None:
    y, p, subjects = _subject_signal()
    m = classification_metrics(y, p, ["all", "hem"], n_bootstrap=400, groups=subjects)
    assert m["n_subjects"] == 10 and m["n_subjects__all"] == 5 and m["n_subjects__hem"] == 5
    assert m["ci_units"] == 10
    for name in ("accuracy", "balanced_accuracy"):
        subject_w = m[f"{name}_ci_high"] - m[f"{name}_ci_low"]
        cell_w = m[f"{name}_cell_ci_high"] - m[f"{name}_cell_ci_low"]
        assert subject_w > 2 * cell_w, (name, subject_w, cell_w)
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]
    plain = classification_metrics(y, p, ["all", "hem"], n_bootstrap=400)
    assert plain["accuracy_ci_low"] == m["accuracy_cell_ci_low"]  # the same row resamples
    assert "n_subjects" not in plain and "ci_units" not in plain


def test_grouped_vectorised_intervals_match_the_generic_bootstrap() -> None:
    y, p, subjects = _subject_signal(n_subjects=7, per_subject=23, seed=4)
    m = classification_metrics(y, p, ["a", "b"], n_bootstrap=120, seed=5, groups=subjects)
    low, high = bootstrap_ci(lambda t, q: balanced_accuracy_score(t, q.argmax(1)), y, p, n=120,
                             seed=5, groups=subjects)
    assert (m["balanced_accuracy_ci_low"], m["balanced_accuracy_ci_high"]) == pytest.approx(
        (low, high), abs=1e-12)


def test_subject_counts_per_split_and_class() -> None:
    from training.evaluation.metrics import subject_groups, subjects_per_class

    rows = pd.DataFrame({
        "split": ["train"] * 4 + ["test"] * 3,
        "label": ["all", "all", "hem", "hem", "all", "all", "hem"],
        "subject_id": ["a", "b", "c", "c", "d", "d", None],
    })
    counts = subjects_per_class(rows, ["all", "hem"])
    assert counts == {"n_subjects_test": 2.0, "n_subjects_test__all": 1.0,
                      "n_subjects_test__hem": 1.0, "n_subjects_train": 3.0,
                      "n_subjects_train__all": 2.0, "n_subjects_train__hem": 1.0}
    groups = subject_groups(rows)
    assert list(groups[-3:]) == ["subject:d", "subject:d", "row:6"]
    assert subject_groups(rows.assign(subject_id=None)) is None
