"""A training child past ``pipeline.train_timeout_s`` is killed with its whole process tree."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import psutil
import pytest

from training import stages
from training.errors import TrainingError
from training.families import get_family


def test_a_training_past_its_time_limit_is_killed_with_its_children(cfg, monkeypatch,
                                                                    tmp_path: Path) -> None:
    hang = dataclasses.replace(get_family("classifier"), train_module="tests.unit.hang_child")
    monkeypatch.setattr(stages, "get_family", lambda name: hang)
    monkeypatch.setattr(stages.tempfile, "TemporaryDirectory",
                        lambda prefix="": _Keep(tmp_path))
    cfg.pipeline.train_timeout_s = 3
    start = time.monotonic()
    with pytest.raises(TrainingError, match="passed pipeline.train_timeout_s = 3s"):
        stages.train(cfg, "classifier", architecture="x", dataset_version=1)
    assert time.monotonic() - start < 60
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status()
             != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after the time-out: {alive}"


class _Keep:
    """A TemporaryDirectory stand-in that keeps the folder (the test reads the pids there)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc: object) -> None:
        return None
