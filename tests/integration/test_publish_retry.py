"""A publish that fails once for real, then succeeds on its retry, leaves the gate's choice
serving: the failure puts every alias back as before the promotion, the retry re-applies the
promotion, publishes it and records it as deployed.

The first attempt fails the way a slow machine makes it fail: the smoke-test server is given
one second to become ready (``serving.startup_timeout_s = 1``); the retry runs with the normal
limit, as Airflow's task retry would.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from tests.integration.test_service_http import (
    CLASSES,
    IMAGE_SIZE,
    _make_model_files,
    _register,
)
from training.config import load_config
from training.errors import PublishError
from training.promotion.aliases import aliases, promote
from training.publish.deploy import read_deployment
from training.records import Candidate
from training.stages import publish
from training.tracking import configure_mlflow

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]


def _candidate(cfg, keras_path: Path, champion: str) -> Candidate:
    """A second classifier, logged in the pyfunc contract format, scored above the champion."""
    from training.classifier.pyfunc import KerasClassifierModel
    from training.preprocess import PreprocessParams

    preprocess = PreprocessParams(IMAGE_SIZE).to_dict()
    with mlflow.start_run(experiment_id=configure_mlflow(cfg)) as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=KerasClassifierModel(classes=CLASSES,
                                                            preprocess=preprocess),
            artifacts={"keras_model": str(keras_path)}, pip_requirements=["mlflow"],
            metadata={"family": "classifier", "architecture": "tiny_cnn", "classes": CLASSES,
                      "preprocess": preprocess, "positive_class": "all"})
    return Candidate(family="classifier", architecture="tiny_cnn", run_id=run.info.run_id,
                     model_uri=info.model_uri, metrics={"balanced_accuracy": 0.9},
                     split_kind="subject", test_set_sha256="t", dataset_version=1,
                     champion_version=champion, champion_metrics={"balanced_accuracy": 0.8})


def test_a_publish_that_fails_once_serves_the_gate_passing_model_after_its_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("LEUKOFLOW_")]:
        monkeypatch.delenv(key)
    cfg = load_config(home=tmp_path / "home", serving={"startup_timeout_s": 300})
    name = cfg.mlflow.classifier_name
    keras_path, yolo_path = _make_model_files(tmp_path)
    first = _register(cfg, keras_path, yolo_path)[name]
    assert publish(cfg, [], always=True)["published"]
    deployed_before = read_deployment(cfg)

    promotion = promote(cfg, _candidate(cfg, keras_path, first))
    assert promotion.promoted
    before = promotion.before
    slow = cfg.model_copy(deep=True)
    slow.serving.startup_timeout_s = 1  # the smoke server cannot be ready in a second
    with pytest.raises(PublishError, match="not ready after 1s"):
        publish(slow, [promotion.to_dict()])
    assert aliases(cfg, name) == before  # exactly as before the promotion
    assert read_deployment(cfg) == deployed_before  # the old Bento still serves

    result = publish(cfg, [promotion.to_dict()])  # the task's retry
    assert result["published"]
    assert aliases(cfg, name)["champion"] == promotion.version
    assert read_deployment(cfg)["models"][name] == promotion.version
    tags = mlflow.MlflowClient().get_model_version(name, promotion.version).tags
    assert tags["rolled_back"].startswith("publish failed")  # the failed try stays on record
