"""``leukoflow cv`` end to end on synthetic cells: the CNN retrained per subject fold, in a child.

One focused run (VGG16 at 32 px, one epoch, two folds): the DAG's ``train_subject_cv`` task is
the same stage function, switched off in the e2e profile so the DAG tests do not retrain the
CNN per fold.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.integration.test_classifier_train import ROOT, _child_env, _curate_cells
from training.config import load_config

pytestmark = pytest.mark.slow


def test_cli_cv_retrains_per_subject_fold_and_logs_subject_level_figures(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "leukoflow.yaml").write_text(textwrap.dedent("""
        classifier:
          architectures: [vgg16]
          image_size: 32
          epochs: 1
          batch_size: 8
    """))
    version = _curate_cells(home)  # 3 subjects per class, 8 cells each
    proc = subprocess.run(
        [sys.executable, "-c", "from training.cli import main; main()", "cv", "--folds", "2",
         "--dataset-version", str(version)],
        cwd=ROOT, env=_child_env(home), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    m = summary["metrics"]
    assert summary["scheme"] == "2-fold by subject" and m["cv/n_folds"] == 2
    assert m["cv/n_subjects"] == 6 and m["cv/n_subjects__all"] == m["cv/n_subjects__hem"] == 3
    assert m["cv/n_test"] == 48  # every cell predicted once, by a model that never saw it
    assert 0.0 <= m["cv/balanced_accuracy"] <= 1.0
    assert len(summary["subjects"]) == 6  # each held out once, in one of the two folds
    assert {s["fold"] for s in summary["subjects"]} == {0, 1}
    assert "balanced accuracy" in proc.stderr and "over 6 subjects" in proc.stderr

    import mlflow

    from training.tracking import configure_mlflow

    cfg = load_config(home=home)
    configure_mlflow(cfg)
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.tags["leukoflow_role"] == "subject_cv"
    assert run.data.metrics["cv/balanced_accuracy"] == pytest.approx(m["cv/balanced_accuracy"])
    folds = client.search_runs([run.info.experiment_id],
                               f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(folds) == 2 and all("train_loss" in f.data.metrics for f in folds)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "cv")}
    assert {"cv/folds.csv", "cv/subjects.csv", "cv/oof_predictions.csv"} <= arts
