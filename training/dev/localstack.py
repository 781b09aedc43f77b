"""``make up`` / ``make down``: Airflow standalone, the MLflow UI and the service on loopback.

Each is a background process group whose pid is kept in ``home/state/pids.json`` and whose log
goes to ``home/logs/``; ``stop_all`` ends exactly those groups.
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
from training.dev.localenv import airflow_env, checkout, service_env

__all__ = ["start_all", "stop_all"]


def _pids_file(cfg: Config) -> Path:
    return cfg.state_dir / "pids.json"


def _start(cfg: Config, name: str, cmd: list[str], env: dict[str, str]) -> int:
    logs = cfg.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=checkout(), start_new_session=True)
    return proc.pid


def start_all(cfg: Config) -> None:
    """Start the three services unless they already run; print how to reach them."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    pids = json.loads(_pids_file(cfg).read_text()) if _pids_file(cfg).exists() else {}
    running = {n: p for n, p in pids.items() if _alive(p)}
    bin_dir = Path(sys.executable).parent
    af_env = airflow_env(cfg)
    (cfg.home / "airflow").mkdir(parents=True, exist_ok=True)
    wanted = {
        "airflow": ([str(bin_dir / "airflow"), "standalone"], af_env),
        "mlflow": ([str(bin_dir / "mlflow"), "server", "--backend-store-uri", cfg.tracking_uri,
                    "--default-artifact-root", cfg.artifact_root, "--host", "127.0.0.1",
                    "--port", os.environ.get("LEUKOFLOW_MLFLOW_PORT", "5000")],
                   service_env(cfg)),
        "service": ([sys.executable, "-m", "training.cli", "serve"], service_env(cfg)),
    }
    for name, (cmd, env) in wanted.items():
        if name in running:
            click.echo(f"{name} already running (pid {running[name]})")
            continue
        running[name] = _start(cfg, name, cmd, env)
        click.echo(f"started {name} (pid {running[name]}), log {cfg.home / 'logs' / name}.log")
    _pids_file(cfg).write_text(json.dumps(running))
    pw = Path(af_env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    click.echo(f"""
Airflow UI  http://127.0.0.1:{af_env['AIRFLOW__API__PORT']}  (user admin, password in {pw}
            once Airflow has started; first start takes a minute)
MLflow UI   http://127.0.0.1:{os.environ.get('LEUKOFLOW_MLFLOW_PORT', '5000')}
Service     http://{cfg.serving.host}:{cfg.serving.port}  (docs at /docs; needs champions:
            run `make demo` first; key: .venv/bin/leukoflow keys create me)
Web app     http://{cfg.serving.host}:{cfg.serving.port}/app  (first account: docs/webapp.md)
Stop all    make down""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop_all(cfg: Config) -> None:
    """Terminate the process groups started by :func:`start_all`."""
    if not _pids_file(cfg).exists():
        click.echo("nothing to stop")
        return
    pids = json.loads(_pids_file(cfg).read_text())
    for name, pid in pids.items():
        if not _alive(pid):
            continue
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            os.killpg(pid, signal.SIGKILL)
        click.echo(f"stopped {name} (pid {pid})")
    _pids_file(cfg).unlink()
