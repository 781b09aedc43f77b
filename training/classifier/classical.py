"""Deep features + classical classifiers: Narendra & Negi's sweep, Khan's XGBoost on fusions.

A CNN backbone turns each image into a 2048-d global-average-pooled vector
(:func:`extract_features`); a table of scikit-learn-style classifiers is then fitted on those
vectors and scored with the same metrics as the CNNs (:mod:`training.evaluation.metrics`), fit time
measured. :func:`grouped_kfold` repeats that in k folds grouped by subject, so that no subject's
images are on both sides of a fold. TensorFlow is imported only inside ``extract_features``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import (
    AdaBoostClassifier,
    ExtraTreesClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from training.evaluation.metrics import classification_metrics

__all__ = [
    "CLASSIFIERS",
    "METRICS",
    "SEED",
    "SoftmaxRidgeClassifier",
    "extract_features",
    "fit_predict_proba",
    "grouped_folds",
    "grouped_kfold",
    "sweep",
]

SEED = 0
METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")


class SoftmaxRidgeClassifier(RidgeClassifier):
    """RidgeClassifier with ``predict_proba`` = softmax of its decision function.

    The scores are not calibrated probabilities, but they rank like the decision function,
    which is all ROC AUC needs, and argmax agrees with ``predict``.
    """

    def predict_proba(self, X: Any) -> np.ndarray:
        d = np.asarray(self.decision_function(X), dtype=np.float64)
        if d.ndim == 1:  # binary: positive-class score; softmax over (0, d) = sigmoid(d)
            d = np.column_stack([np.zeros_like(d), d])
        d = d - d.max(axis=1, keepdims=True)
        e = np.exp(d)
        return e / e.sum(axis=1, keepdims=True)


def _xgboost() -> BaseEstimator:
    from xgboost import XGBClassifier

    return XGBClassifier(n_estimators=200, max_depth=4, learning_rate=0.1, subsample=0.9,
                         colsample_bytree=0.5, tree_method="hist", random_state=SEED, n_jobs=1)


def _lightgbm() -> BaseEstimator:
    from lightgbm import LGBMClassifier

    return LGBMClassifier(n_estimators=200, learning_rate=0.05, num_leaves=31,
                          colsample_bytree=0.5, random_state=SEED, n_jobs=1, verbose=-1,
                          deterministic=True)


def _scaled(estimator: BaseEstimator) -> Pipeline:
    """Distance-, margin- and likelihood-based models need standardised features; trees don't."""
    return make_pipeline(StandardScaler(), estimator)


CLASSIFIERS: dict[str, Callable[[], BaseEstimator]] = {
    # SVC(probability=True) is deprecated since sklearn 1.9; this is its documented equivalent
    # (Platt scaling fitted on internal 5-fold out-of-fold decision values).
    "svc": lambda: _scaled(CalibratedClassifierCV(SVC(kernel="rbf", random_state=SEED),
                                                  method="sigmoid", ensemble=False)),
    "xgboost": _xgboost,
    "lightgbm": _lightgbm,
    "lda": lambda: _scaled(LinearDiscriminantAnalysis()),
    "ridge": lambda: _scaled(SoftmaxRidgeClassifier(alpha=1.0, random_state=SEED)),
    "logistic_regression": lambda: _scaled(LogisticRegression(max_iter=2000, random_state=SEED)),
    "adaboost": lambda: AdaBoostClassifier(n_estimators=100, random_state=SEED),
    "random_forest": lambda: RandomForestClassifier(n_estimators=200, random_state=SEED,
                                                    n_jobs=1),
    "extra_trees": lambda: ExtraTreesClassifier(n_estimators=200, random_state=SEED, n_jobs=1),
    "knn": lambda: _scaled(KNeighborsClassifier(n_neighbors=5)),
    "gaussian_nb": lambda: GaussianNB(),
    "decision_tree": lambda: DecisionTreeClassifier(random_state=SEED),
}


def _names(names: Sequence[str] | None) -> list[str]:
    names = list(CLASSIFIERS) if names is None else list(names)
    unknown = [n for n in names if n not in CLASSIFIERS]
    if unknown:
        raise ValueError(f"unknown classifier(s) {unknown}; choose from {sorted(CLASSIFIERS)}")
    return names


def fit_predict_proba(
    estimator: BaseEstimator, X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray,
    n_classes: int,
) -> tuple[np.ndarray, float]:
    """Fit, then return (n_test, n_classes) probabilities and the measured fit time in seconds.

    Labels are re-encoded to 0..m-1 for the fit (XGBoost insists) and the probability
    columns mapped back, so a class missing from a training fold gets probability 0.
    """
    present = np.unique(y_train)
    if len(present) < 2:
        raise ValueError(f"the training rows hold a single class ({present.tolist()})")
    start = time.perf_counter()
    estimator.fit(X_train, np.searchsorted(present, y_train))
    fit_time = time.perf_counter() - start
    proba = np.zeros((len(X_test), n_classes))
    proba[:, present] = estimator.predict_proba(X_test)
    return proba, fit_time


