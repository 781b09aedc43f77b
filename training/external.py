"""``leukoflow evaluate MODEL PATH``: score a model on a labelled folder it never trained on.

"How does the champion do on this other lab's images?" The model is any logged leukoflow model
an MLflow client can name: ``leukemia-classifier@champion``, ``leukemia-detector/3``,
``runs:/<id>/model``, ``models:/...``; its family (the MLmodel metadata) picks the scorer from
the family table (``Family.evaluate``: :mod:`training.classifier.external` for a cell folder,
:mod:`training.detector.external` for a labelled field folder). The folder may be in any layout
the importers know (:mod:`training.data.importers`); nothing is curated, copied or split. What
comes out is the same evaluation a training run logs for its test rows, as an MLflow
**evaluation run** whose metrics are linked to the logged model (MLflow 3's ``model_id``) and
whose split kind is ``external``, with a per-image ``predictions/external.csv``; a registered
version also gets a tag ``evaluation.<run id>`` pointing at it, which the web app's model page
lists. Images of the folder that are byte-identical to the model's own training or validation
rows are counted (``n_seen_in_training``) and reported: such a set is not external.

A scorer imports its framework (TensorFlow for a classifier, torch for a detector) and only
one is imported per call: run this in a process that holds neither (the CLI does).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from training.config import Config
from training.errors import ConfigError, DataValidationError, RegistryError
from training.families import FAMILIES, Family

__all__ = ["EXTERNAL", "ModelRef", "Scored", "evaluate_folder", "headline", "resolve_model_ref"]

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


# --------------------------------------------------------------------------------- scored
@dataclass
class Scored:
    """What a family's scorer (``Family.evaluate``) measured on a folder, ready to log.

    ``table`` holds one row per scored image with at least ``file`` and ``sha256`` (the
    predictions csv); ``dataset_columns`` of it make the MLflow dataset the metrics are linked
    to (``targets`` names its label column, if any); ``plots`` are files under ``plots/``.
    """

    layout: str
    table: pd.DataFrame
    metrics: dict[str, float]
    skipped: dict[str, int]
    dataset_columns: list[str]
    targets: str | None = None
    plots: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
def _model_family(model_dir: Path, ref: str) -> tuple[Family, dict[str, Any]]:
    """The family record and MLmodel metadata of a downloaded model (read as YAML)."""
    import yaml

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        raise RegistryError(f"{model_dir} is not a logged MLflow model (no MLmodel file)")
    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    family = FAMILIES.get(str(meta.get("family")))
    if family is None:
        raise RegistryError(f"{ref} is not a leukoflow model (metadata family "
                            f"{meta.get('family')!r}, not one of {sorted(FAMILIES)})")
    return family, meta


def _scorer(family: Family) -> Callable[..., Scored]:
    module, func = family.evaluate.split(":")
    return getattr(importlib.import_module(module), func)


def evaluate_folder(cfg: Config, ref: str, path: Path, *, n_bootstrap: int = 1000,
                    tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Score model ``ref`` on the labelled folder ``path``; log it as an evaluation run.

    The model's family (its MLmodel metadata) picks the scorer (``Family.evaluate``).
    Returns the report (``evaluation.json`` of the run): model, family, folder, layout, split
    kind ``external``, the run id, the metrics and what was left out.
    """
    import mlflow
    import mlflow.data

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
    family, meta = _model_family(model_dir, ref)
    info = mlflow.models.get_model_info(model.uri)
    train_run = mlflow.get_run(info.run_id) if info.run_id else None
    train_tags = dict(train_run.data.tags) if train_run else {}

    scored = _scorer(family)(cfg, model_dir, meta, path, n_bootstrap=n_bootstrap, work=work,
                             title=f"{model.given} on {path.name} (external)")
    table, metrics = scored.table, dict(scored.metrics)
    seen = _seen_in_training(cfg, train_tags, table["sha256"])
    metrics["n_skipped"] = float(sum(scored.skipped.values()))
    if seen is not None:
        metrics["n_seen_in_training"] = float(seen)
        if seen:
            log.warning("%d of %d images of %s are byte-identical to the model's own training "
                        "or validation rows: this set is not external", seen, len(table), path)

    set_sha = hashlib.sha256("\n".join(sorted(table["sha256"])).encode()).hexdigest()
    run_tags = {
        "run_kind": "evaluation", "family": family.name, "split_kind": EXTERNAL,
        "evaluated_model": model.given, "evaluated_model_uri": model.uri,
        "model_name": model.name or "", "model_version": model.version or "",
        "model_id": info.model_id or "", "architecture": str(meta.get("architecture", "")),
        "trained_on_dataset_version": train_tags.get("dataset_version", ""),
        "evaluation_folder": str(path.resolve())[:5000], "layout": scored.layout,
        "external_set_sha256": set_sha, **scored.tags, **(tags or {})}
    label = f"v{model.version}" if model.version else (info.run_id or "model")[:8]
    with mlflow.start_run(experiment_id=experiment_id, tags=run_tags,
                          run_name=f"evaluate-{model.name or 'model'}-{label}-{path.name}") as run:
        dataset = mlflow.data.from_pandas(
            table[scored.dataset_columns], source=str(path.resolve()),
            name=f"external-{path.name}-{set_sha[:8]}", targets=scored.targets)
        mlflow.log_input(dataset, context=EXTERNAL)
        mlflow.log_params({"n_images": len(table), "layout": scored.layout, **scored.params,
                           **{f"skipped.{k}": v for k, v in scored.skipped.items()}})
        mlflow.log_metrics(metrics, model_id=info.model_id, dataset=dataset)
        for plot in scored.plots:
            mlflow.log_artifact(str(plot), artifact_path="plots")
        mlflow.log_text(table.to_csv(index=False), "predictions/external.csv")
        report = {"model": asdict(model), "model_id": info.model_id, "family": family.name,
                  "folder": str(path.resolve()), "layout": scored.layout,
                  "split_kind": EXTERNAL, "run_id": run.info.run_id, "n_images": len(table),
                  "skipped": scored.skipped, "n_seen_in_training": seen, **scored.report,
                  "metrics": metrics}
        mlflow.log_dict(report, "evaluation.json")
    if model.name and model.version:
        _tag_version(model, family, run.info.run_id, path, metrics)
    (work / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def headline(family: Family, metrics: dict[str, float]) -> dict[str, Any]:
    """The family's headline figures of a report (``Family.headline``) and, under ``ci95``,
    their 95 % CIs as ``[low, high]``."""
    out: dict[str, Any] = {k: metrics[k] for k in (family.count_metric, *family.headline)
                           if k in metrics}
    out["ci95"] = {k: [metrics[f"{k}_ci_low"], metrics[f"{k}_ci_high"]]
                   for k in family.headline if f"{k}_ci_low" in metrics}
    return out


def _tag_version(model: ModelRef, family: Family, run_id: str, path: Path,
                 metrics: dict[str, float]) -> None:
    """``evaluation.<run id>`` on the version: what it was scored on, and the headline."""
    from mlflow import MlflowClient

    summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in family.headline if k in metrics)
    MlflowClient().set_model_version_tag(
        model.name, model.version, f"evaluation.{run_id}",
        f"{EXTERNAL} {path.name} (n={int(metrics[family.count_metric])}): {summary}"[:5000])
