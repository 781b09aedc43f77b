"""The gate's verdict (pure: no registry) and the paired test it can require."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.metrics import paired_bootstrap_delta
from training.promotion.gate import gate
from training.records import Candidate


def _cand(score: float, champ: float, paired: tuple[float, float, float] | None) -> Candidate:
    metrics = {"balanced_accuracy": score}
    if paired:
        d, lo, hi = paired
        metrics |= {"paired_balanced_accuracy_delta": d,
                    "paired_balanced_accuracy_delta_ci_low": lo,
                    "paired_balanced_accuracy_delta_ci_high": hi,
                    "paired_balanced_accuracy_n_units": 12.0}
    return Candidate(family="classifier", architecture="a", run_id="r", model_uri="m",
                     metrics=metrics, split_kind="subject", test_set_sha256="t",
                     dataset_version=1, champion_version="4",
                     champion_metrics={"balanced_accuracy": champ})


def test_paired_ci_is_reported_but_does_not_decide_by_default(cfg) -> None:
    passed, reasons = gate(cfg, _cand(0.82, 0.80, (0.02, -0.03, 0.07)))
    assert passed
    assert "paired balanced_accuracy difference vs champion v4" in reasons[-1]
    assert "informational" in reasons[-1]


@pytest.mark.parametrize(("paired", "expected"), [
    ((0.02, -0.03, 0.07), False),  # better on the point estimate, but the CI holds 0: noise
    ((0.06, 0.01, 0.11), True),
    (None, False),  # required but not measured: refused, with the reason
])
def test_required_paired_improvement_decides(cfg, paired, expected) -> None:
    cfg.gate.require_paired_improvement = True
    passed, reasons = gate(cfg, _cand(0.82, 0.80, paired))
    assert passed is expected, reasons


def test_paired_bootstrap_of_a_clearly_better_model_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, y, 1 - y)
    poor = np.where(rng.random(400) < 0.7, y, 1 - y)
    out = paired_bootstrap_delta("balanced_accuracy", y, good, poor, n=300)
    assert out["delta"] > 0.1 and out["delta_ci_low"] > 0
    same = paired_bootstrap_delta("accuracy", y, good, good, n=100)
    assert same["delta"] == same["delta_ci_low"] == same["delta_ci_high"] == 0.0


def test_resampling_subjects_widens_the_interval_when_subjects_differ() -> None:
    """Cells of one subject share their errors; resampling cells hides it, subjects do not."""
    rng = np.random.default_rng(2)
    subjects = np.repeat(np.arange(8), 50)
    y = rng.integers(0, 2, 400)
    wins = rng.random(8) < 0.5  # the candidate is right on whole subjects, wrong on others
    a = np.where(wins[subjects], y, 1 - y)
    b = np.where(~wins[subjects], y, 1 - y)
    cells = paired_bootstrap_delta("accuracy", y, a, b, n=300)
    grouped = paired_bootstrap_delta("accuracy", y, a, b, groups=subjects, n=300)
    assert grouped["n_units"] == 8 and cells["n_units"] == 400
    def width(o: dict) -> float:
        return o["delta_ci_high"] - o["delta_ci_low"]

    assert width(grouped) > 2 * width(cells)


def _with_subjects(all_: int, hem: int) -> Candidate:
    cand = _cand(0.82, 0.80, None)
    cand.metrics |= {"n_subjects_test__all": float(all_), "n_subjects_test__hem": float(hem)}
    return cand


def test_too_few_test_subjects_of_a_class_refuse_the_candidate(cfg) -> None:
    """C-NMC fold 1's subject split: 2 patients with ALL, 1 healthy donor in the test split."""
    cfg.gate.min_test_subjects_per_class = 3
    passed, reasons = gate(cfg, _with_subjects(2, 1))
    assert not passed
    text = next(r for r in reasons if "test subjects per class" in r)
    assert "all: 2, hem: 1" in text and "all, hem below the minimum 3" in text
    passed, _ = gate(cfg, _with_subjects(3, 3))
    assert passed
    cfg.gate.allow_few_subjects = True  # synthetic demo data: promoted, and the reason says so
    passed, reasons = gate(cfg, _with_subjects(2, 1))
    assert passed and any("allowed: gate.allow_few_subjects" in r for r in reasons)


def test_candidates_without_subjects_are_not_judged_on_them(cfg) -> None:
    cfg.gate.min_test_subjects_per_class = 3
    passed, reasons = gate(cfg, _cand(0.82, 0.80, None))
    assert passed and not any("subjects" in r for r in reasons)


def test_the_demo_and_e2e_profiles_allow_their_few_synthetic_subjects() -> None:
    from pathlib import Path

    from training.config import load_config

    root = Path(__file__).resolve().parents[2]
    for profile in ("configs/demo.yaml", "tests/e2e/tiny.yaml"):
        assert load_config(root / profile).gate.allow_few_subjects, profile
    assert not load_config(root / "configs/leukoflow.yaml").gate.allow_few_subjects


def test_every_resample_keeps_the_class_mix() -> None:
    """Two healthy donors beside ten patients: a plain cluster bootstrap draws no donor in
    (10/12)^12 of its resamples, about one in nine; stratified, every resample has both
    classes, in the test set's proportions of subjects."""
    from training.evaluation.metrics import _resample_weights

    y = np.array(["all"] * 100 + ["hem"] * 20)
    subjects = np.array([f"p{i // 10}" for i in range(100)] + [f"h{i // 10}" for i in range(20)])
    drawn_hem = []
    for w in _resample_weights(y, subjects, 500, seed=3):
        drawn_hem.extend(w[:, 100:].sum(axis=1))
        assert np.allclose(w[:, :100].sum(axis=1), 100)  # ten patient subjects of 10 cells
    assert min(drawn_hem) == 20  # two donors of 10 cells drawn every time
    rows = list(_resample_weights(y, None, 200, seed=3))[0]
    assert np.allclose(rows[:, 100:].sum(axis=1), 20)  # row level: 20 hem rows every time


def test_row_ids_make_the_intervals_independent_of_row_order() -> None:
    """Training reads its test rows in manifest order, `leukoflow evaluate` in folder order:
    with the images' ids the same images get the same intervals, whatever their order."""
    from training.evaluation.metrics import classification_metrics

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 200), 0.01, 0.99)
    prob = np.stack([1 - p1, p1], axis=1)
    ids = np.array([f"{i:064x}" for i in rng.permutation(10_000)[:200]])
    order = rng.permutation(200)
    kw = {"classes": ["all", "hem"], "n_bootstrap": 300}
    a = classification_metrics(y, prob, row_ids=ids, **kw)
    b = classification_metrics(y[order], prob[order], row_ids=ids[order], **kw)
    assert a.keys() == b.keys()
    assert all(a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12) for k in a)  # sums' order only
    plain = classification_metrics(y[order], prob[order], **kw)  # without ids: order matters
    assert plain["accuracy_ci_low"] != a["accuracy_ci_low"] or \
        plain["roc_auc_ci_high"] != a["roc_auc_ci_high"]
