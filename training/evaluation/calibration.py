"""Calibration: does a predicted 0.9 come true nine times in ten? ECE, reliability, temperature.

A lab reads the served probability as a confidence; a network trained to near-zero training
loss says 0.99 where it is right 80 % of the time. This module measures that (expected
calibration error, a reliability diagram) and fixes it the standard way: temperature scaling
(Guo et al., ICML 2017), one scalar ``T`` fitted on validation rows by minimising the negative
log-likelihood of ``softmax(log p / T)``. Dividing all log-probabilities by one positive number
keeps their order, so the argmax (accuracy, F1, confusion matrix) and binary ROC AUC do not
change: only the probabilities become honest. The scaling itself is
:func:`training.classifier.predict.apply_temperature`, which serving uses too (this package
may not import the classifier's: the classifier's training imports this one). No TensorFlow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["ECE_BINS", "MIN_FIT_ROWS", "expected_calibration_error", "fit_temperature",
           "reliability_bins", "save_reliability_diagram"]

ECE_BINS = 15  # equal-width confidence bins (Guo et al.)
MIN_FIT_ROWS = 10  # fewer validation rows than this: T is left at 1 (nothing to fit on)
T_RANGE = (0.05, 20.0)  # the search interval of T; its ends mean "degenerate validation set"


def reliability_bins(y_true: Any, y_prob: Any, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: rows, mean top-class confidence, accuracy (NaN if empty)."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64)
    conf = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    # right-closed bins (0, 1/n], ..., as in Guo et al.; a confidence of exactly 0 joins bin 0
    which = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=n_bins) / count
        accuracy = np.bincount(which, correct, minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": accuracy,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: the row-weighted mean |accuracy - confidence| over confidence bins."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    filled = bins["count"] > 0
    if not filled.any():
        raise ValueError("no rows: the calibration error of an empty set is undefined")
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] * gap).sum() / bins["count"].sum())


def _nll(y_true: np.ndarray, log_p: np.ndarray, temperature: float) -> float:
    z = log_p / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y_true)), y_true]))


def fit_temperature(y_true: Any, y_prob: Any) -> float:
    """The ``T`` minimising the NLL of ``softmax(log p / T)`` on these (validation) rows.

    Returns 1.0 (no scaling) when there are fewer than :data:`MIN_FIT_ROWS` rows or only one
    class among them: a single-class set would reward ever more confidence.
    """
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if len(y_true) < MIN_FIT_ROWS or len(np.unique(y_true)) < 2:
        return 1.0
    log_p = np.log(np.clip(y_prob, 1e-12, 1.0))
    lo, hi = (math.log(t) for t in T_RANGE)
    res = minimize_scalar(lambda s: _nll(y_true, log_p, math.exp(s)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    best = math.exp(float(res.x))
    # never return a T that fits the rows worse than leaving the model alone
    return best if _nll(y_true, log_p, best) < _nll(y_true, log_p, 1.0) else 1.0


def save_reliability_diagram(y_true: Any, y_prob: Any, path: Path, title: str = "",
                             uncalibrated: Any = None, temperature: float = 1.0) -> Path:
    """``reliability.png``: accuracy against confidence per bin, the ECE in the legend.

    With ``uncalibrated`` (the probabilities before temperature scaling by ``temperature``),
    both curves are drawn, so the diagram shows what the scaling did.
    """
    y_prob = np.asarray(y_prob, dtype=np.float64)
    curves = [("model output" if uncalibrated is None else f"temperature-scaled (T = "
               f"{temperature:.3f})", y_prob, "tab:blue")]
    if uncalibrated is not None:
        curves.append(("before scaling", np.asarray(uncalibrated, dtype=np.float64),
                       "tab:orange"))
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    width = 1.0 / ECE_BINS
    for i, (label, probs, colour) in enumerate(curves):
        bins = reliability_bins(y_true, probs)
        filled = bins["count"] > 0
        ece = expected_calibration_error(y_true, probs)
        centres = bins["edges"][:-1] + width / 2
        ax.bar(centres[filled] + (i - 0.5 * (len(curves) - 1)) * width / len(curves),
               bins["accuracy"][filled], width=width / len(curves), color=colour, alpha=0.6,
               edgecolor="black", linewidth=0.5, label=f"{label}: ECE = {ece:.4f}")
        ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o-", color=colour, ms=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Confidence (top-class probability)")
    ax.set_ylabel("Accuracy in the bin")
    n = len(np.ravel(y_true))
    ax.set_title(f"{title + ' - ' if title else ''}reliability ({ECE_BINS} bins, n = {n})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
