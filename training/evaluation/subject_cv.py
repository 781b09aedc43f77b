"""Leave-subjects-out evaluation: how a candidate architecture does on patients it never saw.

One frozen test split of a small dataset holds a handful of patients, and a model can score
well on it by learning what its few training patients look like (stain, scanner day) rather
than what a blast looks like. Here every subject is held out once instead: the subjects are
dealt into ``k`` folds stratified by class (:func:`subject_folds`; leave-one-subject-out when
there are no more subjects than folds), the caller's ``fit_predict`` retrains the candidate on
the other folds, and :func:`cross_validate` scores

* the pooled out-of-fold predictions of every cell, with 95 % CIs that resample subjects
  (:func:`training.evaluation.metrics.classification_metrics` with ``groups``);
* each fold, and each subject (its share of correctly classified cells): the spread that
  says how much a figure moves from one patient to the next.

and says plainly when a fold cannot hold more than one subject of a class. Pure numpy and
scikit-learn: what trains (a CNN, a feature classifier) is the caller's function.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

from training.errors import DataValidationError
from training.evaluation.metrics import _key, classification_metrics

__all__ = ["FOLD_METRICS", "FitPredict", "SubjectCV", "cross_validate", "subject_folds"]

log = logging.getLogger(__name__)

FOLD_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")
# fit_predict(fold, train_rows, test_rows) -> (len(test_rows), n_classes) probabilities
FitPredict = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class SubjectCV:
    """The outcome of one leave-subjects-out evaluation."""

    scheme: str  # "leave-one-subject-out" or "<k>-fold by subject"
    metrics: dict[str, float]  # flat, ``cv/`` prefixed: what MLflow logs and selection reads
    folds: pd.DataFrame  # one row per fold: subjects and cells per class, scores
    subjects: pd.DataFrame  # one row per subject: label, cells, accuracy, fold
    oof: np.ndarray  # (n, k) out-of-fold probabilities, aligned with the input rows
    notes: list[str] = field(default_factory=list)  # plain statements of what limits the figures

    def summary(self) -> dict[str, Any]:
        """JSON-able: scheme, notes, metrics and the per-fold table."""
        return {"scheme": self.scheme, "notes": list(self.notes), "metrics": dict(self.metrics),
                "folds": self.folds.to_dict(orient="records")}


def _per_class_subjects(y: np.ndarray, groups: np.ndarray, k: int) -> list[int]:
    return [len(np.unique(groups[y == c])) for c in range(k)]


def subject_folds(
    y: np.ndarray, groups: np.ndarray, classes: Sequence[str], k: int = 5, seed: int = 0,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str, list[str]]:
    """(folds, scheme, notes): every subject in exactly one test fold, classes stratified.

    More subjects than ``k``: ``StratifiedGroupKFold`` (each fold holds subjects of both
    classes where the counts allow); otherwise leave-one-subject-out. Refuses when a class
    has fewer than 2 subjects (no fold could train on it while another tests it) or when a
    training part would miss a class.
    """
    y, groups = np.asarray(y).astype(np.int64), np.asarray(groups).astype(str)
    if len(y) != len(groups):
        raise ValueError(f"y has {len(y)} rows but groups has {len(groups)}")
    per_class = _per_class_subjects(y, groups, len(classes))
    thin = [f"'{c}' ({n})" for c, n in zip(classes, per_class, strict=True) if n < 2]
    if thin:
        raise DataValidationError(
            f"leave-subjects-out needs 2+ subjects of every class; subjects of class "
            f"{', '.join(thin)}: a fold that holds out the only subject of a class cannot "
            "train on it")
    n_subjects = len(np.unique(groups))
    if n_subjects <= k:
        scheme = "leave-one-subject-out"
        folds = list(LeaveOneGroupOut().split(np.zeros(len(y)), y, groups))
    else:
        scheme = f"{k}-fold by subject"
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # "least populated class has fewer than k members"
            warnings.simplefilter("ignore", UserWarning)
            folds = list(splitter.split(np.zeros(len(y)), y, groups))
    missing = [i for i, (tr, _) in enumerate(folds) if len(np.unique(y[tr])) < len(classes)]
    if missing:
        raise DataValidationError(f"{scheme}: the training part of fold(s) {missing} lacks a "
                                  "class (too few subjects per class)")
    notes = []
    for c, cls in enumerate(classes):
        most = max(len(np.unique(groups[te][y[te] == c])) for _, te in folds)
        if most <= 1:
            notes.append(
                f"no test fold can hold more than one subject of class '{cls}' "
                f"({per_class[c]} subject(s) of it in {n_subjects}, {scheme}): each fold's "
                f"figure for '{cls}' is one patient's; the pooled subject-level CI is the "
                "figure to read")
    return folds, scheme, notes


def _fold_row(i: int, y: np.ndarray, groups: np.ndarray, prob: np.ndarray,
              classes: Sequence[str], positive: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"fold": i, "n_cells": len(y), "n_subjects": len(np.unique(groups)),
                           "subjects": ",".join(sorted(np.unique(groups)))}
    for c, cls in enumerate(classes):
        row[f"n_subjects__{_key(cls)}"] = len(np.unique(groups[y == c]))
    with warnings.catch_warnings():  # a LOSO fold holds one class: some metrics are one-sided
        warnings.simplefilter("ignore", UserWarning)
        m = classification_metrics(y, prob, list(classes), positive, n_bootstrap=0)
    for name in FOLD_METRICS:
        row[name] = m.get(name, math.nan)
    return row


def cross_validate(
    y: np.ndarray, groups: np.ndarray, classes: Sequence[str], fit_predict: FitPredict, *,
    k: int = 5, positive_class: str | None = None, n_bootstrap: int = 1000, seed: int = 0,
) -> SubjectCV:
    """Hold out each subject once (:func:`subject_folds`), retrain with ``fit_predict`` on the
    rest, and score the pooled out-of-fold predictions at the subject level.

    ``metrics`` keys: ``cv/<metric>`` (pooled), ``cv/<metric>_ci_low/high`` (subjects
    resampled), ``cv/<metric>_cell_ci_low/high``, ``cv/fold_mean_<metric>`` and
    ``cv/fold_std_<metric>``, ``cv/subject_accuracy_mean/std/min``, ``cv/n_folds``,
    ``cv/n_subjects`` and ``cv/n_subjects__<class>``.
    """
    classes = list(classes)
    y, groups = np.asarray(y).astype(np.int64), np.asarray(groups).astype(str)
    positive = positive_class if len(classes) == 2 else None
    folds, scheme, notes = subject_folds(y, groups, classes, k, seed)
    oof = np.full((len(y), len(classes)), np.nan)
    fold_of = np.full(len(y), -1)
    rows = []
    for i, (train, test) in enumerate(folds):
        log.info("%s: fold %d/%d, %d train and %d test cells (test subjects %s)", scheme,
                 i + 1, len(folds), len(train), len(test), sorted(np.unique(groups[test])))
        prob = np.asarray(fit_predict(i, train, test), dtype=np.float64)
        if prob.shape != (len(test), len(classes)):
            raise ValueError(f"fit_predict returned shape {prob.shape} for fold {i}, "
                             f"expected {(len(test), len(classes))}")
        oof[test], fold_of[test] = prob, i
        rows.append(_fold_row(i, y[test], groups[test], prob, classes, positive))
    fold_table = pd.DataFrame(rows)
    pooled = classification_metrics(y, oof, classes, positive, n_bootstrap=n_bootstrap,
                                    seed=seed, groups=groups)
    metrics = {f"cv/{k_}": v for k_, v in pooled.items()}
    metrics["cv/n_folds"] = float(len(folds))
    for name in FOLD_METRICS:
        values = fold_table[name].astype(float)
        if values.notna().any():
            metrics[f"cv/fold_mean_{name}"] = float(values.mean())
        if values.notna().sum() > 1:
            metrics[f"cv/fold_std_{name}"] = float(values.std(ddof=1))
    correct = oof.argmax(axis=1) == y
    subjects = (pd.DataFrame({"subject": groups, "label": [classes[i] for i in y],
                              "correct": correct, "fold": fold_of})
                .groupby("subject", sort=True)
                .agg(label=("label", "first"), n_cells=("correct", "size"),
                     accuracy=("correct", "mean"), fold=("fold", "first"))
                .reset_index())
    metrics["cv/subject_accuracy_mean"] = float(subjects["accuracy"].mean())
    metrics["cv/subject_accuracy_min"] = float(subjects["accuracy"].min())
    if len(subjects) > 1:
        metrics["cv/subject_accuracy_std"] = float(subjects["accuracy"].std(ddof=1))
    for note in notes:
        log.warning("%s", note)
    return SubjectCV(scheme=scheme, metrics=metrics, folds=fold_table, subjects=subjects,
                     oof=oof, notes=notes)
