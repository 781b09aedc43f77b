"""Faults caused for real against the registry: a stopped MLflow server, two racing promotions.

The MLflow server is a real ``mlflow server`` process on loopback (SQLite backend, local
artifacts); it is stopped with SIGTERM in the middle of a run's registry work and started again
on the same database, and the aliases are compared with what they were.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port
from tests.integration.registry_helpers import scored_candidate
from training.errors import RegistryError
from training.promotion.aliases import aliases, promote, undo_promotion

pytestmark = [pytest.mark.integration, pytest.mark.slow]


_candidate = scored_candidate


class _Server:
    """``mlflow server`` on loopback that a test can stop and start again on the same DB."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", (self.root / "artifacts").as_uri(),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    # fail fast instead of MLflow's own minutes of retries; our retries still apply
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    srv = _Server(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_stopped_mlflow_server_fails_the_step_and_leaves_every_alias(server, tmp_path):
    from training.config import load_config

    cfg = load_config(home=tmp_path / "home", mlflow={"tracking_uri": server.url})
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.8))
    p2 = promote(cfg, _candidate(cfg, 0.9, champion=("1", 0.8)))
    pending = _candidate(cfg, 0.95, champion=("2", 0.9))  # trained; not judged yet
    before = aliases(cfg, name)
    assert before == {"champion": "2", "challenger": "2", "previous_champion": "1"}

    server.stop()  # the registry goes away between training and promotion
    with pytest.raises(RegistryError, match="failed after"):
        promote(cfg, pending)
    # a publish that failed would now undo p2: it must fail too, never read "no champion"
    with pytest.raises(RegistryError):
        undo_promotion(cfg, p2)

    server.start()  # same database
    assert aliases(cfg, name) == before
    assert promote(cfg, pending).promoted  # and the rerun of the step succeeds


def _race(home: str, tracking_uri: str, cand: dict, barrier, out) -> None:
    from training.config import load_config
    from training.promotion.aliases import promote as do_promote
    from training.records import Candidate as C

    cfg = load_config(home=home, mlflow={"tracking_uri": tracking_uri})
    barrier.wait()
    p = do_promote(cfg, C.from_dict(cand))
    out.put((p.version, p.promoted, p.reasons))


def test_two_racing_promotions_give_one_consistent_outcome(cfg):
    name = cfg.mlflow.classifier_name
    promote(cfg, _candidate(cfg, 0.8))
    cands = [_candidate(cfg, s, champion=("1", 0.8)).to_dict() for s in (0.85, 0.9)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(cfg.home), cfg.tracking_uri, c, barrier, out))
             for c in cands]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    promoted = [r for r in results if r[1]]
    refused = [r for r in results if not r[1]]
    assert len(promoted) == 1 and len(refused) == 1, results
    assert "scored against v1" in refused[0][2][0]  # the loser saw the winner's champion
    now = aliases(cfg, name)
    assert now["champion"] == promoted[0][0] and now["previous_champion"] == "1"
