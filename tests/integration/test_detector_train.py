"""The detector's subprocess entry end to end on synthetic smear fields, tiny and on CPU.

Training runs in a child process (``python -m training.detector.train``), as the DAG runs it, so
torch never enters the pytest process (which may hold TensorFlow from other tests). A
``sitecustomize`` in the child records every attempt to resolve or connect to a host: the
machine is offline, and the run must not even try.
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
from training.data.dataset import assign_splits, load_manifest, write_manifest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["WBC"]

def _child_env(home: Path, **extra: str) -> dict[str, str]:
    """The child's environment: this home, CPU only, and not marked as a test (MLflow
    switches its telemetry off under pytest; production has no such marker)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEUKOFLOW_CONFIG", "PYTEST_CURRENT_TEST", "MLFLOW_DISABLE_TELEMETRY")}
    return {**env, "LEUKOFLOW_HOME": str(home), "CUDA_VISIBLE_DEVICES": "", **extra}


def _curate_fields(home: Path, n_images: int, size: tuple[int, int], seed: int = 0) -> int:
    """Synthetic fields -> content-addressed curated store + manifest; returns its version."""
    from training.dev.synth import make_smear_batch

    batch = home / "landing" / "synth-fields"
    images = make_smear_batch(batch, n_images=n_images, size=size, seed=seed)
    curated = home / "curated"
    rows = []
    for img in images:
        data = img.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key, label_key = f"images/{sha[:2]}/{sha}.jpg", f"labels/{sha}.txt"
        (curated / key).parent.mkdir(parents=True, exist_ok=True)
        (curated / key).write_bytes(data)
        (curated / label_key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(batch / "labels" / f"{img.stem}.txt", curated / label_key)
        rows.append({"sha256": sha, "key": key, "kind": "field", "label": "", "subject_id": "",
                     "batch_id": "synth-fields", "source": img.name, "width": size[0],
                     "height": size[1], "split": "", "split_group": "", "label_key": label_key})
    cfg = load_config(home=home)
    return write_manifest(cfg, assign_splits(pd.DataFrame(rows), cfg)).version


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("home")
    version = _curate_fields(home, n_images=16, size=(320, 240))
    guard_env = net_guard_env(home, ROOT)
    net_log = Path(guard_env["NET_ATTEMPTS_LOG"])
    env = _child_env(
        home,
        LEUKOFLOW_DETECTOR__IMGSZ="96",
        LEUKOFLOW_DETECTOR__EPOCHS="1",
        LEUKOFLOW_DETECTOR__BATCH="8",
        **guard_env,
    )
    out = home / "candidate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "training.detector.train", "--dataset-version", str(version),
         "--tags-json", json.dumps({"airflow_run_id": "test-run"}), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"home": home, "version": version, "out": out, "net_log": net_log}


def test_candidate_json_has_measured_metrics(trained: dict) -> None:
    cand = json.loads(trained["out"].read_text())
    assert cand["family"] == "detector"
    assert cand["architecture"] == "yolov8n"
    assert cand["split_kind"] == "image"
    assert cand["dataset_version"] == trained["version"]
    assert cand["model_uri"].startswith("models:/m-")  # the logged model's own URI
    assert len(cand["test_set_sha256"]) == 64
    assert cand["champion_version"] is None and cand["champion_metrics"] is None
    m = cand["metrics"]
    for key in ("precision", "recall", "map50", "map50_95", "map50__WBC", "map50_95__WBC"):
        assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["train_time_s"] > 0 and m["latency_ms_per_image"] > 0
    assert m["total_params"] > 1e6  # yolov8n: about 3 M parameters
    for key in ("map50", "map50_95", "precision", "recall"):  # bootstrap CIs over test images
        assert m[f"{key}_ci_low"] <= m[f"{key}_image_level"] <= m[f"{key}_ci_high"], key
        # resampled from Ultralytics' own per-image matches: all images give its number back
        assert m[f"{key}_image_level"] == pytest.approx(m[key], abs=1e-9), key
    assert 0.0 <= m["val/map50"] <= 1.0  # the best weights on the val fields (ranking)
    assert 0 < m["trainable_params"] <= m["total_params"]


