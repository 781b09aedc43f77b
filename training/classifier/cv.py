"""Leave-subjects-out CV of a classifier architecture: retrain it per fold, score unseen patients.

:func:`subject_cv` takes every labelled cell of a curated dataset version (all splits: the CV
makes its own), deals the subjects into folds (:mod:`training.evaluation.subject_cv`), and
for each fold builds and trains the architecture from scratch through the same code as a
candidate (:func:`training.classifier.train._fit`: same preprocessing, augmentation, class
weights, BatchNorm re-estimation), then predicts the held-out subjects. One MLflow run
(nested under the candidate's or the DAG's run when given) holds the pooled ``cv/*`` metrics
with subject-level CIs, ``cv/folds.csv``, ``cv/subjects.csv``, the out-of-fold predictions and
the notes; each fold's epochs go to a nested run of their own.

The retrain DAG runs it inside each classifier training (:func:`wanted`: when the smallest
class has fewer subjects than ``cv.run_below_subjects_per_class``), and ``leukoflow cv``
runs it on demand (``python -m training.classifier.cv`` is that child process).
TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config, load_config
from training.entry import child_process_setup
from training.errors import LeukoflowError
from training.preprocess import PreprocessParams

__all__ = ["main", "min_subjects_per_class", "subject_cv", "wanted"]

log = logging.getLogger(__name__)


def min_subjects_per_class(cells: pd.DataFrame, classes: list[str]) -> int:
    """The fewest distinct subjects any class has (rows without a subject count one each)."""
    from training.evaluation.metrics import subject_groups

    groups = subject_groups(cells)
    if groups is None:
        groups = np.array([f"row:{i}" for i in range(len(cells))])
    labels = cells["label"].to_numpy()
    return min(len(np.unique(groups[labels == c])) for c in classes)


def wanted(cfg: Config, cells: pd.DataFrame) -> bool:
    """Whether a candidate's training should also run the leave-subjects-out CV: the data are
    small enough that one frozen test split holds only a few patients per class."""
    threshold = cfg.cv.run_below_subjects_per_class
    return threshold > 0 and min_subjects_per_class(cells, list(cfg.data.classes)) < threshold


def subject_cv(
    cfg: Config, architecture: str, *, dataset_version: int | None = None,
    folds: int | None = None, parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, cells: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Leave-subjects-out CV of ``architecture``; returns the summary (metrics, notes, folds)
    and the MLflow run id. ``cells``: the materialised cells when the caller has them."""
    import keras
    import mlflow

    from training.classifier.architectures import build_model, resolve_hparams
    from training.classifier.train import _cells, _fit, _probabilities
    from training.evaluation.metrics import subject_groups
    from training.evaluation.subject_cv import cross_validate
    from training.tracking import configure_mlflow

    hp = resolve_hparams(cfg, architecture)
    if cfg.cv.epochs is not None:
        hp["epochs"] = cfg.cv.epochs
    if cells is None:
        cells, ds = _cells(cfg, dataset_version)
        version = ds.version
    else:
        version = dataset_version
    classes = list(cfg.data.classes)
    positive = cfg.data.positive_class if len(classes) == 2 else None
    cells = cells.reset_index(drop=True)
    y = cells["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    groups = subject_groups(cells)
    if groups is None:
        groups = np.array([f"row:{i}" for i in range(len(cells))])
        log.warning("no cell names a subject: the CV folds are cells, not patients")
    params = PreprocessParams(int(hp["image_size"]), hp["source_size"], hp["segmentation"])
    batch_size = int(hp["batch_size"])
    k = int(folds or cfg.cv.folds)

    experiment_id = configure_mlflow(cfg)
    nested = parent_run_id is not None or mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"cv-{architecture}",
                          nested=nested, parent_run_id=parent_run_id,
                          tags={"leukoflow_role": "subject_cv", "architecture": architecture,
                                "dataset_version": str(version), **(tags or {})}) as run:
        work = cfg.runs_dir / "cv" / run.info.run_id
        work.mkdir(parents=True, exist_ok=True)
        mlflow.log_params({"architecture": architecture, "cv.folds": k,
                           "epochs": hp["epochs"], "image_size": hp["image_size"],
                           "n_cells": len(cells), "classes": ",".join(classes)})

        def fit_predict(i: int, train: np.ndarray, test: np.ndarray) -> np.ndarray:
            keras.backend.clear_session()
            keras.utils.set_random_seed(int(hp["seed"]) + i)
            part = {"train": cells.iloc[train], "val": cells.iloc[[]]}
            labels = {"train": y[train], "val": y[[]]}
            model = build_model(architecture, len(classes), hp)
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"fold-{i}",
                                  nested=True, tags={"leukoflow_role": "subject_cv_fold"}) as f:
                _fit(model, hp, part, labels, params, work, f.info.run_id)
            return _probabilities(model, list(cells["path"].iloc[test]), params, batch_size)

        result = cross_validate(y, groups, classes, fit_predict, k=k, positive_class=positive,
                                seed=int(hp["seed"]))
        mlflow.log_metrics(result.metrics)
        mlflow.set_tag("cv_scheme", result.scheme)
        if result.notes:
            mlflow.set_tag("cv_notes", " | ".join(result.notes)[:5000])
        mlflow.log_text(result.folds.to_csv(index=False), "cv/folds.csv")
        mlflow.log_text(result.subjects.to_csv(index=False), "cv/subjects.csv")
        oof = cells[["sha256", "label", "subject_id"]].copy()
        for j, cls in enumerate(classes):
            oof[f"p_{cls}"] = result.oof[:, j]
        mlflow.log_text(oof.to_csv(index=False), "cv/oof_predictions.csv")
        mlflow.log_text("\n".join(result.notes) + "\n", "cv/notes.txt")
        summary = {**result.summary(), "architecture": architecture,
                   "dataset_version": version, "run_id": run.info.run_id,
                   "subjects": result.subjects.to_dict(orient="records")}
        mlflow.log_dict(summary, "cv/summary.json")
    log.info("%s %s: balanced accuracy %.3f [%.3f, %.3f] over %d subjects", architecture,
             result.scheme, result.metrics.get("cv/balanced_accuracy", float("nan")),
             result.metrics.get("cv/balanced_accuracy_ci_low", float("nan")),
             result.metrics.get("cv/balanced_accuracy_ci_high", float("nan")),
             int(result.metrics.get("cv/n_subjects", 0)))
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m training.classifier.cv --architecture NAME [--folds K] --out cv.json``."""
    parser = argparse.ArgumentParser(prog="python -m training.classifier.cv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default=None, help="default: the config's first")
    parser.add_argument("--dataset-version", type=int, default=None, help="default: newest")
    parser.add_argument("--folds", type=int, default=None, help="default: cv.folds")
    parser.add_argument("--parent-run-id", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    child_process_setup()
    cfg = load_config()
    try:
        summary = subject_cv(cfg, args.architecture or cfg.classifier.architectures[0],
                             dataset_version=args.dataset_version, folds=args.folds,
                             parent_run_id=args.parent_run_id)
    except LeukoflowError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
