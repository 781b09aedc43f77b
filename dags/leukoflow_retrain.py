"""retrain: freeze the curated dataset -> train candidates -> gate -> register -> publish.

Triggered by a new ``curated-dataset`` version (or by hand with params). One classifier
candidate per architecture and one detector candidate per detector architecture (dynamic task
mapping), each in its own process, compared in one table per family on the parent run; when
the data hold few subjects per class, each classifier architecture is also retrained per fold
of a leave-subjects-out CV (``train_subject_cv``), whose figures model selection then prefers;
each is scored beside the current champion on the same frozen test split; the gate moves
``champion`` only when the candidate is not worse; publishing builds the Bento from the
champions and smoke-tests it over HTTP, rolling the aliases back if that fails.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from leukoflow_dag_support import (
    CURATED_DATASET,
    DEFAULT_ARGS,
    REGISTRY_POOL,
    TAGS,
    TRAIN_TIMEOUT,
    config_from,
)


@dag(
    dag_id="retrain",
    schedule=[CURATED_DATASET],
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    params={
        "config": Param({}, type="object", description="config overrides (nested keys)"),
        "architectures": Param(None, type=["null", "array"],
                               description="classifier architectures; null = config's list"),
        "train_detector": Param(True, type="boolean"),
        "detector_architectures": Param(None, type=["null", "array"],
                                        description="detector architectures (yolov5nu, "
                                                    "yolov5su, yolov8n, yolov8s); null = "
                                                    "config's list"),
        "dataset_version": Param(None, type=["null", "integer"],
                                 description="null = the version of the triggering asset event "
                                             "(else the newest)"),
    },
    doc_md=__doc__,
)
def retrain():
    @task
    def freeze_dataset(params=None, triggering_asset_events=None) -> dict:
        """The version this run trains on: the param, else the triggering event's, else newest."""
        from training.stages import curated_dataset

        versions = [int(e.extra["version"]) for events in (triggering_asset_events or {}).values()
                    for e in events if (e.extra or {}).get("version") is not None]
        version = params.get("dataset_version") or (max(versions) if versions else None)
        return curated_dataset(config_from(params), version)

    @task
    def start_run(dataset: dict, params=None, run_id=None) -> str:
        from training.stages import start_parent_run

        return start_parent_run(config_from(params), run_id, dataset)

    @task
    def architectures(params=None) -> list[str]:
        return params.get("architectures") or config_from(params).classifier.architectures

    @task(retries=0, execution_timeout=TRAIN_TIMEOUT)
    def train_classifier(architecture: str, dataset: dict, parent_run_id: str, params=None,
                         run_id=None) -> dict:
        from training.stages import train

        return train(config_from(params), "classifier", architecture=architecture,
                     dataset_version=dataset["version"], parent_run_id=parent_run_id,
                     tags={"airflow_run_id": run_id}, overrides=params.get("config"))

    @task(retries=0, execution_timeout=TRAIN_TIMEOUT)
    def train_subject_cv(architecture: str, dataset: dict, parent_run_id: str,
                         params=None) -> dict | None:
        """Leave-subjects-out CV of the architecture when the data hold few subjects per
        class (``cv.run_below_subjects_per_class``); None otherwise. Model selection prefers
        its figures."""
        from training.stages import subject_cv

        return subject_cv(config_from(params), architecture, dataset_version=dataset["version"],
                          parent_run_id=parent_run_id, overrides=params.get("config"),
                          only_if_small=True)

    @task
    def detector_architectures(dataset: dict, params=None) -> list[str]:
        """Empty when the detector is off or the dataset holds no smear fields (none mapped)."""
        if not params.get("train_detector", True) or not dataset.get("n_fields"):
            return []
        return (params.get("detector_architectures")
                or config_from(params).detector.architectures)

    @task(retries=0, execution_timeout=TRAIN_TIMEOUT)
    def train_detector(architecture: str, dataset: dict, parent_run_id: str, params=None,
                       run_id=None) -> dict:
        from training.stages import train

        return train(config_from(params), "detector", architecture=architecture,
                     dataset_version=dataset["version"], parent_run_id=parent_run_id,
                     tags={"airflow_run_id": run_id}, overrides=params.get("config"))

    # all_done: one failed architecture must not block the promotion of the others
    @task(trigger_rule="all_done", pool=REGISTRY_POOL)
    def promote(classifiers: list, detectors: list, archs: list[str], det_archs: list[str],
                dataset: dict, parent_run_id: str, cvs: list | None = None, params=None,
                run_id=None) -> list[dict]:
        from training.lineage import lineage_tags
        from training.stages import promote_best

        tags = {"airflow_run_id": run_id, **lineage_tags(),
                "dataset_manifest_sha256": dataset["manifest_sha256"],
                "batch_ids": ",".join(dataset["batch_ids"])}
        found = [c for c in [*(classifiers or []), *(detectors or [])] if c]
        if not found:
            raise RuntimeError("every training of this run failed: nothing to judge (see the "
                               "train_* task logs)")
        return promote_best(config_from(params), found, tags, parent_run_id=parent_run_id,
                            expected={"classifier": list(archs),
                                      "detector": list(det_archs or [])},
                            cv_results=[c for c in (cvs or []) if c])

    @task
    def publish(promotions: list[dict], params=None) -> dict:
        from training.stages import publish

        return publish(config_from(params), promotions)

    # none_failed: a detector mapped over no architecture is skipped, not failed
    @task(trigger_rule="none_failed")
    def all_trainings_succeeded(classifiers: list, detectors: list) -> int:
        """A leaf that needs every training: a failed one still marks the run failed."""
        return len(classifiers) + len(detectors or [])

    dataset = freeze_dataset()
    parent = start_run(dataset)
    archs = architectures()
    classifiers = train_classifier.partial(dataset=dataset, parent_run_id=parent).expand(
        architecture=archs
    )
    cvs = train_subject_cv.partial(dataset=dataset, parent_run_id=parent).expand(
        architecture=archs
    )
    det_archs = detector_architectures(dataset)
    detectors = train_detector.partial(dataset=dataset, parent_run_id=parent).expand(
        architecture=det_archs
    )
    publish(promote(classifiers, detectors, archs, det_archs, dataset, parent, cvs))
    all_trainings_succeeded(classifiers, detectors)


retrain()
