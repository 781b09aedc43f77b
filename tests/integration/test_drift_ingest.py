"""Drift through the ingest itself: the champion's training rows are the reference, a restained
batch is reported as drifted (kept, not quarantined), a fresh batch of the same source is not,
against a threshold calibrated on the champion's own subjects."""

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
# another lab's colour balance, past how much synth's patients differ from each other (each
# has its own tint, up to about ±15 % a channel): the calibrated threshold learns that spread
# from the champion's patients, so the milder 1.15/0.95/0.85 that a fixed 0.1 flagged is,
# for this generator, within what a new patient of the same source may look like
STAIN = (1.5, 0.8, 0.6)


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


def _ingest(cfg, batch_id: str, files_from=None, seed: int = 0, size: dict = SMALL) -> dict:
    dest = cfg.home / "landing" / batch_id
    if files_from is None:
        make_cell_batch(dest, seed=seed, **size)
    else:
        _restained(files_from, dest / "fold_0" / "all", STAIN)
    write_ready(dest)
    result = curation.validate_batch(cfg, batch_id)
    assert result.status == "accepted", result
    return json.loads((Path(result.report_dir) / "summary.json").read_text())


def test_a_restained_batch_is_reported_drifted_and_a_fresh_one_is_not(tmp_path: Path) -> None:
    cfg = load_config(home=tmp_path / "home", validation={"workers": 1})
    # enough patients that the champion's train rows hold several to calibrate on
    first = _ingest(cfg, "first", seed=1, size={**SMALL, "n_subjects_per_class": 5})
    assert first["drift"]["status"] == "no_reference"  # no champion yet: nothing claimed
    _register_champion(cfg, first["dataset_version"])

    fresh = _ingest(cfg, "fresh", seed=2)
    make_cell_batch(tmp_path / "src", seed=3, **SMALL)
    restained = _ingest(cfg, "restained", files_from=sorted((tmp_path / "src").rglob("*.png")))
    assert fresh["drift"]["status"] == restained["drift"]["status"] == "measured"
    seen = {k: (b["drift"]["score"], b["drift"]["threshold"], b["drift"]["threshold_mode"])
            for k, b in (("fresh", fresh), ("restained", restained))}
    assert not fresh["drift"]["drifted"] and "drift" not in fresh["soft_failures"], seen
    assert restained["drift"]["drifted"] and "drift" in restained["soft_failures"], seen
    # the threshold came from the champion's own subjects, and the report says how
    cal = restained["drift"]["calibration"]
    assert restained["drift"]["threshold_mode"] == "calibrated", restained["drift"]
    assert restained["drift"]["threshold"] == pytest.approx(max(0.1, cal["threshold"]))
    assert cal["n_subjects"] >= 4 and cal["n_splits"] == 200
    assert restained["quarantined"] == 0  # a warning, never a quarantine
    assert restained["drift"]["reference"].startswith(f"{cfg.mlflow.classifier_name} v1")
    html = (cfg.reports_dir / "restained" / "quarantine.html").read_text()
    assert "<h2>Drift</h2>" in html and "drifted" in html and "calibrated: " in html
    from mlflow import MlflowClient

    run = MlflowClient().get_run(restained["drift"]["mlflow_run_id"])
    assert run.data.tags["run_kind"] == "drift"
    assert run.data.metrics["drift_score"] == pytest.approx(restained["drift"]["score"])
    assert run.data.params["drift_threshold_mode"] == "calibrated"
    assert float(run.data.params["drift_threshold"]) == pytest.approx(
        restained["drift"]["threshold"])
    assert run.data.params["drift_calibration.n_splits"] == "200"
    assert "drift_calibration_null_quantile" in run.data.metrics
