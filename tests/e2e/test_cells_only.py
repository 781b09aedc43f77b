"""A cells-only deployment (no smear fields, so no detector) promotes and serves its classifier.

The whole chain through Airflow's ``dag.test()``: ingest a cell batch, retrain (no detector is
trained), promote the classifier, publish a Bento that serves the classifier alone, and record
it as deployed; the service answers ``/classify`` with the champion and says plainly that it
serves no detector.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_pipeline_dag import run_chain

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def cells_only(tmp_path_factory):
    return run_chain(tmp_path_factory.mktemp("cells_only") / "home", seed=3, n_fields=0)


def test_the_classifier_is_promoted_published_and_deployed(cells_only):
    from mlflow import MlflowClient

    from training.promotion.aliases import alias_version
    from training.publish.deploy import read_deployment

    cfg, batches, logs = cells_only
    assert len(batches) == 1
    assert "success" in logs["retrain"].splitlines()[-1]
    champion = alias_version(cfg, cfg.mlflow.classifier_name, "champion")
    assert champion is not None
    assert alias_version(cfg, cfg.mlflow.detector_name, "champion") is None
    deployed = read_deployment(cfg)
    assert deployed["models"] == {cfg.mlflow.classifier_name: champion}
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    assert client.get_model_version(cfg.mlflow.classifier_name, champion).tags[
        "gate_passed"] == "true"


def test_the_deployed_bento_answers_classify_and_says_it_has_no_detector(cells_only):
    import httpx

    from training.apikeys import create_key
    from training.data.dataset import curated_storage, load_manifest
    from training.publish.bento import serve
    from training.publish.deploy import read_deployment

    cfg, _, _ = cells_only
    df, _ = load_manifest(cfg)
    cell = df[(df["kind"] == "cell") & (df["split"] == "test")].iloc[0]
    image = curated_storage(cfg).read_bytes(cell["key"])
    key = create_key(cfg.api_keys_file, "e2e", ["classify", "detect"])
    deployed = read_deployment(cfg)
    files = {"image": ("c.png", image, "image/png")}
    auth = {"Authorization": f"Bearer {key}"}
    with (serve(cfg, target=deployed["bento_tag"]) as url,
          httpx.Client(base_url=url, timeout=60) as http):
        r = http.post("/classify", files=files, headers=auth)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["model"]["version"] == deployed["models"][
            cfg.mlflow.classifier_name]
        d = http.post("/detect", files=files, headers=auth)
        assert d.status_code == 503 and "no detector" in d.json()["error"]
