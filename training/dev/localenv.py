"""Environment for the embedded default: Airflow, BentoML and Ultralytics state under home.

One place computes these variables; the demo, ``make up``, the e2e tests and the training
subprocesses all use it, so every component finds the same SQLite files and folders.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from training.config import Config
from training.errors import ConfigError

__all__ = ["airflow_env", "checkout", "cpu_model", "pool_command", "service_env"]

CHECKOUT_ENV = "LEUKOFLOW_CHECKOUT"


def checkout() -> Path:
    """The source checkout whose ``dags/`` and ``plugins/`` the local Airflow reads.

    ``$LEUKOFLOW_CHECKOUT``, else the nearest folder at or above the working directory that
    holds ``dags/`` and ``pyproject.toml`` (``make`` runs from the checkout). The dev tooling
    needs one; the installed library does not.
    """
    if os.environ.get(CHECKOUT_ENV):
        return Path(os.environ[CHECKOUT_ENV]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dags").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    raise ConfigError(f"no leukoflow checkout at or above {here}: run from the checkout, or "
                      f"set {CHECKOUT_ENV} to it (the local Airflow reads its dags/ and plugins/)")


def service_env(cfg: Config) -> dict[str, str]:
    """Variables every leukoflow process needs (no Airflow ones)."""
    env = {
        "LEUKOFLOW_HOME": str(cfg.home),
        "BENTOML_HOME": str(cfg.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(cfg.home / "ultralytics"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(p for p in (str(checkout()), os.environ.get("PYTHONPATH"))
                                      if p),
    }
    if os.environ.get("LEUKOFLOW_CONFIG"):
        env["LEUKOFLOW_CONFIG"] = str(Path(os.environ["LEUKOFLOW_CONFIG"]).resolve())
    return env


def airflow_env(cfg: Config) -> dict[str, str]:
    """Airflow on SQLite under ``home/airflow``, reading this checkout's dags/ and plugins/."""
    airflow_home = cfg.home / "airflow"
    port = os.environ.get("LEUKOFLOW_AIRFLOW_PORT", "8080")
    return {
        **service_env(cfg),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(checkout() / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(checkout() / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__API__PORT": port,
        "AIRFLOW__API__HOST": "127.0.0.1",
        # Task processes report to the execution API; Airflow's default URL is always
        # localhost:8080, whatever port the API server listens on.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "NO_PROXY": "*",
        # `airflow standalone` starts its components as `airflow ...` from PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def pool_command(cfg: Config) -> list[str]:
    """``airflow pools set ...``: the one-slot pool the promote and rollback tasks run in, so
    alias moves never interleave across workers (every stack creates it after migrating)."""
    return ["pools", "set", cfg.pipeline.registry_pool, "1", "leukoflow registry alias moves"]


def cpu_model() -> str:
    """The CPU's name, for benchmark records (results are only comparable on the same one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
