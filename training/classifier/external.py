"""The classifier's side of ``leukoflow evaluate``: a logged classifier on a labelled cell folder.

:func:`score_folder` is the family table's ``evaluate`` entry (:mod:`training.families`); the
model reference, the MLflow run, the version tag and the overlap check are the family-neutral
part (:mod:`training.external`). The folder may be in any cell layout the importers know
(:mod:`training.data.importers`: manifest.csv, C-NMC names, class folders); the metrics are the
ones a training run logs for its test rows
(:func:`training.evaluation.metrics.classification_metrics` on the model's own preprocessing and
temperature). TensorFlow is imported here only: run it in a process without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config
from training.errors import DataValidationError
from training.external import Scored, file_sha256

__all__ = ["folder_rows", "score_folder"]


def folder_rows(path: Path, classes: list[str]) -> tuple[str, pd.DataFrame, dict[str, int]]:
    """The labelled cell images of ``path`` whose label the model knows.

    Returns ``(layout, rows, skipped)``: rows with absolute ``path``, ``label``,
    ``subject_id`` and ``sha256``, in path order; ``skipped`` counts what was left out and why.
    """
    from training.data.importers import import_batch

    layout, records = import_batch(Path(path), Path(path).name or "external")
    skipped: dict[str, int] = {}
    rows = []
    for rec in records:
        why = ("not_a_cell_image" if rec.kind != "cell" else rec.error or
               ("unlabelled" if not rec.label else
                "" if rec.label in classes else "label_unknown_to_model"))
        file = Path(path) / rec.path
        if not why and not file.is_file():
            why = "missing_file"
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        rows.append({"file": rec.path, "path": str(file.resolve()), "label": rec.label,
                     "subject_id": rec.subject_id, "sha256": file_sha256(file)})
    if not rows:
        raise DataValidationError(
            f"{path} (layout {layout}) holds no labelled cell images of the model's classes "
            f"{classes}; left out: {skipped or 'nothing'}")
    return layout, pd.DataFrame(rows), skipped


def _probabilities(model_dir: Path, paths: list[str]) -> tuple[np.ndarray, dict]:
    """The logged classifier's served probabilities of these files, preprocessed as at
    training (the same tf.data pipeline over the one preprocessing function) and scaled by
    its stored temperature."""
    from training.classifier.inputs import make_dataset
    from training.classifier.predict import (
        PREDICT_BATCH,
        apply_temperature,
        load_classifier,
        model_temperature,
    )
    from training.preprocess import PreprocessParams

    model, meta = load_classifier(model_dir)
    params = PreprocessParams.from_dict(meta["preprocess"])
    n_classes = int(model.output_shape[-1])
    ds = make_dataset(paths, None, n_classes, params, batch_size=PREDICT_BATCH, cache=False)
    raw = np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
    return apply_temperature(raw, model_temperature(meta)).astype(np.float64), meta


def score_folder(cfg: Config, model_dir: Path, meta: dict[str, Any], path: Path, *,
                 n_bootstrap: int, work: Path, title: str) -> Scored:
    """Classification metrics (subject-level CIs where the layout names subjects), the
    confusion matrix / ROC / reliability figures and per-image probabilities."""
    from training.evaluation.metrics import (
        classification_metrics,
        row_ids,
        save_classification_plots,
        subject_groups,
    )

    classes = [str(c) for c in meta["classes"]]
    positive = meta.get("positive_class") if len(classes) == 2 else None
    layout, rows, skipped = folder_rows(path, classes)
    y_prob, meta = _probabilities(model_dir, list(rows["path"]))
    y_true = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    metrics = classification_metrics(y_true, y_prob, classes, positive,
                                     n_bootstrap=n_bootstrap, groups=subject_groups(rows),
                                     row_ids=row_ids(rows))
    table = rows[["file", "sha256", "label", "subject_id"]].copy()
    for j, cls in enumerate(classes):
        table[f"p_{cls}"] = y_prob[:, j]
    table["predicted"] = [classes[i] for i in y_prob.argmax(axis=1)]
    table["correct"] = table["predicted"] == table["label"]
    plots = save_classification_plots(y_true, y_prob, classes, work / "plots", title=title)
    return Scored(layout=layout, table=table, metrics=metrics, skipped=skipped,
                  dataset_columns=["sha256", "label", "subject_id"], targets="label",
                  plots=list(plots),
                  params={"temperature": float(meta.get("temperature") or 1.0)})