def _evaluate(
    name: str, X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray,
    y_test: np.ndarray, classes: Sequence[str], positive_class: str | None, n_bootstrap: int,
    groups: np.ndarray | None = None,
) -> dict[str, float | str]:
    proba, fit_time = fit_predict_proba(
        CLASSIFIERS[name](), X_train, y_train, X_test, len(classes)
    )
    m = classification_metrics(y_test, proba, list(classes), positive_class,
                               n_bootstrap=n_bootstrap, seed=SEED, groups=groups)
    row: dict[str, float | str] = {"classifier": name}
    row.update({k: m.get(k, math.nan) for k in METRICS})
    row["fit_time_s"] = fit_time
    for k in METRICS:
        if n_bootstrap:
            row[f"{k}_ci_low"] = m.get(f"{k}_ci_low", math.nan)
            row[f"{k}_ci_high"] = m.get(f"{k}_ci_high", math.nan)
    if groups is not None:
        row["ci_units"] = m.get("ci_units", math.nan)
        row.update({k: v for k, v in m.items() if k.startswith("n_subjects")})
    return row


def sweep(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
    classes: list[str], names: Sequence[str] | None = None, *,
    positive_class: str | None = None, n_bootstrap: int = 1000,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Fit every classifier (or ``names``) on train features, score on test features.

    One row per classifier: accuracy, balanced_accuracy, roc_auc, f1_macro, fit_time_s, then
    the bootstrap 95 % CI bounds of the four metrics (``n_bootstrap=0`` leaves them out);
    ``groups`` (the test rows' subjects) makes those intervals resample subjects.
    """
    X_train, X_test = np.asarray(X_train), np.asarray(X_test)
    y_train, y_test = np.asarray(y_train).astype(int), np.asarray(y_test).astype(int)
    rows = [
        _evaluate(n, X_train, y_train, X_test, y_test, classes, positive_class, n_bootstrap,
                  groups)
        for n in _names(names)
    ]
    return pd.DataFrame(rows)


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, k: int = 10, seed: int = SEED
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds in which every group (subject) falls wholly in train or in test.

    With all-distinct groups this is plain stratified k-fold (the thesis' 10-fold CV).
    """
    y, groups = np.asarray(y), np.asarray(groups)
    if len(y) != len(groups):
        raise ValueError(f"y has {len(y)} rows but groups has {len(groups)}")
    n_groups = len(np.unique(groups))
    if not 2 <= k <= n_groups:
        raise ValueError(f"k={k} folds need 2 <= k <= number of groups ({n_groups})")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer than k members"
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(y)), y, groups))


def grouped_kfold(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: list[str],
    names: Sequence[str] | None = None, k: int = 10, *, positive_class: str | None = None,
) -> pd.DataFrame:
    """k-fold cross-validation grouped by subject; mean and std over folds per classifier.

    Columns: classifier, n_folds, then ``<metric>_mean`` / ``<metric>_std`` for accuracy,
    balanced_accuracy, roc_auc, f1_macro and fit_time_s. A fold whose test part lacks a class
    has no ROC AUC; means skip it and ``roc_auc_folds`` says how many folds had one.
    """
    X, y = np.asarray(X), np.asarray(y).astype(int)
    folds = grouped_folds(y, groups, k)
    rows = []
    for name in _names(names):
        per_fold = pd.DataFrame([
            _evaluate(name, X[tr], y[tr], X[te], y[te], classes, positive_class, 0)
            for tr, te in folds
        ])
        row: dict[str, float | str] = {"classifier": name, "n_folds": float(len(folds))}
        for col in (*METRICS, "fit_time_s"):
            values = per_fold[col].astype(float)
            row[f"{col}_mean"] = float(values.mean()) if values.notna().any() else math.nan
            row[f"{col}_std"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else math.nan
        row["roc_auc_folds"] = float(per_fold["roc_auc"].notna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


def extract_features(model_or_backbone: Any, images_batches: Iterable[Any]) -> np.ndarray:
    """Run a Keras backbone over batches of images; 4-D feature maps are global-average-pooled.

    ``images_batches`` yields arrays (b, h, w, 3) as the backbone expects them (0-255 for
    the project's models) or ``(images, labels)`` pairs, e.g. a ``tf.data.Dataset``.
    Returns (n, d) float32, e.g. d = 2048 for ResNet50/InceptionV3/Xception.
    """
    import keras  # lazy: keeps this module importable without TensorFlow

    chunks = []
    for batch in images_batches:
        images = batch[0] if isinstance(batch, tuple | list) else batch
        out = keras.ops.convert_to_numpy(model_or_backbone(images, training=False))
        if out.ndim == 4:
            out = out.mean(axis=(1, 2))
        chunks.append(out.reshape(len(out), -1).astype(np.float32))
    if not chunks:
        raise ValueError("extract_features got no batches")
    return np.concatenate(chunks)
