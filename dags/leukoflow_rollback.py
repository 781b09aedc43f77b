"""rollback: champion <- previous_champion for one model, then republish and smoke-test."""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from leukoflow_dag_support import DEFAULT_ARGS, TAGS, config_from


@dag(
    dag_id="rollback",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    params={
        "config": Param({}, type="object", description="config overrides (nested keys)"),
        "model": Param("leukemia-classifier", type="string",
                       enum=["leukemia-classifier", "wbc-detector"]),
    },
    doc_md=__doc__,
)
def rollback():
    @task
    def swap_aliases(params=None) -> dict:
        from training.stages import rollback

        return rollback(config_from(params), params["model"])

    @task
    def republish(swapped: dict, params=None) -> dict:
        from training.stages import publish

        return publish(config_from(params), [])

    republish(swap_aliases())


rollback()
