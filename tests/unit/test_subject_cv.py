"""Leave-subjects-out evaluation on synthetic patients whose cells carry their own colour cast."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training.errors import DataValidationError
from training.evaluation.subject_cv import cross_validate, subject_folds

CLASSES = ["all", "hem"]


def _cast_cells(n_subjects: int = 40, cells: int = 20, seed: int = 0):
    """Tiny RGB cells: one class per subject (as in C-NMC), a colour cast per subject that
    says nothing about the class, and no class signal at all in the pixels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_subjects) % 2
    cast = rng.uniform(60, 200, (n_subjects, 3))
    contrast = rng.uniform(4, 24, (n_subjects, 3))  # the scanner/stain day's spread
    subject = np.repeat(np.arange(n_subjects), cells)
    noise = rng.normal(0, 1, (len(subject), 8, 8, 3))
    images = cast[subject][:, None, None, :] + contrast[subject][:, None, None, :] * noise
    return np.clip(images, 0, 255), labels[subject], np.array([f"p{s:02d}" for s in subject])


def _colour_features(images: np.ndarray) -> np.ndarray:
    """Per-channel mean and spread: the cue a stain-fooled model learns."""
    return np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)


def _learner(X: np.ndarray, y: np.ndarray):
    def fit_predict(fold: int, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
        model.fit(X[train], y[train])
        return model.predict_proba(X[test])
    return fit_predict


def test_a_cast_learner_is_perfect_on_cells_and_at_chance_on_unseen_subjects() -> None:
    images, y, subjects = _cast_cells()
    X = _colour_features(images)
    cells = np.array([f"cell{i}" for i in range(len(y))])  # a cell-level split: no groups
    by_cell = cross_validate(y, cells, CLASSES, _learner(X, y), k=5, n_bootstrap=300)
    by_subject = cross_validate(y, subjects, CLASSES, _learner(X, y), k=5, n_bootstrap=300)
    assert by_cell.metrics["cv/balanced_accuracy"] > 0.95
    ba = by_subject.metrics["cv/balanced_accuracy"]
    assert 0.3 < ba < 0.7, ba
    assert by_subject.metrics["cv/balanced_accuracy_ci_low"] < 0.5 < \
        by_subject.metrics["cv/balanced_accuracy_ci_high"]
    assert by_subject.scheme == "5-fold by subject" and by_subject.metrics["cv/n_folds"] == 5
    assert by_subject.metrics["cv/n_subjects"] == 40
    assert by_subject.metrics["cv/n_subjects__all"] == by_subject.metrics["cv/n_subjects__hem"]
    # every subject was held out exactly once, and each fold holds both classes
    assert sorted(by_subject.subjects["subject"]) == sorted(set(subjects))
    assert (by_subject.folds["n_subjects__all"] > 0).all()
    assert (by_subject.folds["n_subjects__hem"] > 0).all()
    assert not np.isnan(by_subject.oof).any()
    # the subject-level spread is wide: some patients all right, others all wrong
    assert by_subject.metrics["cv/subject_accuracy_std"] > 0.2
    assert by_subject.notes == []


def test_few_subjects_mean_leave_one_out_and_a_plain_statement() -> None:
    images, y, subjects = _cast_cells(n_subjects=4, cells=6)
    X = _colour_features(images)
    res = cross_validate(y, subjects, CLASSES, _learner(X, y), k=5, n_bootstrap=50)
    assert res.scheme == "leave-one-subject-out" and len(res.folds) == 4
    assert len(res.notes) == 2 and "no test fold can hold more than one subject of class" \
        in res.notes[0]
    folds, _, _ = subject_folds(y, subjects, CLASSES, k=5)
    for train, test in folds:
        assert not set(subjects[train]) & set(subjects[test])


def test_a_class_with_one_subject_is_refused() -> None:
    y = np.array([0, 0, 1, 1, 0])
    groups = np.array(["a", "a", "b", "b", "c"])
    with pytest.raises(DataValidationError, match="2\\+ subjects of every class"):
        subject_folds(y, groups, CLASSES)


def test_the_dag_runs_the_cv_only_below_the_subject_threshold(cfg) -> None:
    import pandas as pd

    from training.classifier.cv import min_subjects_per_class, wanted

    cells = pd.DataFrame({"label": ["all"] * 4 + ["hem"] * 4,
                          "subject_id": ["a", "a", "b", "c", "d", "d", "e", "e"]})
    assert min_subjects_per_class(cells, CLASSES) == 2
    cfg.cv.run_below_subjects_per_class = 3
    assert wanted(cfg, cells)
    cfg.cv.run_below_subjects_per_class = 2
    assert not wanted(cfg, cells)
    cfg.cv.run_below_subjects_per_class = 0  # never
    assert not wanted(cfg, cells)
