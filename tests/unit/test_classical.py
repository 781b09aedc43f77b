"""The deep-features classical sweep and subject-grouped k-fold, on small synthetic features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification

from training.classifier.classical import (
    CLASSIFIERS,
    SoftmaxRidgeClassifier,
    fit_predict_proba,
    grouped_folds,
    grouped_kfold,
    sweep,
)

EXPECTED = {
    "svc", "xgboost", "lightgbm", "lda", "ridge", "logistic_regression", "adaboost",
    "random_forest", "extra_trees", "knn", "gaussian_nb", "decision_tree",
}


def features(n: int = 160, k: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return make_classification(n_samples=n, n_features=20, n_informative=8, n_redundant=4,
                               n_classes=k, class_sep=1.5, random_state=seed)


def test_registry_holds_the_papers_classifiers() -> None:
    assert set(CLASSIFIERS) == EXPECTED
    for name, factory in CLASSIFIERS.items():
        assert hasattr(factory(), "predict_proba"), name


@pytest.mark.parametrize("k", [2, 3])
def test_sweep_scores_every_classifier(k: int) -> None:
    X, y = features(k=k)
    classes = [f"c{i}" for i in range(k)]
    df = sweep(X[:110], y[:110], X[110:], y[110:], classes, n_bootstrap=100)
    assert list(df["classifier"]) == list(CLASSIFIERS)
    assert list(df.columns[:6]) == ["classifier", "accuracy", "balanced_accuracy", "roc_auc",
                                    "f1_macro", "fit_time_s"]
    numeric = df.drop(columns="classifier").to_numpy(dtype=float)
    assert np.isfinite(numeric).all()
    assert (df["fit_time_s"] > 0).all()
    assert df["accuracy_ci_low"].le(df["accuracy"]).all()
    # separable features: every model beats chance clearly
    assert (df["balanced_accuracy"] > 1 / k + 0.15).all(), df[["classifier", "balanced_accuracy"]]


def test_sweep_is_seeded_and_selects_names() -> None:
    X, y = features(seed=1)
    a = sweep(X[:100], y[:100], X[100:], y[100:], ["a", "b"], ["random_forest", "svc"])
    b = sweep(X[:100], y[:100], X[100:], y[100:], ["a", "b"], ["random_forest", "svc"])
    assert list(a["classifier"]) == ["random_forest", "svc"]
    cols = ["accuracy", "balanced_accuracy", "roc_auc", "f1_macro"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    with pytest.raises(ValueError, match="unknown classifier"):
        sweep(X, y, X, y, ["a", "b"], ["catboost"])


def test_ridge_probabilities_follow_its_decisions() -> None:
    X, y = features(k=3, seed=2)
    ridge = SoftmaxRidgeClassifier().fit(X, y)
    proba = ridge.predict_proba(X)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert (proba.argmax(axis=1) == ridge.predict(X)).all()
    Xb, yb = features(seed=3)
    binary = SoftmaxRidgeClassifier().fit(Xb, yb)
    assert (binary.predict_proba(Xb).argmax(axis=1) == binary.predict(Xb)).all()


def test_class_missing_from_training_gets_zero_probability() -> None:
    X, y = features(n=120, k=3, seed=4)
    keep = y != 1
    proba, fit_time = fit_predict_proba(CLASSIFIERS["xgboost"](), X[keep], y[keep], X, 3)
    assert proba.shape == (120, 3) and fit_time > 0
    assert (proba[:, 1] == 0).all()
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_grouped_folds_never_share_a_group() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), rng.integers(1, 8, size=30))  # subjects, varied sizes
    y = (groups % 3 == 0).astype(int)  # label is a property of the subject
    folds = grouped_folds(y, groups, k=5)
    assert len(folds) == 5
    seen_test = np.concatenate([te for _, te in folds])
    assert sorted(seen_test) == list(range(len(y)))  # every row is tested exactly once
    for train, test in folds:
        assert set(groups[train]).isdisjoint(groups[test])
        assert set(y[test]) == {0, 1}  # stratified: both classes in every fold


def test_grouped_folds_with_unique_groups_is_stratified_kfold() -> None:
    y = np.array([0] * 40 + [1] * 20)
    folds = grouped_folds(y, np.arange(60), k=10)
    assert len(folds) == 10
    for _, test in folds:
        assert len(test) == 6 and y[test].sum() == 2  # class ratio kept in each fold
    with pytest.raises(ValueError, match="number of groups"):
        grouped_folds(y[:8], np.arange(8) // 4, k=3)


def test_grouped_kfold_reports_mean_and_std() -> None:
    X, y = features(n=150, seed=5)
    groups = np.arange(150) // 3
    df = grouped_kfold(X, y, groups, ["a", "b"], ["ridge", "decision_tree"], k=5)
    assert list(df["classifier"]) == ["ridge", "decision_tree"]
    for metric in ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "fit_time_s"):
        assert np.isfinite(df[f"{metric}_mean"]).all()
        assert (df[f"{metric}_std"] >= 0).all()
    assert (df["n_folds"] == 5).all() and (df["roc_auc_folds"] == 5).all()
    assert (df["accuracy_mean"] > 0.7).all()
