"""Gate and alias moves against a real MLflow registry (SQLite backend, local artifacts)."""

from __future__ import annotations

import mlflow
import pytest

from tests.integration.registry_helpers import scored_candidate
from training.errors import RegistryError
from training.promotion.aliases import (
    alias_version,
    aliases,
    promote,
    redo_promotion,
    rollback,
    undo_promotion,
)
from training.tracking import configure_mlflow

pytestmark = pytest.mark.integration


_candidate = scored_candidate


def test_first_passes_worse_blocked_better_promoted_and_rollback(cfg):
    name = cfg.mlflow.classifier_name
    first = promote(cfg, _candidate(cfg, 0.80), {"airflow_run_id": "r1"})
    assert first.promoted and first.version == "1" and first.previous_champion is None
    assert alias_version(cfg, name, "champion") == "1"

    worse = promote(cfg, _candidate(cfg, 0.70, champion=("1", 0.80)))
    assert not worse.promoted
    assert any("< champion v1" in r for r in worse.reasons)
    assert alias_version(cfg, name, "champion") == "1"
    assert alias_version(cfg, name, "challenger") == "2"

    better = promote(cfg, _candidate(cfg, 0.90, champion=("1", 0.80)))
    assert better.promoted and better.version == "3" and better.previous_champion == "1"
    assert alias_version(cfg, name, "previous_champion") == "1"

    tags = mlflow.MlflowClient().get_model_version(name, "3").tags
    assert tags["gate_passed"] == "true" and tags["metric.balanced_accuracy"] == "0.9"

    moved = rollback(cfg, name)
    assert (moved["champion"], moved["demoted"], moved["changed"]) == ("1", "3", True)
    assert aliases(cfg, name) == {"champion": "1", "challenger": "3", "previous_champion": "3"}


def test_gate_says_whether_the_difference_is_significant(cfg):
    from training.promotion.gate import gate

    cand = _candidate(cfg, 0.80, champion=("1", 0.78))
    cand.metrics |= {"balanced_accuracy_ci_low": 0.7, "balanced_accuracy_ci_high": 0.9}
    cand.champion_metrics |= {"balanced_accuracy_ci_low": 0.68, "balanced_accuracy_ci_high": 0.88}
    passed, reasons = gate(cfg, cand)
    assert passed and "not significant" in reasons[-1]
    cand.champion_metrics |= {"balanced_accuracy_ci_low": 0.5, "balanced_accuracy_ci_high": 0.6}
    assert gate(cfg, cand)[1][-1].endswith("the difference is significant")


def test_floor_blocks_even_without_champion(cfg):
    cfg.gate.classifier_floor = 0.6
    p = promote(cfg, _candidate(cfg, 0.5))
    assert not p.promoted and alias_version(cfg, cfg.mlflow.classifier_name, "champion") is None


def test_rerun_registers_once_and_undo_restores_all_three_aliases(cfg):
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.8))  # v1
    promote(cfg, _candidate(cfg, 0.85, champion=("1", 0.8)))  # v2 champion, v1 previous
    before = aliases(cfg, name)
    cand = _candidate(cfg, 0.9, champion=("2", 0.85))
    p1 = promote(cfg, cand)
    p2 = promote(cfg, cand)  # Airflow retried the task
    assert p1.version == p2.version == "3" and p2.promoted and p2.before == before
    assert aliases(cfg, name) == {"champion": "3", "challenger": "3", "previous_champion": "2"}
    assert undo_promotion(cfg, p1)
    # exactly as before: previous_champion is v1 again, not the champion's own version
    assert aliases(cfg, name) == before == {
        "champion": "2", "challenger": "2", "previous_champion": "1"}
    tags = mlflow.MlflowClient().get_model_version(name, "3").tags
    assert tags["rolled_back"] == "publish failed"
    assert any(k.startswith("move.") and "champion" in k for k in tags), tags


def test_retried_publish_redoes_the_undone_promotion(cfg):
    """publish fails once (undo), the retry re-applies the promotion: the gate's choice serves."""
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.8))
    p = promote(cfg, _candidate(cfg, 0.9, champion=("1", 0.8)))
    assert undo_promotion(cfg, p) and alias_version(cfg, name, "champion") == "1"
    redo_promotion(cfg, p)
    assert aliases(cfg, name) == {"champion": "2", "challenger": "2", "previous_champion": "1"}
    redo_promotion(cfg, p)  # idempotent
    assert alias_version(cfg, name, "champion") == "2"


def test_undo_after_the_aliases_moved_on_touches_nothing(cfg):
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.8))
    p = promote(cfg, _candidate(cfg, 0.9, champion=("1", 0.8)))
    rollback(cfg, name, "1", actor="cli:ops")  # someone rolled back meanwhile
    now = aliases(cfg, name)
    assert not undo_promotion(cfg, p)
    assert aliases(cfg, name) == now
    with pytest.raises(RegistryError, match="moved them"):
        redo_promotion(cfg, p)


def test_a_stale_champion_is_never_replaced(cfg):
    """A rollback while a retrain is between scoring and promotion: the candidate was scored
    against v2, the champion is v1 again when it is judged, so it is refused, not promoted
    over a champion it was never compared with."""
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.95))  # v1: the better model
    promote(cfg, _candidate(cfg, 0.96, champion=("1", 0.95)))  # v2
    cand = _candidate(cfg, 0.90, champion=("2", 0.60))  # v2 scored badly on the new test set
    rollback(cfg, name, "1", actor="cli:ops")  # ... and is rolled back before the decision
    p = promote(cfg, cand)
    assert not p.promoted and "scored against v2" in p.reasons[0], p.reasons
    assert alias_version(cfg, name, "champion") == "1"
    first_run = _candidate(cfg, 0.99)  # scored when there was no champion at all
    assert not promote(cfg, first_run).promoted


def test_rollback_names_its_target_and_a_rerun_moves_nothing(cfg):
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.8))
    promote(cfg, _candidate(cfg, 0.85, champion=("1", 0.8)))
    promote(cfg, _candidate(cfg, 0.9, champion=("2", 0.85)))  # v3 champion, v2 previous
    first = rollback(cfg, name, actor="airflow:run-1")  # default: the previous champion
    assert (first["champion"], first["demoted"], first["changed"]) == ("2", "3", True)
    again = rollback(cfg, name, actor="airflow:run-1")  # the same DAG run, cleared and rerun
    assert not again["changed"] and alias_version(cfg, name, "champion") == "2"
    to_one = rollback(cfg, name, "1", actor="cli:ops")
    assert to_one["changed"] and aliases(cfg, name)["champion"] == "1"
    assert not rollback(cfg, name, "1", actor="cli:ops2")["changed"]  # already champion
    with pytest.raises(RegistryError):
        rollback(cfg, name, "99", actor="cli:ops")  # no such version
    assert alias_version(cfg, name, "champion") == "1"


def test_rollback_without_previous_is_clear(cfg):
    promote(cfg, _candidate(cfg, 0.8))
    with pytest.raises(RegistryError, match="no previous_champion"):
        rollback(cfg, cfg.mlflow.classifier_name)


def test_down_tracking_server_is_named(tmp_path):
    from tests.integration.conftest import free_port
    from training.config import load_config

    url = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(home=tmp_path, mlflow={"tracking_uri": url})
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(RegistryError, match=url):
            configure_mlflow(cfg)
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
