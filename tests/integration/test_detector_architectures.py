"""YOLOv5 beside YOLOv8: both families train one epoch on tiny synthetic fields, each in its own
process as the retrain DAG maps them, and are compared in one table on the parent run; the
best on validation fields is registered and gated on test fields.

Tiny on purpose (12 fields of 160x120 at imgsz 64): the point is the mechanism (two yamls,
two processes, one table with measured columns), not the scores.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.test_detector_train import _curate_fields
from training.config import load_config

pytestmark = pytest.mark.slow

ARCHS = ["yolov5nu", "yolov8n"]


def test_both_yolo_families_train_side_by_side_and_are_compared(tmp_path: Path,
                                                                monkeypatch) -> None:
    import mlflow

    from training.stages import promote_best, start_parent_run, train

    home = tmp_path / "home"
    version = _curate_fields(home, n_images=12, size=(160, 120), seed=4)
    for key in ("LEUKOFLOW_CONFIG", "PYTEST_CURRENT_TEST"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    overrides = {"detector": {"architectures": ARCHS, "imgsz": 64, "epochs": 1, "batch": 8},
                 "gate": {"detector_floor": 0.0}}
    cfg = load_config(home=home, **overrides)
    dataset = {"version": version, "manifest_sha256": "m", "batch_ids": ["synth-fields"]}
    parent = start_parent_run(cfg, "manual__det_archs", dataset)
    cands = [train(cfg, "detector", architecture=a, dataset_version=version,
                   parent_run_id=parent, overrides=overrides) for a in ARCHS]

    assert [c["architecture"] for c in cands] == ARCHS
    params = [c["metrics"]["total_params"] for c in cands]
    assert params[0] != params[1] and all(p > 1e6 for p in params)  # two different graphs
    for c in cands:
        m = c["metrics"]
        for key in ("precision", "recall", "map50", "map50_95", "val/map50"):
            assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (c["architecture"], key)
        assert m["map50_ci_low"] <= m["map50_image_level"] <= m["map50_ci_high"]
        assert m["train_time_s"] > 0 and m["latency_ms_per_image"] > 0
    run_archs = {mlflow.get_run(c["run_id"]).data.tags["architecture"] for c in cands}
    assert run_archs == set(ARCHS)

    promotions = promote_best(cfg, cands, {"airflow_run_id": "manual__det_archs"},
                              parent_run_id=parent, expected={"detector": ARCHS})
    best = max(cands, key=lambda c: (c["metrics"]["val/map50"], c["architecture"]))
    client = mlflow.MlflowClient()
    assert len(promotions) == 1 and promotions[0]["promoted"]  # floor 0, no champion yet
    registered = client.get_model_version(cfg.mlflow.detector_name, promotions[0]["version"])
    assert registered.run_id == best["run_id"]  # chosen on validation fields

    names = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert {"comparison/detector_comparison.csv", "comparison/detector_comparison.md",
            "comparison/detector_comparison.png"} <= names
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{parent}/comparison/detector_comparison.csv")))
    assert list(table["architecture"]) == ARCHS
    assert table["total_params"].tolist() == params
    assert {"map50__WBC", "map50_95__WBC", "precision__WBC", "recall__WBC",
            "train_time_s", "latency_ms"} <= set(table.columns)
    assert table["map50"].tolist() == pytest.approx([c["metrics"]["map50"] for c in cands])
