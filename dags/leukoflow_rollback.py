"""rollback: champion <- a named version (default: the recorded previous champion), republish.

Idempotent: the aliases move once per DAG run, so clearing and rerunning a finished rollback
moves nothing (it does not swap back). The move is recorded on the versions with this run as
the actor; publishing smoke-tests the Bento of the champions before the service swaps to it.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from leukoflow_dag_support import DEFAULT_ARGS, REGISTRY_POOL, TAGS, config_from


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
        "to": Param(None, type=["null", "string"],
                    description="version to make champion; null = the previous champion"),
    },
    doc_md=__doc__,
)
def rollback():
    @task(pool=REGISTRY_POOL)
    def move_aliases(params=None, run_id=None) -> dict:
        from training.stages import rollback

        return rollback(config_from(params), params["model"], params.get("to"),
                        actor=f"airflow:{run_id}")

    @task
    def republish(moved: dict, params=None) -> dict:
        from training.stages import publish

        return publish(config_from(params), [], always=True)

    republish(move_aliases())


rollback()
