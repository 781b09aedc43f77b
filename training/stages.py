"""The stages of the platform as plain functions: each DAG task is one call to one of these.

Every function takes the resolved :class:`Config` and JSON-able ids/records, and returns a
record dict, so Airflow only wires and the same chain runs from the CLI without Airflow.
Training runs in a child process per model family (TensorFlow and torch segfault together).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from training.config import Config
from training.errors import PublishError, TrainingError
from training.families import FAMILIES, get_family
from training.lineage import lineage_tags
from training.records import Candidate, Promotion

__all__ = [
    "baseline_rows", "config_env", "curated_dataset", "discover", "promote_best", "publish",
    "rollback", "start_parent_run", "subject_cv", "train", "validate",
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


def curated_dataset(cfg: Config, version: int | None = None) -> dict[str, Any]:
    """A curated dataset version (default: the newest), what retraining freezes and uses."""
    from training.data.dataset import load_manifest

    _, ds = load_manifest(cfg, version)
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


def _run_child(cfg: Config, cmd: list[str], what: str, label: str,
               overrides: dict[str, Any] | None) -> None:
    """Run one training child process under ``pipeline.train_timeout_s``; its output streams
    into our log, and a failure or time-out raises TrainingError with its last lines."""
    env = {**os.environ, "LEUKOFLOW_HOME": str(cfg.home), **config_env(overrides)}
    timeout = cfg.pipeline.train_timeout_s
    log.info("starting (time limit %ds) %s", timeout, " ".join(cmd))
    # A session of its own, so a time-out (or this task being killed) ends the child's
    # whole process tree, data-loader workers included.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        _kill_tree(proc)

    timer = threading.Timer(timeout, expire)
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.info("[%s] %s", label, line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
        proc.wait()
    finally:  # also when Airflow's execution_timeout interrupts this task
        timer.cancel()
        if proc.poll() is None:
            _kill_tree(proc)
    if timed_out.is_set():
        raise TrainingError(f"{what} passed pipeline.train_timeout_s = {timeout}s and was "
                            "killed; last lines:\n" + "\n".join(tail))
    if proc.returncode != 0:
        raise TrainingError(f"{what} exited with {proc.returncode}; last lines:\n"
                            + "\n".join(tail))


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
        what = f"{family} training ({architecture or 'default'})"
        _run_child(cfg, cmd, what, family, overrides)
        if not out.exists():
            raise TrainingError(f"{what} wrote no candidate record")
        candidate = Candidate.from_dict(json.loads(out.read_text()))
    log.info("%s %s: %s", family, candidate.architecture,
             {k: round(v, 4) for k, v in candidate.metrics.items() if "__" not in k})
    return candidate.to_dict()


def subject_cv(cfg: Config, architecture: str, *, dataset_version: int,
               folds: int | None = None, parent_run_id: str | None = None,
               overrides: dict[str, Any] | None = None,
               only_if_small: bool = False,
               feature_classifiers: list[str] | None = None) -> dict[str, Any] | None:
    """Leave-subjects-out CV of one classifier architecture, in its own process
    (``python -m training.classifier.cv``): retrained per fold, scored on unseen subjects.

    ``only_if_small`` (the retrain DAG): run only when the smallest class has fewer subjects
    than ``cv.run_below_subjects_per_class``; otherwise None, and the log says why.
    ``feature_classifiers``: the deep-feature sweep under the same folds (``cv/features/``).
    """
    if only_if_small:
        from training.classifier.cv import min_subjects_per_class, wanted
        from training.data.dataset import load_manifest

        df, _ = load_manifest(cfg, dataset_version)
        cells = df[(df["kind"] == "cell") & df["label"].isin(cfg.data.classes)]
        fewest = min_subjects_per_class(cells, list(cfg.data.classes)) if len(cells) else 0
        if fewest < 2:
            log.warning("leave-subjects-out CV of %s cannot run: a class has %d subject(s), and "
                        "a fold that holds out a class's only subject cannot train on it",
                        architecture, fewest)
            return None
        if not wanted(cfg, cells):
            log.info("leave-subjects-out CV of %s skipped: the smallest class has %d subjects, "
                     "cv.run_below_subjects_per_class = %d", architecture, fewest,
                     cfg.cv.run_below_subjects_per_class)
            return None
        log.info("few subjects (%d in the smallest class < cv.run_below_subjects_per_class = "
                 "%d): leave-subjects-out CV of %s", fewest,
                 cfg.cv.run_below_subjects_per_class, architecture)
    with tempfile.TemporaryDirectory(prefix="leukoflow-cv-") as tmp:
        out = Path(tmp) / "cv.json"
        cmd = [sys.executable, "-m", "training.classifier.cv", "--architecture", architecture,
               "--dataset-version", str(dataset_version), "--out", str(out)]
        if folds:
            cmd += ["--folds", str(folds)]
        if parent_run_id:
            cmd += ["--parent-run-id", parent_run_id]
        if feature_classifiers:
            cmd += ["--feature-classifiers", ",".join(feature_classifiers)]
        what = f"leave-subjects-out CV ({architecture})"
        _run_child(cfg, cmd, what, "cv", overrides)
        if not out.exists():
            raise TrainingError(f"{what} wrote no summary")
        return json.loads(out.read_text())


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child's process group (it was started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def log_comparison(cfg: Config, candidates: list[Candidate], parent_run_id: str,
                   failed: dict[str, list[str]] | None = None) -> None:
    """The papers' tables across architectures, one per family (the classifier's accuracy,
    precision, recall, F1...; the detector's precision, recall, mAP50, mAP50-95 per class...,
    each with parameters, train time and latency), as CSV, markdown and a chart on the DAG
    run's parent MLflow run; trainings that failed are listed beside them
    (``comparison/failed.json``) and tagged on the run."""
    import importlib

    import mlflow

    from training.tracking import configure_mlflow

    by_family: dict[str, list[dict[str, Any]]] = {}
    compared = [c for c in candidates if FAMILIES[c.family].compare_architectures]
    for row in [c.to_dict() for c in compared] + baseline_rows(compared):
        by_family.setdefault(row["family"], []).append(row)
    if not by_family and not failed:
        return
    configure_mlflow(cfg)
    with tempfile.TemporaryDirectory(prefix="leukoflow-cmp-") as tmp:
        paths: list[Path] = []
        for name, rows in sorted(by_family.items()):
            module, func = FAMILIES[name].comparison.split(":")
            paths += getattr(importlib.import_module(module), func)(rows, Path(tmp))
        client = mlflow.MlflowClient()
        if failed:
            (Path(tmp) / "failed.json").write_text(json.dumps(failed, indent=2) + "\n")
            paths.append(Path(tmp) / "failed.json")
            client.set_tag(parent_run_id, "failed_trainings", json.dumps(failed)[:5000])
        for path in paths:
            client.log_artifact(parent_run_id, str(path), "comparison")
        log.info("comparison of %s logged to run %s under comparison/",
                 {k: len(v) for k, v in by_family.items()}, parent_run_id)


def baseline_rows(candidates: list[Candidate]) -> list[dict[str, Any]]:
    """The hand-crafted baseline as comparison rows: one per test set, from the ``baseline/*``
    metrics a candidate measured on its own rows (none where the baseline is a candidate)."""
    from training.families import BASELINE_ARCHITECTURE

    own = {c.test_set_sha256 for c in candidates if c.architecture == BASELINE_ARCHITECTURE}
    rows: dict[str, dict[str, Any]] = {}
    for c in candidates:
        base = {k.removeprefix("baseline/"): v for k, v in c.metrics.items()
                if k.startswith("baseline/")}
        if base and c.test_set_sha256 not in own and c.test_set_sha256 not in rows:
            rows[c.test_set_sha256] = {
                "architecture": f"{BASELINE_ARCHITECTURE} (on the rows of {c.architecture})",
                "split_kind": c.split_kind, "family": c.family,
                "metrics": {**base, "train_time_s": base.get("fit_time_s", float("nan"))}}
    return list(rows.values())


def _selection_source(metric: str, cands: list[Candidate]) -> str:
    """What candidates are ranked on: their leave-subjects-out CV (``cv/``) when every one has
    it (unseen patients, the figure that predicts deployment), else validation rows (``val/``),
    else, only then, the test rows the gate judges the chosen one on."""
    for prefix in ("cv/", "val/"):
        if all(f"{prefix}{metric}" in c.metrics for c in cands):
            return prefix
    return ""


def _rank_key(family: Any, cfg: Config, candidate: Candidate,
              source: str = "") -> tuple[float, str]:
    metric = family.gate_metric(cfg)
    worst = family.best_value()
    value = candidate.metrics.get(f"{source}{metric}", candidate.metrics.get(metric, worst))
    return (value if family.higher_is_better else -value), candidate.architecture


def _with_cv(candidates: list[Candidate],
             cv_results: list[dict[str, Any] | None] | None) -> list[Candidate]:
    """Each classifier candidate gains the ``cv/*`` metrics of its architecture's CV run."""
    by_arch = {r["architecture"]: r for r in (cv_results or []) if r}
    for c in candidates:
        r = by_arch.get(c.architecture)
        if c.family == "classifier" and r:
            c.metrics.update(r["metrics"])
    return candidates


def promote_best(cfg: Config, candidates: list[dict[str, Any] | None], tags: dict[str, str],
                 parent_run_id: str | None = None,
                 expected: dict[str, list[str]] | None = None,
                 cv_results: list[dict[str, Any] | None] | None = None,
                 ) -> list[dict[str, Any]]:
    """Per family, register the best candidate and let the gate decide on ``champion``.

    ``candidates`` may hold None for a training that failed (the DAG's promote runs once every
    training is done): the others are still judged, and ``expected`` (family -> architectures
    that were to be trained) names the missing ones in the log, the parent run and a
    notification. The best is chosen on leave-subjects-out CV metrics (``cv/<gate metric>``)
    when every candidate of the family has them, else on validation metrics (``val/``), else
    on the gated metric, and the choice is logged.
    """
    from training.notify import notify
    from training.promotion.aliases import promote

    by_family: dict[str, list[Candidate]] = {}
    for c in _with_cv([Candidate.from_dict(d) for d in candidates if d], cv_results):
        by_family.setdefault(c.family, []).append(c)
    failed = {fam: sorted(set(archs) - {c.architecture for c in by_family.get(fam, [])})
              for fam, archs in (expected or {}).items()}
    failed = {fam: archs for fam, archs in failed.items() if archs}
    if failed:
        notify(cfg, "training_failed", f"training failed for {failed}; the other candidates "
               "are judged without them", failed=failed, **tags)
    if parent_run_id:
        log_comparison(cfg, [c for cs in by_family.values() for c in cs], parent_run_id,
                       failed=failed)
    promotions = []
    for name, cands in sorted(by_family.items()):
        family = get_family(name)
        metric = family.gate_metric(cfg)
        source = _selection_source(metric, cands)
        best = max(cands, key=lambda c: _rank_key(family, cfg, c, source))
        if len(cands) > 1:
            log.info("%s: chose %s of %s on %s %s", name, best.architecture,
                     [c.architecture for c in cands], {"cv/": "leave-subjects-out CV",
                                                      "val/": "validation"}.get(source, "test"),
                     metric)
        p = promote(cfg, best, tags)
        log.info("%s v%s (%s): %s - %s", p.model_name, p.version, best.architecture,
                 "PROMOTED to champion" if p.promoted else "not promoted", "; ".join(p.reasons))
        if not p.promoted:
            notify(cfg, "gate_refused", f"{p.model_name} v{p.version} ({best.architecture}) "
                   f"was not promoted: {'; '.join(p.reasons)}", model=p.model_name,
                   version=p.version, reasons=p.reasons, **tags)
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


def publish(cfg: Config, promotions: list[dict[str, Any]], *,
            always: bool = False) -> dict[str, Any]:
    """Publish the champions when a family was promoted (TFX's blessing gates the push).

    Nothing promoted: nothing is rebuilt, the service keeps serving what it served, and the
    result says so. ``always``: publish anyway (a rollback, ``leukoflow publish``). A retried
    publish first re-applies a promotion that its failed attempt undid; a failed publish puts
    every alias back as it was before the promotions and notifies.
    """
    from training.notify import notify
    from training.promotion.aliases import redo_promotion, undo_promotion
    from training.publish import bento as publisher

    promoted = [p for p in map(Promotion.from_dict, promotions) if p.promoted]
    if not promoted and not always:
        log.info("no family was promoted: nothing to publish; the service keeps serving "
                 "what it served")
        return {"published": False, "reason": "no family was promoted"}
    for p in promoted:
        redo_promotion(cfg, p)
    try:
        publication = publisher.publish(cfg)
    except Exception as exc:
        for p in promoted:
            log.error("publish failed: putting the aliases of %s back as before v%s",
                      p.model_name, p.version)
            undo_promotion(cfg, p, reason=f"publish failed: {exc}"[:1000])
        notify(cfg, "publish_failed", f"publishing failed and the promotions were undone: "
               f"{exc}"[:2000], promotions=[p.to_dict() for p in promoted])
        if isinstance(exc, PublishError):
            raise
        raise PublishError(f"publishing failed: {exc}") from exc
    from training.publish.deploy import record_deployment

    record_deployment(cfg, publication)  # the running service swaps to it (blue/green)
    log.info("published Bento %s serving %s; smoke test passed: %s; deployed",
             publication.bento_tag, publication.models, publication.smoke)
    return {"published": True, **publication.to_dict()}


def rollback(cfg: Config, model: str, to: str | None = None,
             actor: str | None = None) -> dict[str, Any]:
    """Make version ``to`` (default: the recorded previous champion) the champion of ``model``.

    Idempotent per ``actor`` (the DAG run): a rerun of a finished rollback moves nothing.
    """
    from training.notify import notify
    from training.promotion.aliases import rollback as move

    result = move(cfg, model, to, actor=actor)
    if result["changed"]:
        notify(cfg, "rollback", f"{model} rolled back to v{result['champion']} "
               f"(v{result['demoted']} demoted)", **result)
    else:
        log.info("%s: nothing to roll back (%s)", model, result["reason"])
    return result
