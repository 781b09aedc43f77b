"""``make demo`` then ``make up``: the scheduler starts clean and runs the chain by itself.

One stack per module (tiny config, free ports, its own home): the demo's Airflow steps run
first (``run_chain``: ``dags test`` of both DAGs), then one more ``ingest_validate`` run is
queued while Airflow is down (as a cron catch-up would be), then ``start_all``. Everything
the tests see comes from the scheduler, never from ``dags test``; the stack is always stopped.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.config import Config, load_config
from training.dev.demo import run_chain
from training.dev.localenv import airflow_env
from training.dev.localstack import _session, start_all, stop_all
from training.dev.synthetic_landing import land_synthetic_batches

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.timeout(2400)]
HERE = Path(__file__).resolve().parent
QUIET_WINDOW_S = 120  # "no failed run within the first two minutes"
IMG_DIR = HERE.parents[1] / "docs" / "img"  # written only with UPDATE_DOCS_IMG=1
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    cfg: Config
    url: str
    demo_retrain_run: str
    started_at: float  # time.monotonic() right after start_all returned

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.cfg.home / "airflow" / "airflow.db", timeout=30)

    def runs(self, dag_id: str | None = None) -> list[tuple[str, str, str, str]]:
        with self.db() as conn:
            return conn.execute(
                "select dag_id, run_id, run_type, state from dag_run where ?1 is null or "
                "dag_id = ?1 order by id", (dag_id,)).fetchall()

    def scheduler_log(self) -> str:
        return (self.cfg.home / "logs" / "airflow-scheduler.log").read_text(errors="replace")

    def token(self) -> str:
        import httpx

        pw_file = self.cfg.home / "airflow" / "simple_auth_manager_passwords.json.generated"
        password = json.loads(pw_file.read_text())["admin"]
        r = httpx.post(f"{self.url}/auth/token", json={"username": "admin",
                                                       "password": password}, trust_env=False)
        assert r.status_code in (200, 201), r.text
        return r.json()["access_token"]


def _failures(stack: Stack) -> list[str]:
    with stack.db() as conn:
        runs = conn.execute("select dag_id, run_id from dag_run where state = 'failed'").fetchall()
        tis = conn.execute("select dag_id, run_id, task_id, state from task_instance where "
                           "state in ('failed', 'upstream_failed', 'up_for_retry')").fetchall()
    return [f"run {d} {r} failed" for d, r in runs] + [f"{d} {r} {t}={s}" for d, r, t, s in tis]


def _wait_for(what: str, check, timeout_s: float, stack: Stack, poll_s: float = 3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bad = _failures(stack)
        assert not bad, f"while waiting for {what}: {bad}\n{stack.scheduler_log()[-4000:]}"
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; runs: {stack.runs()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKOFLOW_CONFIG", str(HERE / "tiny.yaml"))
        for var in ("LEUKOFLOW_AIRFLOW_PORT", "LEUKOFLOW_MLFLOW_PORT", "LEUKOFLOW_SERVING__PORT",
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
                    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"):
            mp.setenv(var, str(_free_port()))
        cfg = load_config(home=home)
        land_synthetic_batches(cfg, seed=0, n_subjects_per_class=3, images_per_subject=8,
                               n_fields=12)
        run_chain(cfg)  # what `make demo` runs through Airflow
        with sqlite3.connect(cfg.home / "airflow" / "airflow.db") as conn:
            (demo_retrain,) = conn.execute(
                "select run_id from dag_run where dag_id='retrain' and state='success'"
            ).fetchone()
        # work queued while Airflow is down: the scheduler dispatches it at once when it starts
        env = {**os.environ, **airflow_env(cfg)}
        subprocess.run([str(Path(sys.executable).with_name("airflow")), "dags", "trigger",
                        "ingest_validate", "--run-id", "queued_before_up"], env=env, check=True,
                       capture_output=True, timeout=300)
        url = f"http://127.0.0.1:{os.environ['LEUKOFLOW_AIRFLOW_PORT']}"
        try:
            start_all(cfg, health_timeout_s=300)
            yield Stack(cfg, url, demo_retrain, time.monotonic())
        finally:
            pids = json.loads((cfg.state_dir / "pids.json").read_text()) \
                if (cfg.state_dir / "pids.json").exists() else {}
            stop_all(cfg)
            left = {name: _session(pid) for name, pid in pids.items() if _session(pid)}
            assert not left, f"processes left after stop_all: {left}"
            for var in ("LEUKOFLOW_AIRFLOW_PORT", "LEUKOFLOW_SERVING__PORT"):
                with socket.socket() as s:  # the Bento's circus tree has sessions of its own
                    assert s.connect_ex(("127.0.0.1", int(os.environ[var]))) != 0, \
                        f"something still listens on {var}={os.environ[var]} after stop_all"


def test_up_after_demo_starts_without_failures_or_duplicate_retrain(stack):
    """No failed run in the first two minutes; the demo's dataset is not retrained again."""
    queued = _wait_for("the run queued before `up` to succeed",
                       lambda: ("ingest_validate", "queued_before_up", "manual", "success")
                       in stack.runs("ingest_validate"), QUIET_WINDOW_S, stack)
    assert queued
    remaining = QUIET_WINDOW_S - (time.monotonic() - stack.started_at)
    deadline = time.monotonic() + max(remaining, 0)
    while time.monotonic() < deadline:
        assert not _failures(stack), _failures(stack)
        time.sleep(5)
    assert not _failures(stack), _failures(stack)
    retrains = stack.runs("retrain")
    assert [r[1] for r in retrains] == [stack.demo_retrain_run], \
        f"the scheduler retrained what the demo trained already: {retrains}"
    log = stack.scheduler_log()
    # the symptom of a task dispatched before the execution API answers, even when a retry
    # of its supervisor happens to save it
    for symptom in ("Connection refused", "finished with state failed"):
        assert symptom not in log, f"scheduler log shows {symptom!r}:\n{log[-4000:]}"