def test_nothing_tried_the_network(trained: dict) -> None:
    log = trained["net_log"]
    assert not log.exists(), f"network attempts: {log.read_text()}"


def test_run_is_in_mlflow_with_params_metrics_and_model(trained: dict) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    cfg = load_config(home=trained["home"])
    configure_mlflow(cfg)
    cand = json.loads(trained["out"].read_text())
    run = MlflowClient().get_run(cand["run_id"])
    assert run.data.params["detector.imgsz"] == "96"
    assert run.data.params["model_yaml"] == "yolov8n.yaml"
    assert run.data.params["detector.architectures"] == "['yolov8n']"
    assert run.data.params["nbs_resolved"] == "8"  # tiny set: no gradient accumulation
    assert run.data.tags["airflow_run_id"] == "test-run"
    assert run.data.tags["val_split"] == "val"
    assert run.data.tags["test_set_sha256"] == cand["test_set_sha256"]
    assert run.data.metrics["map50"] == pytest.approx(cand["metrics"]["map50"])
    history = MlflowClient().get_metric_history(cand["run_id"], "train/box_loss")
    assert [h.step for h in history] == [1]  # one epoch, logged with step = epoch
    assert "val/map50" in run.data.metrics and "best_val/map50" in run.data.metrics

    model_dir = Path(mlflow.artifacts.download_artifacts(
        cand["model_uri"], dst_path=str(trained["home"] / "dl")))
    assert (model_dir / "artifacts" / "best.pt").is_file()
    meta = mlflow.models.Model.load(str(model_dir)).metadata
    assert meta["family"] == "detector" and meta["classes"] == CLASSES and meta["imgsz"] == 96


