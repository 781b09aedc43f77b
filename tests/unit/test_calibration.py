"""Calibration: ECE, the reliability diagram, and temperature scaling that really calibrates."""

from __future__ import annotations

import numpy as np
import pytest

from training.classifier.predict import apply_temperature, model_temperature
from training.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    save_reliability_diagram,
)
from training.evaluation.metrics import classification_metrics, save_classification_plots


def _overconfident(n: int, k: int, seed: int, sharpen: float = 4.0) -> tuple[np.ndarray, ...]:
    """Labels drawn from true class probabilities, and a 'model' that reports those
    probabilities sharpened (logits times ``sharpen``): right argmax, far too confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, size=(n, k))
    true_p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in true_p])
    model_logits = sharpen * logits
    model_p = np.exp(model_logits - model_logits.max(axis=1, keepdims=True))
    return y, model_p / model_p.sum(axis=1, keepdims=True)


def test_ece_of_a_perfectly_calibrated_and_of_a_known_miscalibrated_set() -> None:
    # every row predicted with confidence 0.8; 8 of 10 right -> ECE 0; all right -> ECE 0.2
    probs = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)
    assert expected_calibration_error(np.zeros(10, dtype=int), probs) == pytest.approx(0.2)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    y_val, p_val = _overconfident(2000, 3, seed=1)
    y_test, p_test = _overconfident(2000, 3, seed=2)
    t = fit_temperature(y_val, p_val)
    assert t == pytest.approx(4.0, rel=0.25)  # it finds the sharpening it has to undo
    before = expected_calibration_error(y_test, p_test)
    after = expected_calibration_error(y_test, apply_temperature(p_test, t))
    assert before > 0.1
    assert after < before / 3
    # the argmax, and so accuracy, is untouched
    assert (apply_temperature(p_test, t).argmax(axis=1) == p_test.argmax(axis=1)).all()


def test_temperature_is_one_when_there_is_nothing_to_fit_on() -> None:
    y, p = _overconfident(500, 2, seed=3)
    assert fit_temperature(y[:5], p[:5]) == 1.0  # too few rows
    assert fit_temperature(np.zeros(100, dtype=int), p[:100]) == 1.0  # a single class
    assert model_temperature({}) == 1.0  # models logged before calibration
    assert np.array_equal(apply_temperature(p, 1.0), p.astype(np.float32))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(p, 0.0)


def test_ece_is_a_metric_and_reliability_a_plot_of_every_evaluation(tmp_path) -> None:
    y, p = _overconfident(300, 2, seed=4)
    m = classification_metrics(y, p, ["a", "b"], n_bootstrap=0)
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p))
    names = {q.name for q in save_classification_plots(y, p, ["a", "b"], tmp_path)}
    assert "reliability.png" in names
    out = save_reliability_diagram(y, apply_temperature(p, 2.0), tmp_path / "r.png",
                                   uncalibrated=p, temperature=2.0)
    assert out.stat().st_size > 1000
