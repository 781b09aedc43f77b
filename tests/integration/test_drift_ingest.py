"""Drift through the ingest itself: the champion's training rows are the reference, a restained
batch is reported as drifted (kept, not quarantined), a fresh batch of the same source is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_drift import _restained
from training.config import load_config
from training.data import curation
from training.dev.synth import make_cell_batch, write_ready

pytestmark = pytest.mark.slow

SMALL = {"n_subjects_per_class": 3, "images_per_subject": 10, "size": 64}


def _register_champion(cfg, dataset_version: int) -> None:
    """A registered version tagged with the dataset it learned from (all drift reads)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from training.tracking import configure_mlflow

    class Model(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    experiment = configure_mlflow(cfg)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=Model())
    name = cfg.mlflow.classifier_name
    mv = mlflow.register_model(info.model_uri, name)
    client = MlflowClient()
    client.set_model_version_tag(name, mv.version, "dataset_version", str(dataset_version))
    client.set_registered_model_alias(name, "champion", mv.version)


def _ingest(cfg, batch_id: str, files_from=None, seed: int = 0) -> dict:
    dest = cfg.home / "landing" / batch_id
    if files_from is None:
        make_cell_batch(dest, seed=seed, **SMALL)
    else:
        _restained(files_from, dest / "fold_0" / "all", (1.15, 0.95, 0.85))
    write_ready(dest)
    result = curation.validate_batch(cfg, batch_id)
    assert result.status == "accepted", result
    return json.loads((Path(result.report_dir) / "summary.json").read_text())


def test_a_restained_batch_is_reported_drifted_and_a_fresh_one_is_not(tmp_path: Path) -> None:
    cfg = load_config(home=tmp_path / "home", validation={"workers": 1})
    first = _ingest(cfg, "first", seed=1)
    assert first["drift"]["status"] == "no_reference"  # no champion yet: nothing claimed
    _register_champion(cfg, first["dataset_version"])

    fresh = _ingest(cfg, "fresh", seed=2)
    make_cell_batch(tmp_path / "src", seed=3, **SMALL)
    restained = _ingest(cfg, "restained", files_from=sorted((tmp_path / "src").rglob("*.png")))
    assert fresh["drift"]["status"] == restained["drift"]["status"] == "measured"
    assert not fresh["drift"]["drifted"] and "drift" not in fresh["soft_failures"]
    assert restained["drift"]["drifted"] and "drift" in restained["soft_failures"]
    assert restained["quarantined"] == 0  # a warning, never a quarantine
    assert restained["drift"]["reference"].startswith(f"{cfg.mlflow.classifier_name} v1")
    html = (cfg.reports_dir / "restained" / "quarantine.html").read_text()
    assert "<h2>Drift</h2>" in html and "drifted" in html
    from mlflow import MlflowClient

    run = MlflowClient().get_run(restained["drift"]["mlflow_run_id"])
    assert run.data.tags["run_kind"] == "drift"
    assert run.data.metrics["drift_score"] == pytest.approx(restained["drift"]["score"])
