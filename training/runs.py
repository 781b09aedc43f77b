"""The run skeleton both model families share, so the two cannot drift apart.

    with candidate_run(cfg, family, architecture, ds, rows, ...) as run:   # start + tag + params
        ... train, score on test, log the model ...                        # the family's part
        run.record_champion(version, metrics, predictions)                 # same rows, same run
        candidate = run.finish(metrics)                                     # candidate.json

:func:`candidate_run` starts one MLflow run (nested under the DAG run's parent run when given)
tagged with the family, the architecture, the dataset lineage (version, manifest hash, batch
ids, measured split kind, test-set hash) and the code lineage (git sha and where it came from),
logs the dataset version and the resolved config, and yields a :class:`CandidateRun` that
writes the :class:`~training.records.Candidate` the same way for every family.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from training.config import Config
from training.errors import RegistryError
from training.families import Family
from training.lineage import lineage_tags
from training.records import Candidate, CuratedDataset

__all__ = ["CandidateRun", "candidate_run", "run_tags"]


def run_tags(family: Family, architecture: str, ds: CuratedDataset, split_kind: str,
             test_sha: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The tags every candidate run carries (family, data and code lineage), then ``extra``."""
    tags = {"family": family.name, "architecture": architecture,
            "dataset_version": str(ds.version), "manifest_sha256": ds.manifest_sha256,
            "batch_ids": ",".join(ds.batch_ids)[:5000], "split_kind": split_kind,
            "test_set_sha256": test_sha, **lineage_tags()}
    return {**tags, **{str(k): str(v)[:5000] for k, v in (extra or {}).items()}}


@dataclass
class CandidateRun:
    """An open candidate run: where to write, and how to record the outcome."""

    family: Family
    architecture: str
    run_id: str
    work: Path
    ds: CuratedDataset
    split_kind: str
    test_sha: str
    champion_version: str | None = None
    champion_metrics: dict[str, float] | None = field(default=None)
    test_dataset: Any = None  # the MLflow dataset of the test rows the metrics are measured on

    def record_champion(self, version: str | None, metrics: dict[str, float] | None,
                        predictions: pd.DataFrame | None = None) -> None:
        """Log the champion's scores on this run's test rows (``champion/*``), if there is one."""
        import mlflow

        if version is None or metrics is None:
            return
        self.champion_version, self.champion_metrics = version, metrics
        mlflow.log_metrics({f"champion/{k}": v for k, v in metrics.items()})
        mlflow.set_tag("champion_version", version)
        if predictions is not None:
            mlflow.log_text(predictions.to_csv(index=False), "predictions/champion_test.csv")

    def finish(self, metrics: dict[str, float], model: Any) -> Candidate:
        """Log the test metrics linked to the logged ``model`` (MLflow's ``ModelInfo``) and the
        test rows, and return the Candidate record (also logged as ``candidate.json``). The
        Candidate names the logged model's own URI, which the registry registers."""
        import mlflow

        mlflow.log_metrics(metrics, model_id=model.model_id, dataset=self.test_dataset)
        candidate = Candidate(
            family=self.family.name, architecture=self.architecture, run_id=self.run_id,  # type: ignore[arg-type]
            model_uri=model.model_uri, metrics=metrics,
            split_kind=self.split_kind, test_set_sha256=self.test_sha,
            dataset_version=self.ds.version, champion_version=self.champion_version,
            champion_metrics=self.champion_metrics,
        )
        mlflow.log_dict(candidate.to_dict(), "candidate.json")
        return candidate


@contextmanager
def candidate_run(
    cfg: Config, family: Family, architecture: str, ds: CuratedDataset, rows: pd.DataFrame, *,
    params: dict[str, Any], parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None, extra_tags: dict[str, Any] | None = None,
) -> Iterator[CandidateRun]:
    """Start the candidate's MLflow run and log what every candidate logs (module docstring).

    ``rows``: the manifest rows the candidate learns from and is tested on (the split kind and
    the test-set hash are measured from them); ``params``: the family's resolved parameters;
    ``extra_tags``: family facts (say, the paper); ``tags``: the caller's (Airflow run id, ...).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.data.dataset import measured_split_kind, test_set_sha256
    from training.tracking import configure_mlflow

    experiment_id = configure_mlflow(cfg)
    split_kind, test_sha = measured_split_kind(rows), test_set_sha256(rows)
    all_tags = run_tags(family, architecture, ds, split_kind, test_sha,
                        {**(extra_tags or {}), **(tags or {})})
    try:
        run_ctx = mlflow.start_run(
            experiment_id=experiment_id, run_name=f"{family.name}-{architecture}",
            nested=parent_run_id is not None, parent_run_id=parent_run_id, tags=all_tags)
    except MlflowException as exc:
        raise RegistryError(f"cannot start the {family.name} run (parent run {parent_run_id}): "
                            f"{exc}") from exc
    with run_ctx as run:
        run_id = run.info.run_id
        work = cfg.runs_dir / family.name / run_id
        work.mkdir(parents=True, exist_ok=True)
        mlflow.log_params({**params, "dataset_version": ds.version})
        mlflow.log_dict(cfg.dump(), "config.json")
        manifest, test = _datasets(ds, rows)
        mlflow.log_input(manifest, context="training")
        mlflow.log_input(test, context="test")
        yield CandidateRun(family=family, architecture=architecture, run_id=run_id, work=work,
                           ds=ds, split_kind=split_kind, test_sha=test_sha, test_dataset=test)


def _datasets(ds: CuratedDataset, rows: pd.DataFrame) -> tuple[Any, Any]:
    """The frozen manifest rows this family uses, and its test rows, as MLflow datasets (ids,
    labels, subjects and splits only: never pixels or local paths)."""
    import mlflow.data

    cols = [c for c in ("sha256", "kind", "label", "subject_id", "split", "batch_id")
            if c in rows.columns]
    frame = rows[cols].reset_index(drop=True)
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    source = ds.manifest_uri
    return (mlflow.data.from_pandas(frame, source=source, name=f"curated-v{ds.version}",
                                    targets="label"),
            mlflow.data.from_pandas(test, source=source, name=f"curated-v{ds.version}-test",
                                    targets="label"))
