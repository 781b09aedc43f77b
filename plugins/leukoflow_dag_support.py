"""What every leukoflow DAG shares: the curated-dataset asset, default args, config from params.

Lives in Airflow's plugins folder (on ``sys.path`` for the DAG processor and workers), so each
fact is written once. Imports only light modules: DAG files must parse in milliseconds.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset

CURATED_DATASET = Asset("leukoflow://curated-dataset", group="leukoflow")
TAGS = ["leukoflow"]


def _pipeline() -> Any:
    """The ``pipeline`` config section (file + env; cheap: pydantic and YAML only)."""
    from training.config import load_config

    return load_config().pipeline


def notify_failure(context: dict[str, Any]) -> None:
    """Failure callback of every task: a log line and the configured webhook."""
    from training.config import load_config
    from training.notify import notify

    ti = context.get("task_instance") or context.get("ti")
    where = f"{getattr(ti, 'dag_id', '?')}.{getattr(ti, 'task_id', '?')}"
    notify(load_config(), "task_failed", f"{where} failed: {context.get('exception')}"[:2000],
           dag_id=getattr(ti, "dag_id", None), task_id=getattr(ti, "task_id", None),
           run_id=getattr(ti, "run_id", None))


PIPELINE = _pipeline()
REGISTRY_POOL = PIPELINE.registry_pool  # one slot: alias moves never interleave across hosts
TRAIN_TIMEOUT = timedelta(seconds=PIPELINE.train_timeout_s + 300)  # the child is killed first
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-engineering",
    # 2 in production; the demo sets 0 so that a failure shows at once, not after 2 x 2 min
    "retries": int(os.environ.get("LEUKOFLOW_DAG_RETRIES", "2")),
    "retry_delay": timedelta(minutes=2),
    "execution_timeout": timedelta(seconds=PIPELINE.task_timeout_s),
    "on_failure_callback": notify_failure,
}


def config_from(params: dict[str, Any] | None) -> Any:
    """Resolve the config once per task: file < env < the DAG run's ``config`` param."""
    from training.config import load_config

    overrides = dict((params or {}).get("config") or {})
    return load_config(**overrides)
