"""Run one DAG with ``dag.test()`` in a fresh process (Airflow reads its config at import)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))

from airflow.dag_processing.dagbag import DagBag  # noqa: E402

dag_id = sys.argv[1]
bag = DagBag(dag_folder=str(REPO / "dags"), safe_mode=False)
assert not bag.import_errors, bag.import_errors
run = bag.dags[dag_id].test()
print(f"DAGRUN {dag_id} {run.run_id} {run.state}")
sys.exit(0 if str(run.state).endswith("success") else 1)
