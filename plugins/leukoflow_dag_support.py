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
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-engineering",
    # 2 in production; the demo sets 0 so that a failure shows at once, not after 2 x 2 min
    "retries": int(os.environ.get("LEUKOFLOW_DAG_RETRIES", "2")),
    "retry_delay": timedelta(minutes=2),
}


def config_from(params: dict[str, Any] | None) -> Any:
    """Resolve the config once per task: file < env < the DAG run's ``config`` param."""
    from training.config import load_config

    overrides = dict((params or {}).get("config") or {})
    return load_config(**overrides)
