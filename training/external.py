"""``leukoflow evaluate MODEL PATH``: score a model on a labelled folder it never trained on.

"How does the champion do on this other lab's images?" The folder may be in any layout the
importers know (:mod:`training.data.importers`: manifest.csv, C-NMC names, class folders);
nothing is curated, copied or split. The model is any logged classifier an MLflow client can
name: ``leukemia-classifier@champion``, ``leukemia-classifier/3``, ``runs:/<id>/model``,
``models:/...``. What comes out is the same evaluation a training run logs for its test rows
(:func:`training.evaluation.metrics.classification_metrics` on the model's own preprocessing
and temperature, plots, per-image predictions), as an MLflow **evaluation run** whose metrics
are linked to the logged model (MLflow 3's ``model_id``) and whose split kind is ``external``;
a registered version also gets a tag ``evaluation.<run id>`` pointing at it, which the web
app's model page lists. Images of the folder that are byte-identical to the model's own
training or validation rows are counted (``n_seen_in_training``) and reported: such a set is
not external.

Detector versions are refused with a message (mAP on a labelled field folder is not built yet).
TensorFlow is imported only when a classifier is scored: run this in a process without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config
from training.errors import ConfigError, DataValidationError, RegistryError

__all__ = ["EXTERNAL", "ModelRef", "evaluate_folder", "resolve_model_ref"]

log = logging.getLogger(__name__)

EXTERNAL = "external"  # the split kind of every figure this module reports
_NAME_VERSION = re.compile(r"^(?P<name>[^/@:]+)/(?P<version>\d+)$")
_NAME_ALIAS = re.compile(r"^(?P<name>[^/@:]+)@(?P<alias>[A-Za-z0-9_\-]+)$")


@dataclass
class ModelRef:
    """What the user named, resolved: the URI to download and, if registered, name+version."""

    given: str
    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None


def parse_model_ref(ref: str) -> ModelRef:
    """``name@alias`` / ``name/3`` / ``runs:/...`` / ``models:/...`` -> a :class:`ModelRef`
    (no MLflow call; the version of an alias is looked up by :func:`resolve_model_ref`)."""
    ref = ref.strip()
    body = ref.removeprefix("models:/")
    if m := _NAME_ALIAS.match(body):
        return ModelRef(ref, f"models:/{body}", name=m["name"], alias=m["alias"])
    if m := _NAME_VERSION.match(body):
        return ModelRef(ref, f"models:/{body}", name=m["name"], version=m["version"])
    if ref.startswith(("runs:/", "models:/")):
        return ModelRef(ref, ref)  # a run's model, or a logged model's id (models:/m-...)
    raise ConfigError(
        f"cannot read the model reference {ref!r}: use <registered name>@<alias> "
        "(leukemia-classifier@champion), <registered name>/<version> (leukemia-classifier/3), "
        "runs:/<run id>/model or models:/<...>")


def resolve_model_ref(cfg: Config, ref: str) -> ModelRef:
    """Parse ``ref`` and look up the version behind an alias (or the registered version of a
    run's model), so the evaluation can be tagged on the version it measured."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking import configure_mlflow

    model = parse_model_ref(ref)
    configure_mlflow(cfg)
    client = MlflowClient()
    try:
        if model.alias is not None:
            mv = client.get_model_version_by_alias(model.name, model.alias)
            model.version = str(mv.version)
            model.uri = f"models:/{model.name}/{model.version}"
        elif model.version is not None:
            client.get_model_version(model.name, model.version)
    except MlflowException as exc:
        raise RegistryError(f"no model version {ref!r} in the registry at {cfg.tracking_uri}: "
                            f"{exc.message}") from exc
    return model


# --------------------------------------------------------------------------------- folder
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
                     "subject_id": rec.subject_id,
                     "sha256": hashlib.sha256(file.read_bytes()).hexdigest()})
    if not rows:
        raise DataValidationError(
            f"{path} (layout {layout}) holds no labelled cell images of the model's classes "
            f"{classes}; left out: {skipped or 'nothing'}")
    return layout, pd.DataFrame(rows), skipped


def _seen_in_training(cfg: Config, run_tags: dict[str, str], shas: pd.Series) -> int | None:
    """How many of these images the model trained or validated on (None: unknown)."""
    from training.data.dataset import load_manifest

    version = run_tags.get("dataset_version")
    if not version:
        return None
    try:
        df, _ = load_manifest(cfg, int(version))
    except (DataValidationError, OSError, ValueError) as exc:
        log.warning("cannot read dataset version %s to check for overlap: %s", version, exc)
        return None
    seen = set(df.loc[df["split"].isin(["train", "val"]), "sha256"])
    return int(shas.isin(seen).sum())


# --------------------------------------------------------------------------------- scoring
def _classifier_probabilities(model_dir: Path, paths: list[str]) -> tuple[np.ndarray, dict]:
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


def _model_family(model_dir: Path) -> dict[str, Any]:
    import yaml

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        raise RegistryError(f"{model_dir} is not a logged MLflow model (no MLmodel file)")
    return (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}


