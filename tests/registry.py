"""A scored, registered classifier version without training: for model-card and page tests.

The run is logged the way ``training.classifier.train`` logs one (metrics from
``classification_metrics`` on per-image probabilities, ``predictions/test.csv``, the classes
param, lineage tags) on a curated manifest written with ``training.data.dataset``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from training.config import Config
from training.data.dataset import MANIFEST_COLUMNS, curated_storage, latest_version, write_manifest
from training.evaluation.metrics import (
    classification_metrics,
    subject_groups,
    subjects_per_class,
)

CLASSES = ["all", "hem"]


def _manifest(n_test: int) -> pd.DataFrame:
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


def register_scored_version(cfg: Config, architecture: str = "vgg16",
                            gate_passed: bool = True, champion: bool = False,
                            seed: int = 3) -> tuple[str, str, str]:
    """A classifier version logged as the train module logs one, registered and gated.

    The first call writes the curated manifest; later calls reuse it. Returns
    (registered name, version, run id).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.data.dataset import load_manifest
    from training.tracking import configure_mlflow

    rng = np.random.default_rng(seed)
    if latest_version(curated_storage(cfg)) == 0:
        write_manifest(cfg, _manifest(40))
    manifest, ds = load_manifest(cfg)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    y = test["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    p_all = np.clip(np.where(y == 0, 0.75, 0.3) + rng.normal(0, 0.2, len(y)), 0.01, 0.99)
    prob = np.stack([p_all, 1 - p_all], axis=1)
    metrics = classification_metrics(y, prob, CLASSES, "all", groups=subject_groups(test))
    metrics |= subjects_per_class(manifest, CLASSES)  # as the train module logs them
    exp = configure_mlflow(cfg)
    with mlflow.start_run(experiment_id=exp, tags={
            "family": "classifier", "architecture": architecture,
            "dataset_version": str(ds.version), "split_kind": "subject", "git_sha": "abc123",
            "git_sha_source": "env", "batch_ids": ",".join(ds.batch_ids),
            "test_set_sha256": "f" * 64}) as run:
        mlflow.log_params({"classes": ",".join(CLASSES), "dataset_version": ds.version})
        mlflow.log_metrics({**metrics, "champion/accuracy": 0.5, "baseline/accuracy": 0.55,
                            "baseline/balanced_accuracy": 0.6, "baseline/val/accuracy": 0.7})
        table = test[["sha256", "label", "subject_id"]].copy()
        table["p_all"], table["p_hem"] = prob[:, 0], prob[:, 1]
        mlflow.log_text(table.to_csv(index=False), "predictions/test.csv")
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    name = cfg.mlflow.classifier_name
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # registered by an earlier call
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    metric = cfg.gate.classifier_metric
    value = metrics[metric]
    reason = (f"{metric}={value:.4f} >= floor {cfg.gate.classifier_floor:.4f}" if gate_passed
              else f"{metric}={value:.4f} < champion {min(1.0, value + 0.05):.4f} - allowed "
              f"regression {cfg.gate.max_regression:.4f}")
    for key, value in {"architecture": architecture, "dataset_version": str(ds.version),
                       "split_kind": "subject", f"metric.{metric}": f"{metrics[metric]:.6g}",
                       "gate_passed": str(gate_passed).lower(),
                       "gate_reasons": json.dumps([reason])}.items():
        client.set_model_version_tag(name, mv.version, key, value)
    if champion:
        client.set_registered_model_alias(name, "champion", mv.version)
    return name, str(mv.version), run.info.run_id
