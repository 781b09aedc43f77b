"""The classifier's subprocess entry end to end on synthetic cells, tiny and on CPU.

Training runs in a child process (``python -m training.classifier.train``), as the DAG runs it, so
TensorFlow never enters the pytest process (which may hold torch from other tests). Loading
the logged model runs in a child too. A ``sitecustomize`` in the training child records every
attempt to resolve or connect to a host: the machine is offline, and the run must not try.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.netguard import net_guard_env
from training.config import load_config
from training.data import dataset
from training.data.dataset import load_manifest, write_manifest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["all", "hem"]
ARCH = "vgg16"  # the quickest backbone to trace on CPU; every architecture is in the unit tests

_CONFIG = textwrap.dedent("""
    classifier:
      architectures: [vgg16]
      image_size: 32
      epochs: 2
      batch_size: 8
      lr_drop_epoch: 1   # lr 1e-3 in epoch 0, 1e-4 in epoch 1: the schedule is visible
""")


def _child_env(home: Path, **extra: str) -> dict[str, str]:
    """This home and config, CPU only, quiet TF, not marked as a test (MLflow switches its
    telemetry off under pytest; production has no such marker)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LEUKOFLOW_")
           and k not in ("PYTEST_CURRENT_TEST", "MLFLOW_DISABLE_TELEMETRY")}
    return {**env, "LEUKOFLOW_HOME": str(home), "LEUKOFLOW_CONFIG": str(home / "leukoflow.yaml"),
            "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _curate_cells(home: Path) -> int:
    """Synthetic C-NMC-like cells -> curated store + manifest with a subject-level split."""
    from training.dev.synth import make_cell_batch

    files = make_cell_batch(home / "landing" / "synth-cells", n_subjects_per_class=3,
                            images_per_subject=8, size=48, seed=5)
    curated = home / "curated"
    rows = []
    for f in files:
        _, subject, *_, label = f.stem.split("_")
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = f"images/{sha[:2]}/{sha}.png"
        (curated / key).parent.mkdir(parents=True, exist_ok=True)
        (curated / key).write_bytes(data)
        rows.append({"sha256": sha, "key": key, "kind": "cell", "label": label,
                     "subject_id": subject, "batch_id": "synth-cells", "source": f.name,
                     "width": 48, "height": 48, "split": "", "split_group": f"subject:{subject}",
                     "label_key": ""})
    df = pd.DataFrame(rows)
    # Per class, one subject each for train, val and test: no subject on two sides.
    for label in CLASSES:
        subjects = sorted(df.loc[df["label"] == label, "subject_id"].unique())
        for subject, split in zip(subjects, ("train", "val", "test"), strict=True):
            df.loc[df["subject_id"] == subject, "split"] = split
    return write_manifest(load_config(home=home), df).version


def _train(home: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.classifier.train", "--out", str(out), *args],
        cwd=ROOT, env=_child_env(home, **env), capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("home")
    (home / "leukoflow.yaml").write_text(_CONFIG)
    version = _curate_cells(home)
    guard_env = net_guard_env(home, ROOT)
    net_log = Path(guard_env["NET_ATTEMPTS_LOG"])
    out = home / "candidate.json"
    proc = _train(home, out, "--architecture", ARCH, "--dataset-version", str(version),
                  "--tags-json", json.dumps({"airflow_run_id": "test-run"}),
                  **guard_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"home": home, "version": version, "out": out, "proc": proc, "net_log": net_log}


def _mlflow(home: Path) -> tuple:
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    cfg = load_config(home=home)
    configure_mlflow(cfg)
    return cfg, mlflow, MlflowClient()


def test_candidate_json_has_measured_metrics(trained: dict) -> None:
    cand = json.loads(trained["out"].read_text())
    assert cand["family"] == "classifier"
    assert cand["architecture"] == ARCH
    assert cand["split_kind"] == "subject"
    assert cand["dataset_version"] == trained["version"]
    assert cand["model_uri"].startswith("models:/m-")  # the logged model's own URI
    df, _ = load_manifest(load_config(home=trained["home"]), trained["version"])
    assert cand["test_set_sha256"] == dataset.test_set_sha256(df)
    assert cand["champion_version"] is None and cand["champion_metrics"] is None
    m = cand["metrics"]
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "specificity_macro",
                "recall__all", "accuracy_ci_low", "accuracy_ci_high"):
        assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    assert m["n_test"] == 16  # one subject per class, 8 images each
    # the intervals resample the 2 test subjects; the cell-level ones are labelled as such
    assert m["ci_units"] == m["n_subjects"] == m["n_subjects_test"] == 2
    assert m["n_subjects_test__all"] == m["n_subjects_test__hem"] == 1
    assert m["n_subjects_train__all"] >= 1 and "accuracy_cell_ci_low" in m
    assert m["train_time_s"] > 0 and m["latency_ms_per_image"] > 0
    assert m["total_params"] >= m["trainable_params"] > 1e6  # VGG16: about 14.7 M
    # the hand-crafted baseline, fitted on the same train rows and scored on the same test rows
    for key in ("baseline/accuracy", "baseline/balanced_accuracy", "baseline/roc_auc",
                "baseline/accuracy_ci_low", "baseline/val/balanced_accuracy"):
        assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["baseline/n_test"] == m["n_test"] and m["baseline/fit_time_s"] > 0
    # stdout's last line is the same record, for callers that read the stream
    assert json.loads(trained["proc"].stdout.strip().splitlines()[-1]) == cand


def test_nothing_tried_the_network(trained: dict) -> None:
    log = trained["net_log"]
    assert not log.exists(), f"network attempts: {log.read_text()}"


def test_run_has_params_epoch_metrics_and_artifacts(trained: dict) -> None:
    cfg, mlflow, client = _mlflow(trained["home"])
    cand = json.loads(trained["out"].read_text())
    run = client.get_run(cand["run_id"])
    params = run.data.params
    # config overrides win; what the config leaves null comes from the paper (Batool & Byun)
    assert params["image_size"] == "32" and params["epochs"] == "2"
    assert params["optimizer"] == "adamax" and params["learning_rate"] == "0.001"
    assert params["n_train"] == "16" and params["n_val"] == "16" and params["n_test"] == "16"
    assert params["augmentation.rotation"] == "20.0"
    assert params["bn_recalibration_batches"] == "0"  # VGG16 has no BatchNorm
    assert run.data.tags["airflow_run_id"] == "test-run"
    assert run.data.tags["test_set_sha256"] == cand["test_set_sha256"]
    assert run.data.tags["split_kind"] == "subject"
    assert run.data.metrics["balanced_accuracy"] == pytest.approx(
        cand["metrics"]["balanced_accuracy"])

    for name in ("train_loss", "val_loss", "val_accuracy"):
        assert [h.step for h in client.get_metric_history(cand["run_id"], name)] == [0, 1], name
    lrs = [h.value for h in sorted(client.get_metric_history(cand["run_id"], "lr"),
                                   key=lambda h: h.step)]
    assert lrs == pytest.approx([1e-3, 1e-4])

    names = {a.path for a in client.list_artifacts(cand["run_id"])}
    names |= {a.path for d in ("plots", "predictions")
              for a in client.list_artifacts(cand["run_id"], d)}
    for expected in ("config.json", "candidate.json", "plots/confusion_matrix.png",
                     "plots/roc_curves.png", "plots/reliability.png", "predictions/test.csv"):
        assert expected in names, (expected, names)
    logged_cfg = mlflow.artifacts.load_dict(f"runs:/{cand['run_id']}/config.json")
    assert logged_cfg["classifier"]["image_size"] == 32

    info = mlflow.models.get_model_info(cand["model_uri"])
    meta = info.metadata
    assert meta["family"] == "classifier" and meta["architecture"] == ARCH
    assert meta["classes"] == CLASSES and meta["positive_class"] == "all"
    assert meta["preprocess"] == {"image_size": 32, "source_size": 450, "segmentation": "none",
                                  "stain": "none", "stain_reference": []}
    assert meta["model_kind"] == "keras"
    # calibration: T fitted on the val rows (on by default), stored with the model, and the
    # test ECE before and after it logged beside the metrics
    assert params["temperature_scaling"] == "True"
    assert meta["temperature"] == pytest.approx(float(params["temperature"]))
    assert run.data.metrics["temperature"] == pytest.approx(meta["temperature"])
    for key in ("ece", "ece_uncalibrated", "val/ece", "val/ece_uncalibrated"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    # raw images in, preprocessed by the pyfunc itself: no tensor signature to enforce
    assert info.signature is None


def test_run_logs_its_data_and_links_test_metrics_to_the_model(trained: dict) -> None:
    """MLflow 3: the frozen manifest and the test rows are dataset inputs of the run, and the
    test metrics are the logged model's own, measured on those test rows."""
    cfg, mlflow, client = _mlflow(trained["home"])
    cand = json.loads(trained["out"].read_text())
    inputs = client.get_run(cand["run_id"]).inputs.dataset_inputs
    names = {i.dataset.name: {t.value for t in i.tags} for i in inputs}
    version = trained["version"]
    assert names[f"curated-v{version}"] == {"training"}
    assert names[f"curated-v{version}-test"] == {"test"}
    model = mlflow.get_logged_model(cand["model_uri"].removeprefix("models:/"))
    linked = {m.key: m.value for m in model.metrics}
    assert linked["balanced_accuracy"] == pytest.approx(cand["metrics"]["balanced_accuracy"])
    measured = {m.dataset_name for m in model.metrics if m.key == "balanced_accuracy"}
    assert measured == {f"curated-v{version}-test"}
    version_of = mlflow.register_model(cand["model_uri"], "registered-from-the-logged-model")
    assert version_of.run_id == cand["run_id"]


def test_logged_model_loads_and_predicts_probabilities(trained: dict) -> None:
    """pyfunc + load_classifier/predict_proba in a TF child; they must agree with the run."""
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import mlflow, mlflow.pyfunc, numpy as np, pandas as pd
        from PIL import Image
        from training.classifier.predict import load_classifier, model_temperature, predict_proba
        from training.config import load_config
        from training.data.dataset import load_manifest, materialize
        from training.preprocess import PreprocessParams
        from training.tracking import configure_mlflow

        cand = json.loads(Path(sys.argv[1]).read_text())
        cfg = load_config()
        configure_mlflow(cfg)
        df, _ = load_manifest(cfg)
        test = materialize(cfg, df[df["split"] == "test"], cfg.home / "cache")
        images = [Image.open(p) for p in test["path"]]
        py = mlflow.pyfunc.load_model(cand["model_uri"])
        cols = ["p_all", "p_hem"]
        answer = py.predict(images)  # raw images: the pyfunc preprocesses them itself
        probs = answer[cols].to_numpy()
        from_paths = py.predict(pd.DataFrame({"image": list(test["path"])}))[cols].to_numpy()
        from_bytes = py.predict([Path(p).read_bytes() for p in test["path"]])[cols].to_numpy()
        model_dir = Path(mlflow.artifacts.download_artifacts(cand["model_uri"]))
        model, meta = load_classifier(model_dir)
        direct = predict_proba(model, images, PreprocessParams.from_dict(meta["preprocess"]),
                               model_temperature(meta))
        logged = pd.read_csv(mlflow.artifacts.download_artifacts(
            f"runs:/{cand['run_id']}/predictions/test.csv"))
        logged = logged.set_index("sha256").loc[list(test["sha256"])]
        print(json.dumps({
            "shape": list(probs.shape), "sums": probs.sum(axis=1).tolist(),
            "pyfunc_vs_direct": float(np.abs(probs - direct).max()),
            "pyfunc_vs_run": float(np.abs(probs - logged[cols].to_numpy()).max()),
            "paths_vs_images": float(np.abs(from_paths - probs).max()),
            "bytes_vs_images": float(np.abs(from_bytes - probs).max()),
            "labels_are_argmax": list(answer["label"]) == [
                cols[i][2:] for i in probs.argmax(axis=1)],
            "empty": list(predict_proba(model, [], PreprocessParams(32)).shape),
            "single": list(py.predict(images[0]).shape),
        }))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(trained["out"])], cwd=ROOT,
                          env=_child_env(trained["home"]), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["shape"] == [16, 2]
    assert got["sums"] == pytest.approx([1.0] * 16, abs=1e-5)
    assert got["pyfunc_vs_direct"] < 1e-5  # serving's path == the pyfunc's
    assert got["pyfunc_vs_run"] < 1e-4  # == what the run evaluated (train/serve identical)
    assert got["paths_vs_images"] < 1e-6 and got["bytes_vs_images"] < 1e-6
    assert got["labels_are_argmax"]
    assert got["empty"] == [0, 2] and got["single"] == [1, 3]  # label + one column per class


def test_champion_is_evaluated_on_the_same_test_set(trained: dict) -> None:
    """Register the first model as champion; a second run must score it on the same test set,
    with the champion's own preprocessing (32 px) although the new candidate uses 40 px."""
    home = trained["home"]
    cfg, mlflow, client = _mlflow(home)
    first = json.loads(trained["out"].read_text())
    mv = mlflow.register_model(first["model_uri"], cfg.mlflow.classifier_name)
    client.set_registered_model_alias(cfg.mlflow.classifier_name, "champion", mv.version)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name="retrain parent") as parent:
        pass

    out = home / "candidate2.json"
    proc = _train(home, out, "--parent-run-id", parent.info.run_id,
                  LEUKOFLOW_CLASSIFIER__IMAGE_SIZE="40", LEUKOFLOW_CLASSIFIER__EPOCHS="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = json.loads(out.read_text())
    assert second["architecture"] == ARCH  # the config's first architecture by default
    assert second["champion_version"] == str(mv.version)
    assert second["test_set_sha256"] == first["test_set_sha256"]
    champ = second["champion_metrics"]
    quality = {k for k in first["metrics"]
               if k not in ("train_time_s", "latency_ms_per_image", "total_params",
                            "trainable_params", "ece_uncalibrated", "temperature")
               and not k.startswith(("val/", "baseline/"))
               # subjects per split describe the run's data, not a scoring of its test rows
               and not k.startswith(("n_subjects_train", "n_subjects_val", "n_subjects_test"))}
    assert set(champ) == quality
    # the paired test of the second candidate against the champion, on the same rows
    assert {"paired_balanced_accuracy_delta", "paired_balanced_accuracy_delta_ci_low",
            "paired_balanced_accuracy_delta_ci_high"} <= set(second["metrics"])
    # Same weights, same test images, same preprocessing (the champion's own): same scores.
    for key in quality:
        assert champ[key] == pytest.approx(first["metrics"][key], abs=1e-6), key
    run = client.get_run(second["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["image_size"] == "40"
    assert run.data.tags["champion_version"] == str(mv.version)
    assert run.data.metrics["champion/accuracy"] == pytest.approx(champ["accuracy"])


def test_unknown_architecture_fails_with_one_line_naming_the_nearest(tmp_path: Path) -> None:
    (tmp_path / "leukoflow.yaml").write_text("{}\n")
    proc = _train(tmp_path, tmp_path / "c.json", "--architecture", "VGG-16")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ConfigError:") and "did you mean 'vgg16'" in last
    assert not (tmp_path / "c.json").exists()


def test_no_dataset_fails_with_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "leukoflow.yaml").write_text("{}\n")
    proc = _train(tmp_path, tmp_path / "c.json")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DataValidationError:") and "validate a batch first" in last


def test_evaluate_on_a_folder_reproduces_the_logged_test_metrics(trained: dict,
                                                                 tmp_path: Path) -> None:
    """`leukoflow evaluate <name>/<version> FOLDER` on a folder of the run's test rows (a
    manifest.csv layout, never curated) reproduces the test metrics the training run logged,
    as an evaluation run of split kind 'external' linked to the model and tagged on the version."""
    home = trained["home"]
    cfg, mlflow, client = _mlflow(home)
    cand = json.loads(trained["out"].read_text())
    mv = mlflow.register_model(cand["model_uri"], cfg.mlflow.classifier_name)
    df, _ = load_manifest(cfg, trained["version"])
    test = df[df["split"] == "test"]
    folder = tmp_path / "other-lab"
    folder.mkdir()
    lines = ["path,label,subject_id"]
    for row in test.itertuples():
        shutil.copyfile(home / "curated" / row.key, folder / f"{row.sha256[:12]}.png")
        lines.append(f"{row.sha256[:12]}.png,{row.label},{row.subject_id}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")

    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "evaluate",
         f"{cfg.mlflow.classifier_name}/{mv.version}", str(folder)],
        cwd=ROOT, env=_child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["split_kind"] == "external" and out["layout"] == "manifest"
    assert out["n_seen_in_training"] == 0 and out["skipped"] == {}

    logged = client.get_run(cand["run_id"]).data.metrics
    evaluation = client.get_run(out["run_id"])
    got = evaluation.data.metrics
    assert got["n_test"] == logged["n_test"] == len(test)
    same = ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro", "recall_macro",
            "specificity_macro", "roc_auc", "ece", "n_subjects",
            # subject-level intervals: the same subjects resampled with the same seed
            "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy_ci_low",
            "balanced_accuracy_ci_high")
    for key in same:
        assert got[key] == pytest.approx(logged[key], abs=1e-6), key
    assert evaluation.data.tags["split_kind"] == "external"
    assert evaluation.data.tags["model_version"] == str(mv.version)
    version = client.get_model_version(cfg.mlflow.classifier_name, mv.version)
    assert f"evaluation.{out['run_id']}" in version.tags
    model = mlflow.get_logged_model(cand["model_uri"].removeprefix("models:/"))
    linked = {m.dataset_name for m in model.metrics if m.key == "balanced_accuracy"}
    assert any(name.startswith("external-other-lab") for name in linked), linked
    names = {a.path for d in ("plots", "predictions")
             for a in client.list_artifacts(out["run_id"], d)}
    assert {"plots/confusion_matrix.png", "plots/roc_curves.png", "plots/reliability.png",
            "predictions/external.csv"} <= names
    table = pd.read_csv(mlflow.artifacts.download_artifacts(
        f"runs:/{out['run_id']}/predictions/external.csv"))
    assert len(table) == len(test) and set(table["sha256"]) == set(test["sha256"])


def test_embedding_drift_child_scores_a_batch_in_the_models_own_features(trained: dict,
                                                                          tmp_path: Path) -> None:
    """The ingest's embedding child (TF, own process) on the logged model: train rows as the
    reference, the test rows as the batch."""
    cfg, mlflow, client = _mlflow(trained["home"])
    cand = json.loads(trained["out"].read_text())
    model_dir = mlflow.artifacts.download_artifacts(cand["model_uri"], dst_path=str(tmp_path))
    df, _ = load_manifest(cfg, trained["version"])
    for split in ("train", "test"):
        paths = [str(trained["home"] / "curated" / k) for k in df.loc[df["split"] == split, "key"]]
        (tmp_path / f"{split}.txt").write_text("\n".join(paths))
    proc = subprocess.run(
        [sys.executable, "-m", "training.classifier.embedding", "--model-dir", model_dir,
         "--reference", str(tmp_path / "train.txt"), "--batch", str(tmp_path / "test.txt"),
         "--permutations", "50", "--out", str(tmp_path / "out.json")],
        cwd=ROOT, env=_child_env(trained["home"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["n_reference"] == 16 and out["n_batch"] == 16 and out["dimensions"] > 1
    assert out["score"] >= 0 and 0 < out["p_value"] <= 1
