"""The hand-crafted baseline as a classifier architecture: trained through the same entry as
the CNNs (no TensorFlow), logged, loadable by serving's loader and the pyfunc, and judged as
the champion of the next run. Stain normalisation and subject balancing ride along, so the
options are exercised end to end too."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.integration.test_classifier_train import _curate_cells, _train
from training.config import load_config

pytestmark = pytest.mark.slow

_CONFIG = textwrap.dedent("""
    classifier:
      architectures: [handcrafted_baseline]
      image_size: 48
      stain_normalisation: reinhard
      balance_subjects: true
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("home")
    (home / "leukoflow.yaml").write_text(_CONFIG)
    version = _curate_cells(home)
    out = home / "candidate.json"
    proc = _train(home, out, "--dataset-version", str(version))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"home": home, "out": out, "proc": proc}


def test_the_baseline_trains_as_a_candidate(trained: dict) -> None:
    cand = json.loads(trained["out"].read_text())
    assert cand["architecture"] == "handcrafted_baseline" and cand["split_kind"] == "subject"
    m = cand["metrics"]
    assert 0.0 <= m["balanced_accuracy"] <= 1.0 and m["n_test"] == 16
    assert m["trainable_params"] > 0  # logistic regression coefficients
    assert not any(k.startswith("baseline/") for k in m)  # it is the baseline
    assert "import tensorflow" not in trained["proc"].stderr


def test_logged_baseline_loads_in_serving_and_pyfunc_alike(trained: dict) -> None:
    """In this process: the hand-crafted kind needs no TensorFlow to load or predict."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from PIL import Image

    from training.classifier.predict import load_classifier, predict_proba
    from training.data.dataset import load_manifest, materialize
    from training.preprocess import PreprocessParams
    from training.tracking import configure_mlflow

    cand = json.loads(trained["out"].read_text())
    cfg = load_config(home=trained["home"])
    configure_mlflow(cfg)
    df, _ = load_manifest(cfg)
    test = materialize(cfg, df[df["split"] == "test"], cfg.home / "cache")
    images = [Image.open(p) for p in test["path"]]
    probs = mlflow.pyfunc.load_model(cand["model_uri"]).predict(images)[
        ["p_all", "p_hem"]].to_numpy()
    model, meta = load_classifier(Path(mlflow.artifacts.download_artifacts(cand["model_uri"])))
    params = PreprocessParams.from_dict(meta["preprocess"])
    direct = predict_proba(model, images, params)  # serving's call
    assert direct.shape == (16, 2) and float(np.abs(probs - direct).max()) < 1e-6
    assert meta["model_kind"] == "handcrafted"
    assert params.stain == "reinhard" and len(params.stain_reference) == 6  # travels with it


def test_a_baseline_champion_is_scored_on_the_next_runs_rows(trained: dict) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    home = trained["home"]
    cfg = load_config(home=home)
    configure_mlflow(cfg)
    first = json.loads(trained["out"].read_text())
    mv = mlflow.register_model(first["model_uri"], cfg.mlflow.classifier_name)
    MlflowClient().set_registered_model_alias(cfg.mlflow.classifier_name, "champion",
                                              mv.version)
    out = home / "candidate2.json"
    proc = _train(home, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = json.loads(out.read_text())
    assert second["champion_version"] == str(mv.version)
    for key in ("accuracy", "balanced_accuracy", "roc_auc"):  # same model, same rows
        assert second["champion_metrics"][key] == pytest.approx(first["metrics"][key])
