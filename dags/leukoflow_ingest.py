"""ingest_validate: new complete batches -> GX validation -> quarantine / curated store.

Each complete batch (``_READY`` or ``manifest.csv`` present) is validated once; the newest
curated dataset version is then emitted as the ``curated-dataset`` asset, which triggers
``retrain``. A batch with a data problem yields a ``failed`` or ``rejected`` record, not a task
failure; and ``emit_dataset`` runs once every ``validate`` is done (``all_done``), so even a
batch whose task crashed does not hold back the event for the batches that were accepted.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from leukoflow_dag_support import CURATED_DATASET, DEFAULT_ARGS, TAGS, config_from


@dag(
    dag_id="ingest_validate",
    schedule="*/15 * * * *",
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    params={"config": Param({}, type="object", description="config overrides (nested keys)")},
    doc_md=__doc__,
)
def ingest_validate():
    @task
    def discover(params=None) -> list[str]:
        from training.stages import discover

        return discover(config_from(params))

    @task(max_active_tis_per_dag=1)
    def validate(batch_id: str, params=None) -> dict:
        from training.stages import validate

        return validate(config_from(params), batch_id)

    @task(outlets=[CURATED_DATASET], trigger_rule="all_done")
    def emit_dataset(results: list[dict], params=None, outlet_events=None) -> dict:
        from training.stages import curated_dataset

        results = [r for r in results or [] if r]  # a crashed validate leaves no result
        if not any(r["status"] == "accepted" for r in results):
            raise AirflowSkipException("no batch was accepted: the curated dataset is unchanged")
        dataset = curated_dataset(config_from(params))
        outlet_events[CURATED_DATASET].extra = {"version": dataset["version"]}
        return dataset

    @task
    def all_batches_validated(results: list[dict]) -> dict:
        """A leaf that needs every validate to succeed: a crashed one fails the DAG run."""
        return {r["batch_id"]: r["status"] for r in results}

    results = validate.expand(batch_id=discover())
    emit_dataset(results)
    all_batches_validated(results)


ingest_validate()
