"""Model cards: every figure on the card is the logged one (or computed from logged predictions).

A run is made the way the classifier's train module makes it (metrics from
``classification_metrics`` on per-image probabilities, ``predictions/test.csv``, the classes
param, lineage tags), registered and gated; then the card is generated and its numbers are
compared with the run's logged metrics, read back from MLflow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.registry import CLASSES, register_scored_version
from training.promotion.modelcard import (
    expected_calibration_error,
    log_card,
    reliability_bins,
)


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model() -> None:
    conf = np.array([0.9] * 10)
    assert expected_calibration_error(conf, np.array([1] * 9 + [0])) == pytest.approx(0.0)
    assert expected_calibration_error(conf, np.array([1] * 5 + [0] * 5)) == pytest.approx(0.4)
    bins = reliability_bins(np.array([0.55, 0.95, 0.97]), np.array([0, 1, 1]))
    assert [b["count"] for b in bins] == [1, 2]


@pytest.fixture
def registered(cfg):
    """A logged, registered and gated classifier version; returns (name, version, run_id)."""
    return register_scored_version(cfg)


def test_card_figures_equal_the_logged_metrics(cfg, registered, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name, version, run_id = registered
    log_card(cfg, name, version)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    logged = client.get_run(run_id).data.metrics  # read back: what MLflow holds, not our dict
    assert client.get_model_version(name, version).tags["model_card"] == \
        "model_card/model_card.html"
    out = Path(client.download_artifacts(run_id, "model_card", str(tmp_path)))
    assert {p.name for p in out.iterdir()} >= {"model_card.md", "model_card.html",
                                               "model_card.json", "reliability.svg"}
    card = json.loads((out / "model_card.json").read_text())

    overall = {r["metric"]: r for r in card["metrics"]["overall"]}
    for metric in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "n_test"):
        assert overall[metric]["value"] == logged[metric]
    for metric in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc"):
        assert overall[metric]["ci_low"] == logged[f"{metric}_ci_low"]
        assert overall[metric]["ci_high"] == logged[f"{metric}_ci_high"]
    per_class = {r["class"]: r for r in card["metrics"]["per_class"]}
    for cls in CLASSES:
        for metric in ("precision", "recall", "f1", "specificity", "support"):
            assert per_class[cls][metric]["value"] == logged[f"{metric}__{cls}"]
        low, high = per_class[cls]["recall"]["ci"]
        assert low <= logged[f"recall__{cls}"] <= high
    assert card["metrics"]["cost"] == {}  # this run logged no size or latency
    assert "champion_on_same_test" in card and card["champion_on_same_test"] == {"accuracy": 0.5}
    # the hand-crafted baseline on the same rows (test figures only, not its val/ ones)
    assert card["baseline_on_same_test"] == {"accuracy": 0.55, "balanced_accuracy": 0.6}

    # the rendered pages print those same numbers (4 decimals)
    md = (out / "model_card.md").read_text()
    page = (out / "model_card.html").read_text()
    for metric in ("accuracy", "balanced_accuracy", "f1_macro"):
        row = re.search(rf"^\| {metric} \| ([0-9.]+) \| \[([0-9.]+), ([0-9.]+)\] \| "
                        r"\[[0-9.]+, [0-9.]+\] \|$", md, re.MULTILINE)  # then the cells' CI
        assert row, f"no {metric} row in the markdown card"
        assert [float(x) for x in row.groups()] == pytest.approx(
            [logged[metric], logged[f"{metric}_ci_low"], logged[f"{metric}_ci_high"]],
            abs=5e-5)
        assert f"<td>{metric}</td><td>{logged[metric]:.4f}</td>" in page
    assert "## Hand-crafted baseline on the same rows" in md
    assert re.search(r"^\| balanced_accuracy \| 0\.6000 \| [0-9.]+ \|$", md, re.MULTILINE)
    assert "<svg" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"',
                                                         "")

    # data, calibration, gate and lineage: measured, with the numbers behind them
    data = {(r["split"], r["label"]): r for r in card["training_data"]["per_split_class"]}
    assert data[("test", "all")]["images"] == 20 and data[("test", "all")]["subjects"] == 4
    assert data[("test", "hem")]["subjects"] == 3
    assert card["training_data"]["manifest_version"] == 1
    assert card["training_data"]["batch_ids"] == ["b1"]
    assert 0 <= card["calibration"]["ece"] <= 1
    assert sum(b["count"] for b in card["calibration"]["reliability"]) == logged["n_test"]
    assert card["gate"]["passed"] == "true"
    assert card["gate"]["reasons"] == [
        f"balanced_accuracy={logged['balanced_accuracy']:.4f} >= floor "
        f"{cfg.gate.classifier_floor:.4f}"]
    assert card["lineage"]["git_sha"] == "abc123"
    assert any("3 distinct donor(s) of class 'hem'" in x for x in card["limitations"])
    # how many patients the figures rest on, and that the CIs resample them
    assert card["patients"] == "7 subject(s) (all: 4, hem: 3)"
    assert overall["ci_units"]["value"] == 7
    assert "resampling the 7 test subjects" in md and "rest on 7 subject(s)" in md
    assert any("test image(s) of 7 subject(s)" in x for x in card["limitations"])
    assert "resampling subjects" in card["metrics"]["per_class_ci_source"]
    assert overall["accuracy"]["cell_ci_low"] == logged["accuracy_cell_ci_low"]
    assert card["intended_use"] and card["out_of_scope"]


def test_a_detector_card_says_what_it_cannot_measure(cfg, tmp_path: Path) -> None:
    """No per-image probabilities (the detector): logged figures still, and the card says why
    there is no calibration, instead of failing the promotion."""
    import mlflow
    from mlflow import MlflowClient

    from training.tracking import configure_mlflow

    exp = configure_mlflow(cfg)
    metrics = {"map50": 0.61, "map50_95": 0.33, "precision": 0.7, "recall": 0.55,
               "map50__WBC": 0.61, "train_time_s": 12.5}
    with mlflow.start_run(experiment_id=exp, tags={"family": "detector",
                                                   "architecture": "yolov8n",
                                                   "split_kind": "image"}) as run:
        mlflow.log_params({"classes": "WBC"})
        mlflow.log_metrics(metrics)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    name = cfg.mlflow.detector_name
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    card = log_card(cfg, name, str(mv.version))
    overall = {r["metric"]: r["value"] for r in card["metrics"]["overall"]}
    assert overall == {k: v for k, v in metrics.items() if "__" not in k and "time" not in k}
    assert card["metrics"]["cost"] == {"train_time_s": 12.5}
    assert card["metrics"]["per_class"][0]["map50"]["value"] == 0.61
    assert "no per-image test probabilities" in card["calibration"]["error"]
    assert "dataset_version" in card["training_data"]["error"]  # this run names none
    assert any("image level" in x for x in card["limitations"])
