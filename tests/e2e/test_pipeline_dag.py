"""The whole chain through Airflow's ``dag.test()`` on tiny synthetic data, then over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import load_config
from training.dev.localenv import airflow_env, pool_command
from training.dev.synthetic_landing import land_synthetic_batches

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
HERE = Path(__file__).resolve().parent


def _run(cmd: list[str], env: dict[str, str], timeout: int = 1500) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-6000:]}\n" \
                                f"{out.stderr[-6000:]}"
    return out.stdout


def run_chain(home: Path, *, seed: int, n_fields: int) -> tuple:
    """Land synthetic batches, migrate Airflow, create its pools, then ``dag.test()`` both
    DAGs in fresh processes; returns (cfg, landed batch ids, each DAG's output)."""
    os.environ["LEUKOFLOW_CONFIG"] = str(HERE / "tiny.yaml")
    try:
        cfg = load_config(home=home)
        env = {**os.environ, **airflow_env(cfg)}
    finally:
        del os.environ["LEUKOFLOW_CONFIG"]
    (home / "airflow").mkdir(parents=True)
    batches = land_synthetic_batches(cfg, seed=seed, n_subjects_per_class=3,
                                     images_per_subject=8, n_fields=n_fields)
    airflow = str(Path(sys.executable).with_name("airflow"))
    _run([airflow, "db", "migrate"], env, timeout=300)
    _run([airflow, *pool_command(cfg)], env, timeout=120)
    logs = {dag: _run([sys.executable, str(HERE / "run_dag.py"), dag], env)
            for dag in ("ingest_validate", "retrain")}
    return cfg, batches, logs


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return run_chain(tmp_path_factory.mktemp("e2e") / "home", seed=0, n_fields=12)


def test_both_dags_succeeded(chain):
    _, _, logs = chain
    assert "DAGRUN ingest_validate" in logs["ingest_validate"]
    assert "success" in logs["retrain"].splitlines()[-1]


def test_champions_registered_with_lineage(chain):
    from mlflow import MlflowClient

    from training.data.dataset import load_manifest

    cfg, batches, _ = chain
    _, dataset = load_manifest(cfg)  # one version per accepted batch: the newest was trained on
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    for name in (cfg.mlflow.classifier_name, cfg.mlflow.detector_name):
        mv = client.get_model_version_by_alias(name, "champion")
        assert mv.tags["gate_passed"] == "true"
        assert mv.tags["dataset_version"] == str(dataset.version)
        assert mv.tags["dataset_manifest_sha256"] == dataset.manifest_sha256
        assert set(mv.tags["batch_ids"].split(",")) == set(batches)
        assert mv.tags["airflow_run_id"]


def test_data_docs_and_reports_exist(chain):
    cfg, batches, _ = chain
    for batch_id in batches:
        summary = json.loads((cfg.reports_dir / batch_id / "summary.json").read_text())
        assert summary["accepted"] > 0
        assert Path(summary["data_docs"]).is_file()


def test_service_answers_with_champion_version(chain):
    import httpx
    from mlflow import MlflowClient

    from serving.auth import create_key
    from training.data.dataset import curated_storage, load_manifest
    from training.publish.bento import serve

    cfg, _, _ = chain
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.mlflow.classifier_name, "champion").version
    df, _ = load_manifest(cfg)
    cell = df[(df["kind"] == "cell") & (df["split"] == "test")].iloc[0]
    image = curated_storage(cfg).read_bytes(cell["key"])
    key = create_key(cfg.api_keys_file, "e2e", ["classify"])
    with (serve(cfg, target="leukoflow:latest") as url,
          httpx.Client(base_url=url, timeout=60) as http):
        r = http.post("/classify", files={"image": ("c.png", image, "image/png")},
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert str(r.json()["model"]["version"]) == str(champion)
        assert http.post("/classify", files={"image": ("c.png", image, "image/png")}
                         ).status_code == 401


def test_every_registered_version_has_a_model_card_of_its_logged_metrics(chain, tmp_path):
    """The promote step logged a card for each version; its figures are the run's metrics."""
    from mlflow import MlflowClient

    cfg, _, _ = chain
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    for name in (cfg.mlflow.classifier_name, cfg.mlflow.detector_name):
        versions = client.search_model_versions(f"name='{name}'")
        assert versions
        for mv in versions:
            assert mv.tags.get("model_card") == "model_card/model_card.html", (name, mv.version)
            out = Path(client.download_artifacts(mv.run_id, "model_card",
                                                 str(tmp_path / f"{name}-{mv.version}")))
            card = json.loads((out / "model_card.json").read_text())
            logged = client.get_run(mv.run_id).data.metrics
            assert card["version"] == str(mv.version)
            assert card["metrics"]["overall"], card["metrics"]
            for row in card["metrics"]["overall"]:
                assert row["value"] == logged[row["metric"]], row
            for metric, value in card["metrics"]["cost"].items():
                assert value == logged[metric], metric
            assert card["gate"]["passed"] == mv.tags["gate_passed"]
            assert (out / "model_card.md").read_text().startswith(f"# Model card: {name}")


def test_steward_reports_are_published_for_the_web_app(chain):
    from training.reports import batch_summaries, reports_storage

    cfg, batches, _ = chain
    published = {s["batch_id"]: s for s in batch_summaries(reports_storage(cfg))}
    assert set(published) == set(batches)
    for summary in published.values():
        assert summary["has_quarantine_page"] and summary["data_docs_page"]
        assert reports_storage(cfg).exists(f"_data_docs/{summary['data_docs_page']}")
