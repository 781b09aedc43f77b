"""The promote step over a real MLflow registry: selection on validation rows, failed trainings
named but not blocking, refusals notified."""

from __future__ import annotations

import logging

import mlflow
import pytest

from tests.integration.registry_helpers import scored_candidate
from training.promotion.aliases import alias_version
from training.stages import promote_best

pytestmark = pytest.mark.integration


def _candidate(cfg, arch: str, test: float, val: float | None) -> dict:
    extra = {} if val is None else {"val/balanced_accuracy": val}
    return scored_candidate(cfg, test, architecture=arch, extra=extra).to_dict()


def test_the_best_on_validation_is_gated_and_a_failed_one_is_named(cfg, caplog) -> None:
    name = cfg.mlflow.classifier_name
    lucky_on_test = _candidate(cfg, "vgg16", test=0.95, val=0.70)
    best_on_val = _candidate(cfg, "resnet50", test=0.85, val=0.90)
    with caplog.at_level(logging.INFO):
        promotions = promote_best(cfg, [lucky_on_test, None, best_on_val],
                                  {"airflow_run_id": "r1"},
                                  expected={"classifier": ["vgg16", "xception", "resnet50"]})
    assert len(promotions) == 1 and promotions[0]["promoted"]
    chosen = mlflow.MlflowClient().get_model_version(name, promotions[0]["version"])
    assert chosen.tags["architecture"] == "resnet50"
    assert alias_version(cfg, name, "champion") == promotions[0]["version"]
    text = caplog.text
    assert "chose resnet50 of ['vgg16', 'resnet50'] on validation" in text
    assert "training_failed" in text and "xception" in text


def test_the_leave_subjects_out_cv_outranks_validation_when_every_candidate_has_it(
        cfg, caplog) -> None:
    """A candidate that looks best on the few validation patients but not on unseen ones."""
    def cand(arch: str, val: float, cv: float) -> dict:
        return scored_candidate(cfg, 0.8, architecture=arch, extra={
            "val/balanced_accuracy": val, "cv/balanced_accuracy": cv}).to_dict()

    with caplog.at_level(logging.INFO):
        promotions = promote_best(cfg, [cand("vgg16", 0.95, 0.55), cand("resnet50", 0.80, 0.70)],
                                  {"airflow_run_id": "r2"})
    chosen = mlflow.MlflowClient().get_model_version(cfg.mlflow.classifier_name,
                                                     promotions[0]["version"])
    assert chosen.tags["architecture"] == "resnet50"
    assert "chose resnet50 of ['vgg16', 'resnet50'] on leave-subjects-out CV" in caplog.text


def test_a_refusal_is_notified(cfg, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="leukoflow.notify"):
        promotions = promote_best(cfg, [_candidate(cfg, "vgg16", test=0.4, val=0.4)], {})
    assert not promotions[0]["promoted"]
    assert any("gate_refused" in r.getMessage() and "floor" in r.getMessage()
               for r in caplog.records)
