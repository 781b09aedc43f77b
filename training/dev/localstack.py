"""``make up`` / ``make down``: Airflow, the MLflow UI and the service on loopback.

Each is a background session whose leader's pid is kept in ``home/state/pids.json`` and whose
log goes to ``home/logs/``; ``stop_all`` ends exactly those sessions, including the task and
training processes Airflow started in them (they run in process groups of their own).

Airflow's components are started one by one, not through ``airflow standalone``: the scheduler
comes last, once the API server answers its health checks. A task process reports to the
execution API before it runs anything; started earlier, it finds nothing listening, its
supervisor gives up after a few retries and the task fails before it ran ("finished with state
failed, but the task instance's state attribute is queued"), so the runs queued while Airflow
was down (an asset event, a cron catch-up) ended red at every start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from training.config import Config
from training.dev.localenv import airflow_env, checkout, pool_command, service_env
from training.errors import LeukoflowError

__all__ = ["airflow_healthy", "start_all", "stop_all"]

# Started first, in this order; the scheduler only once the API server is healthy.
AIRFLOW_COMPONENTS = ("api-server", "dag-processor", "triggerer")


def _pids_file(cfg: Config) -> Path:
    return cfg.state_dir / "pids.json"


def _start(cfg: Config, name: str, cmd: list[str], env: dict[str, str]) -> int:
    logs = cfg.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=checkout(), start_new_session=True)
    return proc.pid


def airflow_healthy(base_url: str) -> bool:
    """True once the API server answers both health routes a task and a person need."""
    import httpx

    try:
        with httpx.Client(base_url=base_url, timeout=5, trust_env=False) as http:
            if http.get("/execution/health").status_code != 200:
                return False
            r = http.get("/api/v2/monitor/health")
            return r.status_code == 200 and \
                r.json().get("metadatabase", {}).get("status") == "healthy"
    except (httpx.HTTPError, ValueError):
        return False


def _wait_healthy(base_url: str, pid: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not airflow_healthy(base_url):
        if not _alive(pid):
            raise LeukoflowError(f"the Airflow API server exited; log: {log}")
        if time.monotonic() > deadline:
            raise LeukoflowError(f"the Airflow API server did not answer {base_url}/api/v2/"
                                 f"monitor/health within {timeout_s:.0f} s; log: {log}")
        time.sleep(1)


def _migrate(cfg: Config, binary: str, env: dict[str, str]) -> None:
    """``airflow db migrate``, then the pools the DAGs run tasks in (before any scheduler)."""
    log = cfg.home / "logs" / "airflow-db-migrate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        for args in (["db", "migrate"], pool_command(cfg)):
            code = subprocess.run([binary, *args], env={**os.environ, **env}, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=checkout()).returncode
            if code != 0:
                raise LeukoflowError(f"`airflow {' '.join(args)}` exited {code}; log: {log}")


def start_all(cfg: Config, health_timeout_s: float = 300) -> None:
    """Start the services unless they already run; print how to reach them.

    Airflow's API server, DAG processor and triggerer start first (with MLflow and the
    service); the scheduler starts once the API server is healthy, so that no task is
    dispatched before the execution API can take it.
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    pids = json.loads(_pids_file(cfg).read_text()) if _pids_file(cfg).exists() else {}
    running = {n: p for n, p in pids.items() if _alive(p)}
    bin_dir = Path(sys.executable).parent
    af_env = airflow_env(cfg)
    airflow = str(bin_dir / "airflow")
    (cfg.home / "airflow").mkdir(parents=True, exist_ok=True)
    wanted = {
        **{f"airflow-{c}": ([airflow, c], af_env) for c in AIRFLOW_COMPONENTS},
        "mlflow": ([str(bin_dir / "mlflow"), "server", "--backend-store-uri", cfg.tracking_uri,
                    "--default-artifact-root", cfg.artifact_root, "--host", "127.0.0.1",
                    "--port", os.environ.get("LEUKOFLOW_MLFLOW_PORT", "5000")],
                   service_env(cfg)),
        "service": ([sys.executable, "-m", "training.cli", "serve"], service_env(cfg)),
    }
    if not any(n.startswith("airflow") for n in running):
        _migrate(cfg, airflow, af_env)
    for name, (cmd, env) in wanted.items():
        if name in running:
            click.echo(f"{name} already running (pid {running[name]})")
            continue
        running[name] = _start(cfg, name, cmd, env)
        click.echo(f"started {name} (pid {running[name]}), log {cfg.home / 'logs' / name}.log")
    _pids_file(cfg).write_text(json.dumps(running))
    api_url = f"http://127.0.0.1:{af_env['AIRFLOW__API__PORT']}"
    if "airflow-scheduler" in running:
        click.echo(f"airflow-scheduler already running (pid {running['airflow-scheduler']})")
    else:
        click.echo(f"waiting for the Airflow API server at {api_url} before the scheduler ...")
        start = time.monotonic()
        _wait_healthy(api_url, running["airflow-api-server"], health_timeout_s,
                      cfg.home / "logs" / "airflow-api-server.log")
        running["airflow-scheduler"] = _start(cfg, "airflow-scheduler", [airflow, "scheduler"],
                                              af_env)
        click.echo(f"API server healthy after {time.monotonic() - start:.0f} s; started "
                   f"airflow-scheduler (pid {running['airflow-scheduler']})")
        _pids_file(cfg).write_text(json.dumps(running))
    pw = Path(af_env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    click.echo(f"""
Airflow UI  {api_url}  (user admin, password in {pw})
MLflow UI   http://127.0.0.1:{os.environ.get('LEUKOFLOW_MLFLOW_PORT', '5000')}
Service     http://{cfg.serving.host}:{cfg.serving.port}  (docs at /docs; needs champions:
            run `make demo` first; key: .venv/bin/leukoflow keys create me)
Web app     http://{cfg.serving.host}:{cfg.serving.port}/app  (first account: docs/webapp.md)
Stop all    make down""")


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is this process's child (tests)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _session(sid: int) -> list[int]:
    """Every live process of the session ``sid`` (a leader started with start_new_session)."""
    import psutil

    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            continue
    return members


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _stop_session(sid: int, grace_s: float = 30) -> None:
    """SIGTERM the leader's group, then every process left in its session; SIGKILL stragglers."""
    try:
        os.killpg(sid, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + grace_s
    while _alive(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(_session(sid), signal.SIGTERM)  # task processes have groups of their own
    while _session(sid) and time.monotonic() < deadline + grace_s:
        time.sleep(0.2)
    _signal_all(_session(sid), signal.SIGKILL)
    _alive(sid)


def stop_all(cfg: Config) -> None:
    """Terminate the sessions started by :func:`start_all` (the scheduler first)."""
    if not _pids_file(cfg).exists():
        click.echo("nothing to stop")
        return
    pids = json.loads(_pids_file(cfg).read_text())
    for name, pid in reversed(list(pids.items())):
        if not _alive(pid) and not _session(pid):
            continue
        _stop_session(pid)
        click.echo(f"stopped {name} (pid {pid})")
    _pids_file(cfg).unlink()
