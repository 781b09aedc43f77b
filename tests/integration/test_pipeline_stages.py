"""Stage functions the DAGs call, against a real MLflow store."""

from __future__ import annotations

import mlflow
import pytest

from training.config import load_config
from training.records import Candidate
from training.stages import config_env, log_comparison, start_parent_run

pytestmark = pytest.mark.integration
DATASET = {"version": 3, "manifest_sha256": "f" * 64, "batch_ids": ["b1", "b2"]}


def test_parent_run_is_found_again_on_rerun(cfg):
    first = start_parent_run(cfg, "manual__1", DATASET)
    assert start_parent_run(cfg, "manual__1", DATASET) == first
    assert start_parent_run(cfg, "manual__2", DATASET) != first
    tags = mlflow.get_run(first).data.tags
    assert tags["batch_ids"] == "b1,b2" and tags["dataset_version"] == "3"


def test_comparison_table_lands_on_the_parent_run(cfg):
    parent = start_parent_run(cfg, "manual__cmp", DATASET)
    cands = [Candidate("classifier", arch, "r", "runs:/r/model",
                       {"accuracy": acc, "accuracy_ci_low": acc - 0.1,
                        "accuracy_ci_high": min(1.0, acc + 0.1), "f1_macro": acc,
                        "trainable_params": 10.0}, "subject", "t", 3)
             for arch, acc in (("vgg16", 0.7), ("lightweight_efficientnet_b3", 0.9))]
    log_comparison(cfg, cands, parent)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "comparison")}
    assert names == {"comparison/comparison.csv", "comparison/comparison.md",
                     "comparison/comparison.png"}


def test_overrides_reach_a_child_process_as_env(monkeypatch):
    env = config_env({"classifier": {"epochs": 2, "architectures": ["vgg16"]},
                      "detector": {"weights": None, "architectures": ["yolov5nu"]}})
    assert env == {"LEUKOFLOW_CLASSIFIER__EPOCHS": "2",
                   "LEUKOFLOW_CLASSIFIER__ARCHITECTURES": '["vgg16"]',
                   "LEUKOFLOW_DETECTOR__ARCHITECTURES": '["yolov5nu"]'}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config()
    assert cfg.classifier.epochs == 2 and cfg.classifier.architectures == ["vgg16"]
    assert cfg.detector.architectures == ["yolov5nu"]
