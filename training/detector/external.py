"""The detector's side of ``leukoflow evaluate``: a logged detector on a labelled field folder.

:func:`score_folder` is the family table's ``evaluate`` entry (:mod:`training.families`); the
model reference, the MLflow run, the version tag and the overlap check are the family-neutral
part (:mod:`training.external`). The folder is a labelled detection set in a layout the
importers read for training (:mod:`training.data.importers`: YOLO ``images/`` + ``labels/`` +
``data.yaml``, or Pascal VOC ``JPEGImages/`` + ``Annotations/``); all its fields are scored,
whatever split sub-folders it has. The numbers come from the very code the detector's training
run logs its test metrics with (:func:`training.detector.train.evaluate_weights`: Ultralytics'
``val`` at the model's own ``imgsz``, P / R / mAP50 / mAP50-95 overall and per class, bootstrap
CIs over images from the validator's own per-image matches), on a test-only copy of the folder
laid out as training lays out its test split (images named by content hash), so the same
images give the same figures, intervals included.

Class names: the folder's names are mapped onto the model's by name (ids may differ). Boxes of
a class the model does not know are **left out and counted** (``boxes_dropped.<class>`` params,
the ``classes_not_in_model`` tag, the report): the model is scored on the classes both share,
which is what "how does this WBC detector do on BCCD" asks. A folder that shares no class with
the model is refused with both lists. Ultralytics (so torch) is imported here only: run it in a
process without TensorFlow.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config
from training.errors import DataValidationError
from training.evaluation.detection import ImageMatches
from training.external import Scored, file_sha256

__all__ = ["folder_fields", "score_folder"]

log = logging.getLogger(__name__)

SERVE_CONF = 0.25  # detect()'s default confidence: the boxes serving answers with


def _remap(text: str, ids: dict[int, int], names: list[str],
           dropped: Counter[str]) -> tuple[str, Counter[int]]:
    """YOLO label text with the folder's class ids turned into the model's; boxes of classes
    the model lacks are dropped (counted in ``dropped``)."""
    lines, kept = [], Counter()
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        c = int(parts[0])
        if c not in ids:
            dropped[names[c]] += 1
            continue
        lines.append(" ".join([str(ids[c]), *parts[1:]]))
        kept[ids[c]] += 1
    return "\n".join(lines), kept


def folder_fields(path: Path, classes: list[str]) -> tuple[str, pd.DataFrame, dict[str, Any]]:
    """The labelled fields of ``path``, their labels in the model's class ids.

    Returns ``(layout, rows, left_out)``: rows with ``file``, absolute ``path``, ``sha256``,
    the remapped ``labels`` text and ``n_boxes`` per model class, sorted by content hash;
    ``left_out`` holds ``skipped`` (images, by why), ``boxes_dropped`` (by folder class) and
    ``classes_not_in_model``.
    """
    from training.data.importers import class_names, import_batch

    path = Path(path)
    layout, records = import_batch(path, path.name or "external")
    names = class_names(path, layout)
    ids = {i: classes.index(n) for i, n in enumerate(names) if n in classes}
    unknown = [n for n in names if n not in classes]
    if names and not ids:
        raise DataValidationError(
            f"{path} (layout {layout}) labels the classes {names}, none of which the model "
            f"detects ({classes}): nothing to score")
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    rows, seen = [], set()
    for rec in records:
        file = path / rec.path
        why = "not_a_field" if rec.kind != "field" else rec.error
        if not why and not file.is_file():
            why = "missing_file"
        sha = "" if why else file_sha256(file)
        if not why and sha in seen:
            why = "duplicate_image"  # scored once, as training's dataset keeps one copy
        if why:
            skipped[why] += 1
            continue
        seen.add(sha)
        text, kept = _remap(rec.yolo_labels, ids, names, dropped)
        rows.append({"file": rec.path, "path": str(file.resolve()), "sha256": sha,
                     "labels": text, **{f"n_boxes__{c}": kept[i] for i, c in enumerate(classes)}})
    if not rows:
        raise DataValidationError(
            f"{path} (layout {layout}) holds no labelled smear fields; left out: "
            f"{dict(skipped) or 'nothing'} (a detector is scored on a YOLO or Pascal VOC set)")
    if unknown:
        log.warning("%s: boxes of %s are left out, the model detects only %s; dropped: %s",
                    path, unknown, classes, dict(dropped))
    frame = pd.DataFrame(rows).sort_values("sha256", kind="stable").reset_index(drop=True)
    frame.insert(4, "n_boxes", frame[[f"n_boxes__{c}" for c in classes]].sum(axis=1))
    return layout, frame, {"skipped": dict(skipped), "boxes_dropped": dict(dropped),
                           "classes_not_in_model": unknown}


def _per_image(rows: pd.DataFrame, matches: list[ImageMatches]) -> pd.DataFrame:
    """The predictions csv: per field, its boxes, the predictions at serving's confidence and
    how many of them hit a box (IoU >= 0.5), from the validator's own matches."""
    if len(matches) != len(rows):
        raise DataValidationError(f"the validator judged {len(matches)} fields of {len(rows)}")
    predicted, hits = [], []
    for im in matches:
        n = tp = 0
        for c, scores in im.scores.items():
            keep = np.asarray(scores) >= SERVE_CONF
            n += int(keep.sum())
            tp += int(np.asarray(im.true_positive[c])[keep].sum())
        predicted.append(n)
        hits.append(tp)
    table = rows.drop(columns=["path", "labels"]).copy()
    table[f"n_predicted_conf{SERVE_CONF:g}"] = predicted
    table["n_true_positive_iou0.5"] = hits
    table["n_missed"] = table["n_boxes"] - table["n_true_positive_iou0.5"]
    return table


def score_folder(cfg: Config, model_dir: Path, meta: dict[str, Any], path: Path, *,
                 n_bootstrap: int, work: Path, title: str) -> Scored:
    """The training run's test metrics of this detector, measured on the folder's fields."""
    from training.detector.predict import configure_ultralytics, read_model_dir
    from training.detector.yolo_data import write_yolo_test_set

    weights, meta = read_model_dir(model_dir)
    classes = [str(c) for c in meta["classes"]]
    layout, rows, left_out = folder_fields(path, classes)
    data_yaml = write_yolo_test_set(
        [(Path(p), sha, text) for p, sha, text in rows[["path", "sha256", "labels"]].itertuples(
            index=False)], work / "data", classes)
    configure_ultralytics(cfg.home)
    from training.detector.train import _device, evaluate_weights

    imgsz = int(meta.get("imgsz") or cfg.detector.imgsz)
    metrics, matches = evaluate_weights(
        weights, data_yaml, imgsz=imgsz, batch=cfg.detector.batch, device=_device(),
        classes=classes, out_dir=work / "val", n_bootstrap=n_bootstrap)
    dropped = left_out["boxes_dropped"]
    return Scored(
        layout=layout, table=_per_image(rows, matches), metrics=metrics,
        skipped=left_out["skipped"], dataset_columns=["sha256", "n_boxes"],
        params={"imgsz": imgsz, "batch": cfg.detector.batch, "classes": ",".join(classes),
                "n_boxes": int(rows["n_boxes"].sum()),
                **{f"boxes_dropped.{k}": v for k, v in dropped.items()}},
        tags={"classes_evaluated": ",".join(c for c in classes
                                            if rows[f"n_boxes__{c}"].sum() > 0),
              "classes_not_in_model": ",".join(left_out["classes_not_in_model"])},
        report={"classes": classes, "boxes_dropped": dropped,
                "classes_not_in_model": left_out["classes_not_in_model"]})
