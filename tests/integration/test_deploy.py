"""Deploy = publish: the long-running service swaps to a new champion without dropping requests.

``leukoflow serve`` (the deploy supervisor) runs as a user starts it, on a fixed port, serving
the first published Bento. A client sends requests without pause while a new champion is
registered and published through the same stage function the retrain DAG calls; every request
must succeed, and after the swap the answers carry the new version. SIGTERM then has to stop
every process the supervisor started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import free_port
from tests.integration.test_service_http import _make_model_files, _png, _register
from training.apikeys import create_key
from training.config import load_config
from training.promotion.aliases import aliases
from training.publish.deploy import read_deployment
from training.stages import publish

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]


def _version(resp: httpx.Response) -> str | None:
    try:
        return str(resp.json()["model"]["version"])
    except (ValueError, KeyError, TypeError):
        return None


def _kill_publish_during_smoke_test(env: dict[str, str],
                                    tmp_path: Path) -> tuple[bool, list[psutil.Process]]:
    """Run the publish stage in its own process; SIGKILL it once its smoke server runs."""
    code = ("from training.config import load_config; from training.stages import publish; "
            "publish(load_config(), [], always=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=open(tmp_path / "publish.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        tree = psutil.Process(proc.pid).children(recursive=True)
        if any("serve" in p.cmdline() for p in tree if _alive(p)):
            orphans = tree + [q for p in tree if _alive(p) for q in p.children(recursive=True)]
            proc.kill()
            proc.wait(timeout=30)
            return True, orphans
        time.sleep(0.2)
    return False, []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_publishing_swaps_the_running_service_without_dropping_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("LEUKOFLOW_")]:
        monkeypatch.delenv(key)
    port = free_port()
    home = tmp_path / "home"
    cfg = load_config(home=home, serving={"startup_timeout_s": 300, "port": port})
    keras_path, yolo_path = _make_model_files(tmp_path)
    first = _register(cfg, keras_path, yolo_path)
    assert publish(cfg, [], always=True)["published"]
    key = create_key(cfg.api_keys_file, "client", ["classify"])

    env = {**os.environ, "LEUKOFLOW_HOME": str(home), "LEUKOFLOW_SERVING__PORT": str(port),
           "LEUKOFLOW_SERVING__STARTUP_TIMEOUT_S": "300"}
    log = open(tmp_path / "supervisor.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=120.0,
                          headers={"Authorization": f"Bearer {key}"})

    def classify() -> httpx.Response:
        return client.post("/classify", files={"image": ("c.png", _png(), "image/png")})

    results: list[tuple[int, str | None]] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            try:
                if classify().status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "supervisor.log").read_text()[-4000:]
            time.sleep(1)
        first_version = first[cfg.mlflow.classifier_name]
        assert _version(classify()) == first_version

        def send() -> None:
            while not stop.is_set():
                try:
                    r = classify()
                    results.append((r.status_code, _version(r)))
                except httpx.HTTPError as exc:
                    results.append((0, repr(exc)))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        second = _register(cfg, keras_path, yolo_path)  # a new champion of both families
        new_version = second[cfg.mlflow.classifier_name]
        assert new_version != first_version
        assert publish(cfg, [], always=True)["published"]  # what the retrain DAG's step does
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not any(v == new_version for _, v in results):
            assert proc.poll() is None, (tmp_path / "supervisor.log").read_text()[-4000:]
            time.sleep(1)
        time.sleep(3)  # a few more answers from the new backend
        stop.set()
        sender.join(timeout=150)

        assert results, "the client sent nothing"
        bad = [r for r in results if r[0] != 200]
        assert not bad, f"{len(bad)} of {len(results)} requests failed during the swap: {bad[:5]}"
        versions = [v for _, v in results]
        assert versions[-1] == new_version, versions[-10:]
        switched = versions.index(new_version)
        assert set(versions[:switched]) <= {first_version}
        assert set(versions[switched:]) == {new_version}, "an answer went back to the old model"

        # SIGKILL of a publish step in the middle of its smoke test: the service keeps serving
        # the previous Bento, the deployment record and the aliases are untouched, and the
        # killed step leaves no server of its own behind.
        deployed = read_deployment(cfg)
        third = _register(cfg, keras_path, yolo_path)
        aliases_before = {n: aliases(cfg, n) for n in third}
        killed, orphans = _kill_publish_during_smoke_test(env, tmp_path)
        assert killed, "the publish step never reached its smoke test"
        assert read_deployment(cfg) == deployed
        assert {n: aliases(cfg, n) for n in third} == aliases_before
        assert _version(classify()) == new_version
        _, alive = psutil.wait_procs(orphans, timeout=60)
        assert not alive, f"the killed publish left {[p.cmdline()[:4] for p in alive]}"
    finally:
        stop.set()
        tree = []
        if proc.poll() is None:
            tree = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        client.close()
        log.close()
    assert proc.returncode == 0, (tmp_path / "supervisor.log").read_text()[-4000:]
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"SIGTERM left {[p.pid for p in alive]} running"
