"""Deep-feature sweep wiring on made-up features: no TensorFlow in this process.

The features here are random vectors whose class signal is known, so the sweep, the grouped
CV and the MLflow run can be checked against what the data must give. Extraction from a real
backbone runs in ``tests/integration/test_experiments.py`` (in a child process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.classifier.features import (
    DeepFeatures,
    cv_features,
    deep_feature_sweep,
    default_feature_layer,
    measured_split_kind,
    sweep_features,
    sweep_markdown,
    xincept_xgboost,
)
from training.errors import DataValidationError

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["all", "hem"]


def _rows(n_subjects: int = 12, per_subject: int = 10, leak: bool = False) -> pd.DataFrame:
    """C-NMC-like rows: half the subjects 'all', half 'hem' (H prefix); split by subject
    (or, with ``leak``, every subject's images dealt over all splits, image-level)."""
    rows = []
    for s in range(n_subjects):
        label = "all" if s % 2 == 0 else "hem"
        subject = f"{'H' if label == 'hem' else ''}{s}"
        split = ("train", "train", "val", "val", "test", "test")[s % 6]  # both classes each
        for i in range(per_subject):
            rows.append({"sha256": f"{s:03d}{i:03d}", "label": label, "subject_id": subject,
                         "split": ("train", "val", "test")[i % 3] if leak else split,
                         "split_group": f"image:{s:03d}{i:03d}" if leak
                         else f"subject:{subject}"})
    return pd.DataFrame(rows)


def _features(rows: pd.DataFrame, signal: float, dim: int = 16, seed: int = 0,
              saw_train: bool = True) -> DeepFeatures:
    rng = np.random.default_rng(seed)
    y = rows["label"].map({"all": 0, "hem": 1}).to_numpy()
    X = rng.normal(size=(len(rows), dim)).astype(np.float32)
    X[:, 0] += signal * y  # one informative coordinate, as strong as asked
    return DeepFeatures(X=X, rows=rows, classes=CLASSES, positive_class="all",
                        architecture="resnet50", feature_layer="head_gap",
                        feature_source="made up for a test", backbone_saw_train=saw_train,
                        dataset_version=1, test_set_sha256="0" * 64)


def test_module_imports_without_tensorflow() -> None:
    code = ("import sys, training.classifier.features, research.experiments; "
            "print([m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_default_feature_layers_follow_the_papers() -> None:
    assert default_feature_layer("resnet50") == "head_gap"  # 2048-d GAP
    assert default_feature_layer("lightweight_efficientnet_b3") == "head_gap"
    assert default_feature_layer("xincept_all") == "fused_features"  # Khan's concat
    assert default_feature_layer("resnet50_custom_head") == "conv5_block3_out"


def test_split_kind_is_measured_not_assumed() -> None:
    assert measured_split_kind(_rows()) == "subject"
    # subject ids everywhere, but the subjects sit on both sides: an image-level split
    assert measured_split_kind(_rows(leak=True)) == "image"
    no_ids = _rows().assign(subject_id="")
    assert measured_split_kind(no_ids) == "image"


def test_sweep_finds_signal_and_describes_itself() -> None:
    rows = _rows()
    strong = sweep_features(_features(rows, signal=6.0), ["logistic_regression", "knn"],
                            n_bootstrap=200)
    assert list(strong["classifier"]) == ["logistic_regression", "knn"]
    n_test = int((rows["split"] == "test").sum())
    assert (strong["n_test"] == n_test).all()
    assert (strong["n_train"] == int((rows["split"] == "train").sum())).all()
    assert (strong["split_kind"] == "subject").all()
    assert (strong["feature_dim"] == 16).all() and (strong["backbone"] == "resnet50").all()
    assert (strong["feature_source"] == "made up for a test").all()
    assert (strong["accuracy"] > 0.9).all()
    assert (strong["accuracy_ci_low"] <= strong["accuracy"]).all()
    assert (strong["fit_time_s"] > 0).all()
    noise = sweep_features(_features(rows, signal=0.0), ["logistic_regression"], n_bootstrap=0)
    assert noise["roc_auc"].iloc[0] < 0.9  # pure noise cannot be separated well
    assert "accuracy_ci_low" not in noise.columns


def test_sweep_needs_a_test_split() -> None:
    rows = _rows().assign(split="train")
    with pytest.raises(DataValidationError, match="test"):
        sweep_features(_features(rows, 1.0), ["knn"])


def test_grouped_cv_uses_only_unseen_rows_when_the_backbone_trained_on_train() -> None:
    rows = _rows(n_subjects=12)
    cv = cv_features(_features(rows, signal=6.0, saw_train=True), ["logistic_regression"], k=10)
    unseen = rows["split"].isin(["val", "test"])
    assert cv["cv_rows"].iloc[0] == "val+test"
    assert cv["n_rows"].iloc[0] == int(unseen.sum())
    assert cv["n_groups"].iloc[0] == rows.loc[unseen, "subject_id"].nunique() == 8
    assert cv["k_used"].iloc[0] == 8 and cv["k_requested"].iloc[0] == 10  # k <= groups
    assert cv["cv_kind"].iloc[0] == "subject"
    assert cv["accuracy_mean"].iloc[0] > 0.9
    independent = cv_features(_features(rows, 6.0, saw_train=False), ["logistic_regression"])
    assert independent["cv_rows"].iloc[0] == "train+val+test"
    assert independent["k_used"].iloc[0] == 10 and independent["n_rows"].iloc[0] == len(rows)


def test_grouped_cv_refuses_folds_that_hold_one_class() -> None:
    rows = _rows(n_subjects=6)
    rows.loc[rows["split"] == "val", "split"] = "train"  # unseen: one 'all', one 'hem' subject
    with pytest.raises(DataValidationError, match="single class"):
        cv_features(_features(rows, 6.0), ["logistic_regression"], k=10)


def test_sweep_is_logged_to_a_nested_mlflow_run(cfg) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    experiment_id = configure_mlflow(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name="parent") as parent:
        pass
    feats = _features(_rows(), signal=6.0)
    table = deep_feature_sweep(cfg, features=feats, names=["ridge", "lda"],
                               parent_run_id=parent.info.run_id, n_bootstrap=100)
    run_id = table["run_id"].iloc[0]
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["split_kind"] == "subject"
    assert run.data.tags["feature_source"] == "made up for a test"
    assert run.data.params["classifiers"] == "ridge,lda"
    assert run.data.params["feature_dim"] == "16"
    for _, row in table.iterrows():
        for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "fit_time_s",
                    "accuracy_ci_low"):
            assert run.data.metrics[f"{row['classifier']}/{key}"] == pytest.approx(row[key])
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/features/sweep.csv"))
    assert list(logged["classifier"]) == ["ridge", "lda"]
    assert logged["accuracy"].to_numpy() == pytest.approx(table["accuracy"].to_numpy())
    md = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/features/sweep.md"))
    assert md.read_text() == sweep_markdown(table)


def test_xincept_variant_is_xgboost_alone(cfg) -> None:
    table = xincept_xgboost(cfg, features=_features(_rows(), signal=6.0), n_bootstrap=0)
    assert list(table["classifier"]) == ["xgboost"]
    assert table["accuracy"].iloc[0] > 0.9


def test_markdown_shows_cis_and_the_split() -> None:
    table = sweep_features(_features(_rows(), 6.0), ["knn"], n_bootstrap=100)
    text = sweep_markdown(table)
    row = next(line for line in text.splitlines() if line.startswith("| knn"))
    assert "[" in row and "subject" in row and f"| {int(table['n_test'].iloc[0])} |" in row
    json.dumps(table.to_dict(orient="records"))  # the CLI writes it as JSON
