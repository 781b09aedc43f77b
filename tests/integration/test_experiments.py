"""The real-data experiment pipeline end to end, on a tiny synthetic C-NMC-like dataset.

``run_experiment`` lands the folder by symlink, validates and curates it, trains VGG16 (32 px,
1 epoch) in a child process, scores the majority baseline and runs the deep-feature sweep with
two classifiers in another child. The oracles are computed here from the manifest, not taken
from the code under test. TensorFlow must never enter this process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from research.experiments import DatasetSpec, curate, experiment_config, run_experiment
from training.config import load_config
from training.data.dataset import load_manifest
from training.errors import ConfigError

pytestmark = pytest.mark.slow

SPEC = DatasetSpec("synth-cells", "synth",
                   {"task": "binary", "classes": ["all", "hem"], "positive_class": "all"},
                   "synthetic cells made by training.dev.synth.make_cell_batch")
SWEEP = ["logistic_regression", "knn"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from training.dev.synth import make_cell_batch

    root = tmp_path_factory.mktemp("exp")
    source = root / "data"
    make_cell_batch(source, n_subjects_per_class=4, images_per_subject=8, size=48, seed=3)
    before = {m: m in sys.modules for m in ("tensorflow", "torch")}
    result = run_experiment(
        SPEC, home=root / "home", split_level="subject", architectures=["vgg16"],
        image_size=32, epochs=1, batch_size=8, source=source, sweep_names=SWEEP, cv_k=10,
        cv_names=["logistic_regression"])
    after = {m: m in sys.modules for m in ("tensorflow", "torch")}
    return {"result": result, "source": source, "home": root / "home", "before": before,
            "after": after}


def _cells(home: Path) -> pd.DataFrame:
    cfg = load_config(home=home, data=SPEC.data)
    df, _ = load_manifest(cfg)
    return df[df["kind"] == "cell"]


def test_heavy_work_stayed_in_child_processes(experiment: dict) -> None:
    for module, was_there in experiment["before"].items():
        if not was_there:  # another test of the session may have imported it already
            assert not experiment["after"][module], f"{module} was imported in-process"


def test_dataset_was_linked_not_copied(experiment: dict) -> None:
    batch = experiment["home"] / "landing" / SPEC.name
    files = [p for p in batch.rglob("*") if p.is_file() or p.is_symlink()]
    assert (batch / "_READY").is_file()
    links = [p for p in files if p.name != "_READY"]
    assert links and all(p.is_symlink() for p in links)
    assert {p.resolve() for p in links} == {p.resolve() for p in experiment["source"].rglob(
        "*.png")}


def test_comparison_has_cnn_baseline_and_sweep_on_one_test_split(experiment: dict) -> None:
    res = experiment["result"]
    cells = _cells(experiment["home"])
    test, train = cells[cells["split"] == "test"], cells[cells["split"] == "train"]
    # subject level, measured: no test subject has an image on another side
    assert not set(test["subject_id"]) & set(cells.loc[cells["split"] != "test", "subject_id"])
    assert res["split"]["split_kind"] == "subject"
    assert res["split"]["n_test"] == len(test)

    table = pd.read_csv(Path(res["home"]) / "experiment" / "comparison.csv")
    assert list(table["architecture"]) == [
        "vgg16", "majority-class baseline", *[f"vgg16 features + {n}" for n in SWEEP]]
    assert (table["split_kind"] == "subject").all()
    assert (table["n_test"] == len(test)).all()
    assert table["accuracy_ci_low"].notna().all()
    assert (table["accuracy_ci_low"] <= table["accuracy"]).all()
    assert (table["accuracy"] <= table["accuracy_ci_high"]).all()

    # the baseline, recomputed from the manifest: the train split's most frequent class
    majority = train["label"].value_counts().sort_index().idxmax()
    baseline = table.set_index("architecture").loc["majority-class baseline"]
    assert baseline["accuracy"] == pytest.approx(float(np.mean(test["label"] == majority)))
    assert res["baseline"]["balanced_accuracy"] == pytest.approx(0.5)

    cnn = res["candidates"][0]
    assert table.loc[0, "accuracy"] == pytest.approx(cnn["metrics"]["accuracy"])
    assert cnn["test_set_sha256"] == res["features"]["test_set_sha256"]


def test_sweep_used_the_trained_backbone(experiment: dict) -> None:
    feats = experiment["result"]["features"]
    cnn = experiment["result"]["candidates"][0]
    assert feats["architecture"] == "vgg16" and feats["feature_layer"] == "head_gap"
    assert feats["feature_dim"] == 512  # VGG16's last block has 512 channels
    assert cnn["model_uri"] in feats["feature_source"] and feats["backbone_saw_train"]
    assert [r["classifier"] for r in feats["sweep"]] == SWEEP
    # the unseen rows (val + test) hold one subject of each class in val and one in test (the
    # split gives every class a unit in both from 3 units on): a 4-fold grouped CV over them,
    # each fold training on 3 subjects of both classes
    cells = _cells(experiment["home"])
    unseen = cells[cells["split"] != "train"]
    assert unseen.groupby("label")["subject_id"].nunique().to_dict() == {"all": 2, "hem": 2}
    assert feats["grouped_cv"] and not feats.get("cv_note")
    assert {r["n_folds"] for r in feats["grouped_cv"]} == {4.0}


def test_runs_and_artifacts_are_in_mlflow(experiment: dict) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    res = experiment["result"]
    configure_mlflow(load_config(home=experiment["home"]))
    client = MlflowClient()
    parent = res["parent_run_id"]
    cnn = client.get_run(res["candidates"][0]["run_id"])
    assert cnn.data.tags["mlflow.parentRunId"] == parent
    assert "gradcam/grid.png" in {a.path for a in client.list_artifacts(cnn.info.run_id,
                                                                        "gradcam")}
    assert "gradcam_error" not in cnn.data.tags
    sweep = client.get_run(res["features"]["run_id"])
    assert sweep.data.tags["mlflow.parentRunId"] == parent
    assert sweep.data.params["classifiers"] == ",".join(SWEEP)
    assert sweep.data.params["cv_k"] == "4"  # the grouped CV ran (see the sweep test)
    assert sweep.data.params["cv_kind"] == "subject"
    assert "cv_note" not in sweep.data.tags
    names = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert {"comparison/comparison.csv", "comparison/comparison.png",
            "comparison/experiment.md", "comparison/experiment.json"} <= names
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{parent}/comparison/experiment.json")).read_text())
    assert logged["rows"][1]["accuracy"] == pytest.approx(res["baseline"]["accuracy"])


def test_report_names_split_n_test_and_timings(experiment: dict) -> None:
    res = experiment["result"]
    report = (Path(res["home"]) / "experiment" / "experiment.md").read_text()
    assert "subject-level split" in report
    assert "at most one subject in the test split" in report  # 1 test subject per class here
    assert f"| majority-class baseline | subject | {res['split']['n_test']} |" in report
    assert "train vgg16 (child process)" in res["timings"]
    assert res["machine"]["cpus"] == os.cpu_count()


def test_a_home_keeps_its_split_level(experiment: dict) -> None:
    cfg = experiment_config(experiment["home"], SPEC, "image", ["vgg16"], image_size=32)
    with pytest.raises(ConfigError, match="fresh --home"):
        curate(cfg, experiment["source"], SPEC.name)


def test_without_a_model_the_sweep_trains_one_and_says_so(experiment: dict,
                                                           tmp_path: Path) -> None:
    """``python -m training.classifier.features`` with no model, offline: brief training first."""
    import subprocess

    home = experiment["home"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOFLOW_")}
    env.update(LEUKOFLOW_CONFIG=str(home / "experiment.yaml"), TF_CPP_MIN_LOG_LEVEL="2",
               LEUKOFLOW_CLASSIFIER__EPOCHS="1")
    out = tmp_path / "features.json"
    proc = subprocess.run(
        [sys.executable, "-m", "training.classifier.features", "--architecture", "vgg16",
         "--names", "knn",
         "--cv-k", "0", "--bootstrap", "0", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["backbone_saw_train"] is True
    assert "trained here for 1 epoch(s)" in result["feature_source"]
    assert "no ImageNet weights" in result["feature_source"]
    assert "training vgg16 for 1 epoch(s) first" in proc.stderr
    assert [r["classifier"] for r in result["sweep"]] == ["knn"]
    assert result["grouped_cv"] is None
