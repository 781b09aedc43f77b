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
import pandas as pd
import pytest

from training.data.dataset import MANIFEST_COLUMNS, write_manifest
from training.evaluation.metrics import classification_metrics
from training.promotion.modelcard import (
    expected_calibration_error,
    log_card,
    reliability_bins,
)

CLASSES = ["all", "hem"]


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model() -> None:
    conf = np.array([0.9] * 10)
    assert expected_calibration_error(conf, np.array([1] * 9 + [0])) == pytest.approx(0.0)
    assert expected_calibration_error(conf, np.array([1] * 5 + [0] * 5)) == pytest.approx(0.4)
    bins = reliability_bins(np.array([0.55, 0.95, 0.97]), np.array([0, 1, 1]))
    assert [b["count"] for b in bins] == [1, 2]


def _manifest(n_test: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for i in range(3 * n_test):
        split = "test" if i < n_test else "train"
        label = CLASSES[i % 2]
        donors = 4 if label == "all" else 3  # distinct test donors per class
        subject = f"{label}-s{i // 2 % donors}" if split == "test" else f"{label}-t{i % 11}"
        rows.append({"sha256": f"{i:064x}", "key": f"images/{i}.png", "kind": "cell",
                     "label": label, "subject_id": subject, "batch_id": "b1",
                     "source": f"b1/{i}.png",
                     "width": 64, "height": 64, "split": split, "split_group": "",
                     "label_key": ""})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


@pytest.fixture
def registered(cfg, tmp_path: Path):
    """A logged, registered and gated classifier version; returns (name, version, run_id)."""
    import mlflow
    from mlflow import MlflowClient

    from training.tracking import configure_mlflow

    rng = np.random.default_rng(3)
    manifest = _manifest(40, rng)
    ds = write_manifest(cfg, manifest)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    y = test["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    p_all = np.clip(np.where(y == 0, 0.75, 0.3) + rng.normal(0, 0.2, len(y)), 0.01, 0.99)
    prob = np.stack([p_all, 1 - p_all], axis=1)
    metrics = classification_metrics(y, prob, CLASSES, "all")
    exp = configure_mlflow(cfg)
    with mlflow.start_run(experiment_id=exp, tags={
            "family": "classifier", "architecture": "vgg16", "dataset_version": str(ds.version),
            "split_kind": "subject", "git_sha": "abc123", "git_sha_source": "env",
            "batch_ids": "b1", "test_set_sha256": "f" * 64}) as run:
        mlflow.log_params({"classes": ",".join(CLASSES), "dataset_version": ds.version})
        mlflow.log_metrics({**metrics, "champion/accuracy": 0.5})
        table = test[["sha256", "label", "subject_id"]].copy()
        table["p_all"], table["p_hem"] = prob[:, 0], prob[:, 1]
        mlflow.log_text(table.to_csv(index=False), "predictions/test.csv")
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    name = cfg.mlflow.classifier_name
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_model_version_tag(name, mv.version, "gate_passed", "true")
    client.set_model_version_tag(name, mv.version, "gate_reasons",
                                 json.dumps(["balanced_accuracy=0.8 >= floor 0.0"]))
    return name, str(mv.version), run.info.run_id


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
    assert "champion_on_same_test" in card and card["champion_on_same_test"] == {"accuracy": 0.5}

    # the rendered pages print those same numbers (4 decimals)
    md = (out / "model_card.md").read_text()
    page = (out / "model_card.html").read_text()
    for metric in ("accuracy", "balanced_accuracy", "f1_macro"):
        row = re.search(rf"^\| {metric} \| ([0-9.]+) \| \[([0-9.]+), ([0-9.]+)\] \|$", md,
                        re.MULTILINE)
        assert row, f"no {metric} row in the markdown card"
        assert [float(x) for x in row.groups()] == pytest.approx(
            [logged[metric], logged[f"{metric}_ci_low"], logged[f"{metric}_ci_high"]],
            abs=5e-5)
        assert f"<td>{metric}</td><td>{logged[metric]:.4f}</td>" in page
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
    assert card["gate"]["reasons"] == ["balanced_accuracy=0.8 >= floor 0.0"]
    assert card["lineage"]["git_sha"] == "abc123"
    assert any("3 distinct donor(s) of class 'hem'" in x for x in card["limitations"])
    assert card["intended_use"] and card["out_of_scope"]
