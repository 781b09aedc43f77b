"""Class balancing by subject as well as by class (per-image sample weights)."""

from __future__ import annotations

import numpy as np
import pytest

from training.classifier.architectures import resolve_hparams
from training.classifier.inputs import balanced_class_weights, subject_balanced_weights
from training.config import load_config


def _skewed() -> tuple[np.ndarray, list]:
    """Class 0: subject A 90 cells, B 10; class 1: subject C 15, D 5, and 5 without an id."""
    y = np.array([0] * 100 + [1] * 25)
    subjects = ["A"] * 90 + ["B"] * 10 + ["C"] * 15 + ["D"] * 5 + [None, float("nan"), "", None,
                                                                  None]
    return y, subjects


def _totals(w: np.ndarray, y: np.ndarray, subjects: list) -> dict:
    keys = [str(s) if isinstance(s, str) and s else f"img{i}" for i, s in enumerate(subjects)]
    out: dict = {}
    for wi, c, s in zip(w, y, keys, strict=True):
        out[(int(c), s)] = out.get((int(c), s), 0.0) + wi
    return out


def test_each_subject_of_a_class_counts_equally() -> None:
    y, subjects = _skewed()
    w = subject_balanced_weights(y, subjects, 2)
    assert w.mean() == pytest.approx(1.0)
    totals = _totals(w, y, subjects)
    assert totals[(0, "A")] == pytest.approx(totals[(0, "B")])  # 90 cells weigh as 10
    class1 = [v for (c, _), v in totals.items() if c == 1]
    assert len(class1) == 7  # C, D and five images that are subjects of their own
    assert np.allclose(class1, class1[0])
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())  # and classes balanced
    # without it the largest subject dominates its class
    plain = np.array([balanced_class_weights(y, 2)[c] for c in y])
    plain_totals = _totals(plain, y, subjects)
    assert plain_totals[(0, "A")] == pytest.approx(9 * plain_totals[(0, "B")])


def test_subjects_only_keeps_the_class_shares() -> None:
    y, subjects = _skewed()
    w = subject_balanced_weights(y, subjects, 2, balance_classes=False)
    assert w[y == 0].sum() == pytest.approx(100) and w[y == 1].sum() == pytest.approx(25)
    totals = _totals(w, y, subjects)
    assert totals[(0, "A")] == pytest.approx(totals[(0, "B")]) == pytest.approx(50)


def test_config_switch_reaches_the_hyperparameters(tmp_path) -> None:
    cfg = load_config(home=str(tmp_path))
    assert resolve_hparams(cfg, "vgg16")["balance_subjects"] is False
    cfg = load_config(home=str(tmp_path), classifier={"balance_subjects": True})
    assert resolve_hparams(cfg, "vgg16")["balance_subjects"] is True
    with pytest.raises(ValueError, match="subject ids"):
        subject_balanced_weights(np.zeros(3, int), ["a"], 2)
