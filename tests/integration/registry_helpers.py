"""What the registry tests share: a tiny logged model and a Candidate scored as told."""

from __future__ import annotations

import mlflow

from training.records import Candidate
from training.tracking import configure_mlflow


class Const(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def scored_candidate(cfg, score: float, champion: tuple[str, float] | None = None, *,
                     architecture: str = "tiny", extra: dict | None = None) -> Candidate:
    """Log a tiny model in a new run and describe it as a classifier candidate scored
    ``score`` (balanced accuracy), compared with ``champion`` = (version, its score)."""
    exp = configure_mlflow(cfg)
    with mlflow.start_run(experiment_id=exp) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Const(), pip_requirements=[])
    return Candidate(
        family="classifier", architecture=architecture, run_id=run.info.run_id,
        model_uri=info.model_uri, metrics={"balanced_accuracy": score, **(extra or {})},
        split_kind="subject", test_set_sha256="abc", dataset_version=1,
        champion_version=champion[0] if champion else None,
        champion_metrics={"balanced_accuracy": champion[1]} if champion else None,
    )