def evaluate_folder(cfg: Config, ref: str, path: Path, *, n_bootstrap: int = 1000,
                    tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Score model ``ref`` on the labelled folder ``path``; log it as an evaluation run.

    Returns the report (``evaluation.json`` of the run): model, folder, layout, split kind
    ``external``, the run id, the metrics and what was left out.
    """
    import mlflow
    import mlflow.data

    from training.evaluation.metrics import (
        classification_metrics,
        save_classification_plots,
        subject_groups,
    )
    from training.tracking import configure_mlflow

    path = Path(path)
    if not path.is_dir():
        raise DataValidationError(f"{path} is not a folder")
    model = resolve_model_ref(cfg, ref)
    experiment_id = configure_mlflow(cfg)
    work = cfg.runs_dir / "evaluations" / hashlib.sha256(
        f"{model.uri}|{path.resolve()}".encode()).hexdigest()[:16]
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.uri,
                                                             dst_path=str(work / "model")))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a bad URI
        raise RegistryError(f"cannot download {model.uri}: {exc}") from exc
    meta = _model_family(model_dir)
    family = meta.get("family")
    if family == "detector":
        raise ConfigError(
            f"{ref} is a detector: `leukoflow evaluate` scores classifiers only so far "
            "(a detector's mAP50 on a labelled field folder: training/evaluation/detection.py "
            "has the metric, the folder scoring is not built yet)")
    if family != "classifier":
        raise RegistryError(f"{ref} is not a leukoflow model (metadata family {family!r})")
    info = mlflow.models.get_model_info(model.uri)
    classes = [str(c) for c in meta["classes"]]
    positive = meta.get("positive_class") if len(classes) == 2 else None
    layout, rows, skipped = folder_rows(path, classes)
    train_run = mlflow.get_run(info.run_id) if info.run_id else None
    train_tags = dict(train_run.data.tags) if train_run else {}
    seen = _seen_in_training(cfg, train_tags, rows["sha256"])

    y_prob, meta = _classifier_probabilities(model_dir, list(rows["path"]))
    y_true = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    metrics = classification_metrics(y_true, y_prob, classes, positive,
                                     n_bootstrap=n_bootstrap, groups=subject_groups(rows))
    metrics["n_skipped"] = float(sum(skipped.values()))
    if seen is not None:
        metrics["n_seen_in_training"] = float(seen)
        if seen:
            log.warning("%d of %d images of %s are byte-identical to the model's own training "
                        "or validation rows: this set is not external", seen, len(rows), path)
    table = rows[["file", "sha256", "label", "subject_id"]].copy()
    for j, cls in enumerate(classes):
        table[f"p_{cls}"] = y_prob[:, j]
    table["predicted"] = [classes[i] for i in y_prob.argmax(axis=1)]
    table["correct"] = table["predicted"] == table["label"]

    set_sha = hashlib.sha256("\n".join(sorted(rows["sha256"])).encode()).hexdigest()
    run_tags = {
        "run_kind": "evaluation", "family": "classifier", "split_kind": EXTERNAL,
        "evaluated_model": model.given, "evaluated_model_uri": model.uri,
        "model_name": model.name or "", "model_version": model.version or "",
        "model_id": info.model_id or "", "architecture": str(meta.get("architecture", "")),
        "trained_on_dataset_version": train_tags.get("dataset_version", ""),
        "evaluation_folder": str(path.resolve())[:5000], "layout": layout,
        "external_set_sha256": set_sha, **(tags or {})}
    label = f"v{model.version}" if model.version else (info.run_id or "model")[:8]
    with mlflow.start_run(experiment_id=experiment_id, tags=run_tags,
                          run_name=f"evaluate-{model.name or 'model'}-{label}-{path.name}") as run:
        dataset = mlflow.data.from_pandas(
            table[["sha256", "label", "subject_id"]], source=str(path.resolve()),
            name=f"external-{path.name}-{set_sha[:8]}", targets="label")
        mlflow.log_input(dataset, context=EXTERNAL)
        mlflow.log_params({"n_images": len(rows), "layout": layout,
                           "temperature": float(meta.get("temperature") or 1.0),
                           **{f"skipped.{k}": v for k, v in skipped.items()}})
        mlflow.log_metrics(metrics, model_id=info.model_id, dataset=dataset)
        for plot in save_classification_plots(y_true, y_prob, classes, work / "plots",
                                              title=f"{model.given} on {path.name} (external)"):
            mlflow.log_artifact(str(plot), artifact_path="plots")
        mlflow.log_text(table.to_csv(index=False), "predictions/external.csv")
        report = {"model": asdict(model), "model_id": info.model_id, "folder":
                  str(path.resolve()), "layout": layout, "split_kind": EXTERNAL,
                  "run_id": run.info.run_id, "n_images": len(rows), "skipped": skipped,
                  "n_seen_in_training": seen, "metrics": metrics}
        mlflow.log_dict(report, "evaluation.json")
    if model.name and model.version:
        _tag_version(cfg, model, run.info.run_id, path, metrics)
    (work / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _tag_version(cfg: Config, model: ModelRef, run_id: str, path: Path,
                 metrics: dict[str, float]) -> None:
    """``evaluation.<run id>`` on the version: what it was scored on, and the headline."""
    from mlflow import MlflowClient

    summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("balanced_accuracy", "accuracy",
                                                          "roc_auc", "ece") if k in metrics)
    MlflowClient().set_model_version_tag(
        model.name, model.version, f"evaluation.{run_id}",
        f"{EXTERNAL} {path.name} (n={int(metrics['n_test'])}): {summary}"[:5000])
