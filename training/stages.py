"""The stages of the platform as plain functions: each DAG task is one call to one of these.

Every function takes the resolved :class:`Config` and JSON-able ids/records, and returns a
record dict, so Airflow only wires and the same chain runs from the CLI without Airflow.
Training runs in a child process per model family (TensorFlow and torch segfault together).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from training.config import Config
from training.errors import PublishError, TrainingError
from training.families import FAMILIES, get_family
from training.lineage import lineage_tags
from training.records import Candidate, Promotion

__all__ = [
    "config_env", "curated_dataset", "discover", "promote_best", "publish", "rollback",
    "start_parent_run", "train", "validate",
]

log = logging.getLogger("leukoflow.stages")


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}__{k.upper()}", v, out)
    elif value is not None:
        out[prefix] = value if isinstance(value, str) else json.dumps(value)


def config_env(overrides: dict[str, Any] | None) -> dict[str, str]:
    """``LEUKOFLOW_*`` variables that carry nested overrides into a child process."""
    out: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        _flatten(f"LEUKOFLOW_{key.upper()}", value, out)
    return out


def discover(cfg: Config) -> list[str]:
    """Batch ids that are complete (marker present) and not processed yet."""
    from training.data.batches import discover_batches

    batches = discover_batches(cfg)
    log.info("found %d new complete batch(es): %s", len(batches), [b.batch_id for b in batches])
    return [b.batch_id for b in batches]


def validate(cfg: Config, batch_id: str) -> dict[str, Any]:
    """Validate one batch, quarantine what fails, curate what passes (idempotent)."""
    from training.data.curation import validate_batch
    from training.reports import publish_report

    result = validate_batch(cfg, batch_id)
    log.info("batch %s: %s, %d accepted, %d quarantined %s; report %s", batch_id, result.status,
             result.accepted, result.quarantined, result.reasons, result.report_dir)
    if result.status != "skipped":
        publish_report(cfg, batch_id, result.report_dir, result.data_docs)
    return result.to_dict()


def curated_dataset(cfg: Config) -> dict[str, Any]:
    """The newest curated dataset version (what retraining will freeze and use)."""
    from training.data.dataset import load_manifest

    _, ds = load_manifest(cfg)
    return ds.to_dict()


def start_parent_run(cfg: Config, airflow_run_id: str, dataset: dict[str, Any]) -> str:
    """One MLflow parent run per DAG run (found again on a rerun), children nest under it."""
    import mlflow

    from training.tracking import configure_mlflow

    exp_id = configure_mlflow(cfg)
    found = mlflow.search_runs([exp_id], f"tags.airflow_run_id = '{airflow_run_id}' "
                               "and tags.leukoflow_role = 'pipeline'", output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(experiment_id=exp_id, run_name=f"retrain {airflow_run_id}") as run:
        mlflow.set_tags({"airflow_run_id": airflow_run_id, "leukoflow_role": "pipeline",
                         **lineage_tags(), "dataset_version": str(dataset["version"]),
                         "dataset_manifest_sha256": dataset["manifest_sha256"],
                         "batch_ids": ",".join(dataset["batch_ids"])})
        mlflow.log_dict(cfg.dump(), "config.json")
        return run.info.run_id


def train(
    cfg: Config, family: str, *, architecture: str | None = None, dataset_version: int,
    parent_run_id: str | None = None, tags: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train + evaluate one candidate in its own process; its output streams into our log."""
    module = get_family(family).train_module
    with tempfile.TemporaryDirectory(prefix="leukoflow-") as tmp:
        out = Path(tmp) / "candidate.json"
        cmd = [sys.executable, "-m", module, "--dataset-version", str(dataset_version),
               "--out", str(out), "--tags-json", json.dumps(tags or {})]
        if architecture:
            cmd += ["--architecture", architecture]
        if parent_run_id:
            cmd += ["--parent-run-id", parent_run_id]
        env = {**os.environ, "LEUKOFLOW_HOME": str(cfg.home), **config_env(overrides)}
        log.info("starting %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            log.info("[%s] %s", family, line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
        if proc.wait() != 0 or not out.exists():
            raise TrainingError(f"{family} training ({architecture or 'default'}) exited with "
                                f"{proc.returncode}; last lines:\n" + "\n".join(tail))
        candidate = Candidate.from_dict(json.loads(out.read_text()))
    log.info("%s %s: %s", family, candidate.architecture,
             {k: round(v, 4) for k, v in candidate.metrics.items() if "__" not in k})
    return candidate.to_dict()


def log_comparison(cfg: Config, candidates: list[Candidate], parent_run_id: str) -> None:
    """The papers' table (accuracy, precision, recall, F1, parameters...) across architectures,
    as CSV, markdown and a chart on the DAG run's parent MLflow run."""
    import mlflow

    from training.evaluation.metrics import save_comparison
    from training.tracking import configure_mlflow

    rows = [c.to_dict() for c in candidates if FAMILIES[c.family].compare_architectures]
    if not rows:
        return
    configure_mlflow(cfg)
    with tempfile.TemporaryDirectory(prefix="leukoflow-cmp-") as tmp:
        paths = save_comparison(rows, Path(tmp))
        client = mlflow.MlflowClient()
        for path in paths:
            client.log_artifact(parent_run_id, str(path), "comparison")
        log.info("comparison of %d architecture(s) logged to run %s under comparison/",
                 len(rows), parent_run_id)


def promote_best(cfg: Config, candidates: list[dict[str, Any]], tags: dict[str, str],
                 parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Per family, register the best candidate and let the gate decide on ``champion``."""
    from training.promotion.aliases import promote

    by_family: dict[str, list[Candidate]] = {}
    for c in map(Candidate.from_dict, candidates):
        by_family.setdefault(c.family, []).append(c)
    if parent_run_id:
        log_comparison(cfg, [c for cs in by_family.values() for c in cs], parent_run_id)
    promotions = []
    for name, cands in sorted(by_family.items()):
        family = get_family(name)
        metric = family.gate_metric(cfg)
        ranked = sorted(cands, key=lambda c: c.metrics.get(metric, family.best_value()),
                        reverse=family.higher_is_better)
        best = ranked[0]
        p = promote(cfg, best, tags)
        log.info("%s v%s (%s): %s - %s", p.model_name, p.version, best.architecture,
                 "PROMOTED to champion" if p.promoted else "not promoted", "; ".join(p.reasons))
        _model_card(cfg, p.model_name, p.version)
        promotions.append(p.to_dict())
    return promotions


def _model_card(cfg: Config, name: str, version: str) -> None:
    """Log the version's model card; a card that cannot be made is logged, never fatal."""
    from training.promotion.modelcard import log_card

    try:
        log_card(cfg, name, version)
    except Exception:  # noqa: BLE001 - the version is registered and gated either way
        log.exception("model card of %s v%s could not be made", name, version)


def publish(cfg: Config, promotions: list[dict[str, Any]]) -> dict[str, Any]:
    """Build and smoke-test the Bento of the champions; on failure put the aliases back."""
    from training.promotion.aliases import undo_promotion
    from training.publish import bento as publisher

    try:
        publication = publisher.publish(cfg)
    except Exception as exc:
        for p in map(Promotion.from_dict, promotions):
            log.error("publish failed: rolling %s back from v%s", p.model_name, p.version)
            undo_promotion(cfg, p)
        if isinstance(exc, PublishError):
            raise
        raise PublishError(f"publishing failed: {exc}") from exc
    log.info("published Bento %s serving %s; smoke test passed: %s", publication.bento_tag,
             publication.models, publication.smoke)
    return publication.to_dict()


def rollback(cfg: Config, model: str) -> dict[str, str]:
    """Swap ``champion`` and ``previous_champion`` of the registered model ``model``."""
    from training.promotion.aliases import rollback as swap

    champion, demoted = swap(cfg, model)
    log.info("%s rolled back: champion v%s, demoted v%s", model, champion, demoted)
    return {"model": model, "champion": champion, "demoted": demoted}