def test_triggered_ingest_leads_to_asset_triggered_retrain(stack):
    """A new batch + ingest_validate triggered over the REST API -> retrain by the asset."""
    import httpx

    with stack.db() as conn:
        (last_event,) = conn.execute("select coalesce(max(id), 0) from asset_event").fetchone()
    land_synthetic_batches(stack.cfg, seed=1, n_subjects_per_class=3, images_per_subject=8,
                           n_fields=0)
    r = httpx.post(f"{stack.url}/api/v2/dags/ingest_validate/dagRuns",
                   headers={"Authorization": f"Bearer {stack.token()}"},
                   json={"logical_date": None, "conf": {}}, trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    _wait_for(f"ingest_validate {run_id}",
              lambda: ("ingest_validate", run_id, "manual", "success")
              in stack.runs("ingest_validate"), 600, stack)
    with stack.db() as conn:  # this run's event, or a cron run's that took the batch first
        (event_id, extra) = conn.execute(
            "select id, extra from asset_event where source_dag_id='ingest_validate' and "
            "id > ? order by id limit 1", (last_event,)).fetchone()
    version = json.loads(extra)["version"]

    def retrained():
        with stack.db() as conn:
            return conn.execute(
                "select r.run_id, r.state from dag_run r join dagrun_asset_event e on "
                "e.dag_run_id = r.id where r.dag_id='retrain' and r.run_type='asset_triggered' "
                "and e.event_id=?", (event_id,)).fetchone()

    run = _wait_for(f"an asset-triggered retrain of dataset version {version} to succeed",
                    lambda: (lambda row: row if row and row[1] == "success" else None)(
                        retrained()), 900, stack, poll_s=5)
    assert run[1] == "success"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.cfg.tracking_uri,
                          registry_uri=stack.cfg.tracking_uri)
    versions = client.search_model_versions(f"name='{stack.cfg.mlflow.classifier_name}'")
    assert any(mv.tags.get("airflow_run_id") == run[0]
               and mv.tags.get("dataset_version") == str(version) for mv in versions), \
        [(mv.version, mv.tags) for mv in versions]


def test_chain_triggered_from_the_airflow_ui(stack, tmp_path):
    """A person's path: log in, open ingest_validate, Trigger, the params form, run it."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser at {CHROMIUM}: `apt-get install -y chromium` (make install "
                    "does it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (the `test` extra)")
    out = IMG_DIR if os.environ.get("UPDATE_DOCS_IMG") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    pw_file = stack.cfg.home / "airflow" / "simple_auth_manager_passwords.json.generated"
    password = json.loads(pw_file.read_text())["admin"]
    before = {r[1] for r in stack.runs("ingest_validate")}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{stack.url}/")
            page.locator("input[name=username]").fill("admin")
            page.locator("input[name=password]").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("ingest_validate").first.wait_for()
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(out / "airflow-dags.png"))
            page.goto(f"{stack.url}/dags/ingest_validate")
            page.get_by_role("button", name="Trigger").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("config overrides (nested keys)").wait_for()
            page.wait_for_timeout(500)  # let the JSON editor paint
            page.screenshot(path=str(out / "airflow-trigger-form.png"))
            dialog.get_by_role("button", name="Trigger", exact=True).click()
            dialog.wait_for(state="hidden")
        finally:
            browser.close()
    assert (out / "airflow-trigger-form.png").stat().st_size > 10_000
    new = _wait_for("the run triggered from the UI",
                    lambda: [r for r in stack.runs("ingest_validate") if r[1] not in before],
                    60, stack, poll_s=1)
    run_id = new[0][1]
    _wait_for(f"ingest_validate {run_id} (triggered from the UI) to succeed",
              lambda: ("ingest_validate", run_id, "manual", "success")
              in stack.runs("ingest_validate"), 300, stack)
