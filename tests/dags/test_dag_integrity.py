"""Every DAG parses fast, with no heavy imports, approved tags, retries and the right shape."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((REPO / "dags").glob("*.py"))
APPROVED_TAGS = {"leukoflow"}
HEAVY = ("tensorflow", "torch", "ultralytics", "great_expectations", "bentoml", "mlflow", "keras")


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    from training.config import load_config
    from training.dev.localenv import airflow_env

    env = airflow_env(load_config(home=tmp_path_factory.mktemp("home")))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, str(REPO / "plugins"))
    from airflow.dag_processing.dagbag import DagBag

    try:
        yield DagBag(dag_folder=str(REPO / "dags"), safe_mode=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_no_import_errors(dagbag):
    assert not dagbag.import_errors, "\n".join(
        f"{path}: {err}" for path, err in dagbag.import_errors.items())
    assert set(dagbag.dag_ids) == {"ingest_validate", "retrain", "rollback"}


@pytest.mark.parametrize("dag_id", ["ingest_validate", "retrain", "rollback"])
def test_tags_and_retries(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    where = f"DAG {dag_id} in {dag.fileloc}"
    assert set(dag.tags) <= APPROVED_TAGS and dag.tags, f"{where}: tags {dag.tags}"
    for task in dag.tasks:
        if task.task_id.startswith("train_"):
            continue  # a failed training run is not retried blindly: it costs minutes
        assert task.retries >= 2, f"{where}: task {task.task_id} has retries={task.retries}"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parses_without_heavy_imports(path):
    code = (
        "import sys, runpy; sys.path.insert(0, 'plugins');"
        f"runpy.run_path({str(path)!r});"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}, timeout=120)
    assert out.returncode == 0, f"{path.name} failed to parse:\n{out.stderr[-2000:]}"
    assert out.stdout.strip().splitlines()[-1] == "[]", f"{path.name} imports {out.stdout}"


def test_retrain_wiring(dagbag):
    dag = dagbag.dags["retrain"]
    downstream = {t.task_id: {d.task_id for d in t.downstream_list} for t in dag.tasks}
    assert "promote" in downstream["train_classifier"]
    assert "promote" in downstream["train_detector"]
    # detectors are mapped over their architectures like classifiers (a DAG param, a config list)
    assert {"train_detector", "promote"} <= downstream["detector_architectures"]
    assert dag.get_task("train_detector").is_mapped and "detector_architectures" in dag.params
    assert downstream["promote"] == {"publish"}
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"


def test_training_and_serving_never_import_airflow():
    offenders = [str(p.relative_to(REPO)) for d in ("training", "serving")
                 for p in (REPO / d).rglob("*.py")
                 if any(line.lstrip().startswith(("import airflow", "from airflow"))
                        for line in p.read_text().splitlines())]
    assert not offenders, f"Airflow imported outside dags/ and plugins/: {offenders}"