def test_load_detector_and_detect_in_a_torch_process(trained: dict) -> None:
    """load_detector + detect (and the pyfunc) in a child process: torch stays out of pytest."""
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        # importing training quiets MLflow
        from training.detector.predict import detect, load_detector
        import mlflow, mlflow.pyfunc
        from PIL import Image
        from training.config import load_config
        from training.tracking import configure_mlflow

        cand = json.loads(Path(sys.argv[1]).read_text())
        configure_mlflow(load_config())
        model_dir = Path(mlflow.artifacts.download_artifacts(cand["model_uri"]))
        model, meta = load_detector(model_dir)
        image = Image.open(sorted(Path(sys.argv[2]).glob("*.jpg"))[0])
        boxes = detect(model, image, meta["imgsz"], conf=0.0)
        py = mlflow.pyfunc.load_model(cand["model_uri"]).predict([image, image])
        print(json.dumps({"meta": meta, "size": image.size, "boxes": boxes,
                          "pyfunc_n": len(py), "pyfunc_first": py[0][:3]}))
    """)
    net_log = trained["home"] / "net_attempts_serving.log"
    env = _child_env(trained["home"], NET_ATTEMPTS_LOG=str(net_log),
                     PYTHONPATH=os.pathsep.join([str(trained["home"] / "guard"), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(trained["out"]),
         str(trained["home"] / "landing" / "synth-fields" / "images")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    width, height = got["size"]
    assert got["meta"]["classes"] == CLASSES
    assert isinstance(got["boxes"], list)
    for box in got["boxes"]:
        assert set(box) == {"x1", "y1", "x2", "y2", "label", "confidence"}
        assert 0 <= box["x1"] <= box["x2"] <= width and 0 <= box["y1"] <= box["y2"] <= height
        assert box["label"] in CLASSES and 0.0 <= box["confidence"] <= 1.0
    assert got["pyfunc_n"] == 2
    assert not net_log.exists(), f"network attempts: {net_log.read_text()}"
    for box in got["pyfunc_first"]:
        assert set(box) == {"x1", "y1", "x2", "y2", "label", "confidence"}


def test_champion_is_evaluated_on_the_same_test_set(trained: dict) -> None:
    """Register the first model as champion; a second run must score it on the same test set."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    home = trained["home"]
    cfg = load_config(home=home)
    configure_mlflow(cfg)
    first = json.loads(trained["out"].read_text())
    mv = mlflow.register_model(first["model_uri"], cfg.mlflow.detector_name)
    MlflowClient().set_registered_model_alias(cfg.mlflow.detector_name, "champion", mv.version)

    out = home / "candidate2.json"
    env = _child_env(home, LEUKOFLOW_DETECTOR__IMGSZ="64", LEUKOFLOW_DETECTOR__EPOCHS="1",
                     LEUKOFLOW_DETECTOR__BATCH="8")
    proc = subprocess.run(
        [sys.executable, "-m", "training.detector.train", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = json.loads(out.read_text())
    assert second["champion_version"] == str(mv.version)
    assert second["test_set_sha256"] == first["test_set_sha256"]
    champ = second["champion_metrics"]
    assert set(champ) == {k for k in first["metrics"] if not k.startswith("val/")} - {
        "train_time_s", "trainable_params"}
    # Same weights, same test images, same imgsz (the champion's own, 96): same scores.
    for key in ("precision", "recall", "map50", "map50_95"):
        assert champ[key] == pytest.approx(first["metrics"][key], abs=1e-6)
    # The paired test over the same test images: present, and decisive in the gate both ways.
    m = second["metrics"]
    assert m["paired_map50_n_units"] == m["n_test_images"] > 0
    assert m["paired_map50_delta_ci_low"] <= m["paired_map50_delta"] <= m[
        "paired_map50_delta_ci_high"]
    from training.promotion.gate import gate
    from training.records import Candidate

    cand = Candidate.from_dict(second)
    lenient = {"detector_floor": 0.0, "max_regression": 1.0, "require_paired_improvement": True}
    ok, why = gate(load_config(home=home, gate={
        **lenient, "min_improvement": max(-1.0, min(1.0, m["paired_map50_delta_ci_high"]))}),
        cand)
    assert not ok and any("paired map50 difference" in r for r in why), why
    passed, why = gate(load_config(home=home, gate={
        **lenient, "min_improvement": max(-1.0, m["paired_map50_delta_ci_low"] - 0.01)}), cand)
    assert passed, why
    run = MlflowClient().get_run(second["run_id"])
    assert run.data.tags["champion_version"] == str(mv.version)
    assert run.data.metrics["champion/map50"] == pytest.approx(champ["map50"])


def test_evaluate_on_a_folder_reproduces_the_logged_test_metrics(tmp_path: Path) -> None:
    """`leukoflow evaluate leukemia-detector/<version> FOLDER` on a YOLO folder of the run's test
    fields (never curated; its own file names and class ids, plus a class the model does not
    know) gives back the test metrics the training run logged, CIs included, as an evaluation
    run of split kind 'external' linked to the model and tagged on the version.

    Its own model, trained long enough (40 epochs at 128 px, about a minute on CPU) to find some
    cells: the module's 1-epoch model scores 0 everywhere, which any scorer would reproduce."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_mlflow

    home = tmp_path / "home"
    version = _curate_fields(home, n_images=16, size=(320, 240))
    train_env = _child_env(home, LEUKOFLOW_DETECTOR__IMGSZ="128", LEUKOFLOW_DETECTOR__EPOCHS="40",
                           LEUKOFLOW_DETECTOR__BATCH="8", LEUKOFLOW_DETECTOR__WARMUP_EPOCHS="0")
    out_json = home / "candidate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "training.detector.train", "--dataset-version", str(version),
         "--out", str(out_json)],
        cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = load_config(home=home)
    configure_mlflow(cfg)
    client = MlflowClient()
    cand = json.loads(out_json.read_text())
    assert cand["metrics"]["map50"] > 0 and cand["metrics"]["recall"] > 0  # found some cells
    mv = mlflow.register_model(cand["model_uri"], cfg.mlflow.detector_name)
    df, _ = load_manifest(cfg, version)
    test = df[(df["split"] == "test") & (df["kind"] == "field")]
    folder = tmp_path / "other-lab"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
    # the folder's ids: 0 = RBC (unknown to the model, one box per field), 1 = WBC (the model's 0)
    (folder / "data.yaml").write_text("names: [RBC, WBC]\n")
    n_wbc = 0
    for i, row in enumerate(test.itertuples()):
        shutil.copyfile(home / "curated" / row.key, folder / "images" / f"field-{i:02d}.jpg")
        lines = [ln.split() for ln in (home / "curated" / row.label_key).read_text().splitlines()
                 if ln.strip()]
        assert all(parts[0] == "0" for parts in lines)
        n_wbc += len(lines)
        (folder / "labels" / f"field-{i:02d}.txt").write_text("".join(
            ["0 0.5 0.5 0.1 0.1\n"] + [" ".join(["1", *parts[1:]]) + "\n" for parts in lines]))

    env = _child_env(home, LEUKOFLOW_DETECTOR__BATCH="8", **net_guard_env(home, ROOT))
    net_log = Path(env["NET_ATTEMPTS_LOG"])
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "evaluate",
         f"{cfg.mlflow.detector_name}/{mv.version}", str(folder)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not net_log.exists(), f"network attempts: {net_log.read_text()}"
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["family"] == "detector" and out["split_kind"] == "external"
    assert out["layout"] == "yolo" and out["skipped"] == {}
    assert out["n_seen_in_training"] == 0  # test fields: neither trained nor validated on
    assert out["boxes_dropped"] == {"RBC": len(test)}
    assert out["classes_not_in_model"] == ["RBC"]

    logged = client.get_run(cand["run_id"]).data.metrics
    evaluation = client.get_run(out["run_id"])
    got = evaluation.data.metrics
    assert got["n_test_images"] == logged["n_test_images"] == len(test)
    same = {k for k in cand["metrics"]
            if k not in ("train_time_s", "latency_ms_per_image", "trainable_params")
            and not k.startswith("val/")}
    assert {"map50", "map50_95", "precision", "recall", "map50__WBC", "map50_ci_low",
            "map50_95_ci_high", "recall_image_level"} <= same
    for key in sorted(same):  # same weights, imgsz, images and order: the same figures
        assert got[key] == pytest.approx(logged[key], abs=1e-6), key
    assert evaluation.data.tags["split_kind"] == "external"
    assert evaluation.data.tags["family"] == "detector"
    assert evaluation.data.tags["model_version"] == str(mv.version)
    assert evaluation.data.tags["classes_not_in_model"] == "RBC"
    assert evaluation.data.params["boxes_dropped.RBC"] == str(len(test))
    assert evaluation.data.params["n_boxes"] == str(n_wbc)
    version = client.get_model_version(cfg.mlflow.detector_name, mv.version)
    assert "map50=" in version.tags[f"evaluation.{out['run_id']}"]
    model = mlflow.get_logged_model(cand["model_uri"].removeprefix("models:/"))
    linked = {m.dataset_name for m in model.metrics if m.key == "map50"}
    assert any(name.startswith("external-other-lab") for name in linked), linked
    table = pd.read_csv(mlflow.artifacts.download_artifacts(
        f"runs:/{out['run_id']}/predictions/external.csv"))
    assert len(table) == len(test) and set(table["sha256"]) == set(test["sha256"])
    assert table["n_boxes"].sum() == table["n_boxes__WBC"].sum() == n_wbc
    assert (table["n_true_positive_iou0.5"] <= table["n_predicted_conf0.25"]).all()


def test_cli_fails_with_one_clear_line_when_there_is_no_dataset(tmp_path: Path) -> None:
    env = _child_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "training.detector.train", "--out", str(tmp_path / "c.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DataValidationError:") and "validate a batch first" in last
    assert not (tmp_path / "c.json").exists()
