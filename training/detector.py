"""The cell detector: Ultralytics YOLO trained on curated smear fields, judged on the test split.

One front door per job, Ultralytics' own API underneath:

* :func:`train_and_evaluate_detector` - curated manifest -> YOLO dataset -> train -> evaluate
  the best weights AND the current champion on the same frozen test split -> MLflow run with
  params, per-epoch metrics and the model (pyfunc, see ``training.detector_pyfunc``) ->
  :class:`~training.records.Candidate`.
* :func:`load_detector` / :func:`detect` - the light serving path (no MLflow at call time).
* ``python -m training.detector --out candidate.json`` - the subprocess the retrain DAG runs,
  so torch never shares a process with TensorFlow.

Ultralytics is imported only inside functions, after :func:`configure_ultralytics`, which
keeps it offline (no hub, no analytics, no font or AMP-check downloads) and stops its MLflow
callback, which would otherwise call autolog and end our run.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from training.config import Config
from training.entry import run_candidate_entry
from training.errors import (
    ConfigError,
    DataValidationError,
    RegistryError,
    TrainingError,
)
from training.records import Candidate
from training.registry import download_champion
from training.tracking import pinned_requirements

__all__ = [
    "configure_ultralytics",
    "detect",
    "load_detector",
    "main",
    "train_and_evaluate_detector",
    "write_yolo_dataset",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LATENCY_IMAGES = 32  # test images timed for latency_ms_per_image (after one warm-up call)
# Ultralytics' AMP self-check loads this file and downloads it when missing (online only).
_AMP_CHECK_WEIGHTS = "yolo26n.pt"
# Ultralytics integrations that would log elsewhere or phone home: all off.
_ULTRALYTICS_OFF = ("sync", "hub", "clearml", "comet", "dvc", "mlflow", "raytune",
                    "tensorboard", "wandb", "vscode_msg", "openvino_msg")


# ------------------------------------------------------------------------------- set-up
def configure_ultralytics(home: Path | None = None, *, verbose: bool | None = None) -> Path:
    """Make Ultralytics offline-safe and quiet; call before the first ``import ultralytics``.

    ``YOLO_CONFIG_DIR`` (settings, fonts, weights) goes to ``<home>/ultralytics`` (or an
    existing ``YOLO_CONFIG_DIR``, else a temp folder). ``YOLO_OFFLINE``/``YOLO_VERBOSE`` set in
    the environment win, so an online machine can opt back in. Returns the folder Ultralytics
    actually uses (it adds an ``Ultralytics`` sub-folder).
    """
    if home is not None:
        config_dir = Path(home) / "ultralytics"
    else:
        config_dir = Path(os.environ.get("YOLO_CONFIG_DIR")
                          or Path(tempfile.gettempdir()) / "leukoflow-ultralytics")
    config_dir.mkdir(parents=True, exist_ok=True)
    if "ultralytics" in sys.modules:
        from ultralytics.utils import USER_CONFIG_DIR

        if Path(USER_CONFIG_DIR).parent != config_dir:
            log.warning("ultralytics was imported before configure_ultralytics(): its config dir "
                        "stays %s (settings are still applied in memory)", USER_CONFIG_DIR)
    else:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install at run time
    os.environ.setdefault("YOLO_VERBOSE", "True" if verbose else "False")

    from ultralytics import settings
    from ultralytics.utils import USER_CONFIG_DIR

    config_dir = Path(USER_CONFIG_DIR)  # Ultralytics adds its own sub-folder
    _ship_fonts(config_dir)

    off = {key: (False if isinstance(settings.defaults.get(key), bool) else "")
           for key in _ULTRALYTICS_OFF if key in settings.defaults}
    settings.update(
        off,
        api_key="",
        weights_dir=str(config_dir / "weights"),
        datasets_dir=str(config_dir / "datasets"),
        runs_dir=str(config_dir / "runs"),
    )
    return config_dir


def _ship_fonts(config_dir: Path) -> None:
    """Put the fonts Ultralytics asks for where it looks first, so it never goes online for them.

    ``check_det_dataset`` calls ``check_font('Arial.ttf')`` even with ``plots=False``, and a
    miss sends a HEAD request to GitHub. Matplotlib's DejaVu Sans (free licence, already
    installed) stands in; it is only ever used to draw labels on plots.
    """
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = config_dir / name
        if not target.exists() and source.is_file():
            shutil.copyfile(source, target)


# ------------------------------------------------------------------------------ dataset
def _link(src: Path, dest: Path) -> None:
    """Symlink ``dest`` -> ``src``; copy where the filesystem refuses links."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _read_labels(path: str, n_classes: int, image: str) -> str:
    """The YOLO label text of one field, checked: ``class cx cy w h``, class in range."""
    if not path:
        return ""  # an image without objects is a valid background image
    if not Path(path).is_file():
        raise DataValidationError(f"label file {path} of field {image} is missing")
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    for i, parts in enumerate(lines, 1):
        ok = len(parts) == 5
        try:
            cls, box = int(parts[0]), [float(v) for v in parts[1:]]
        except (ValueError, IndexError):
            ok = False
        if not ok or not 0 <= cls < n_classes or not all(0.0 <= v <= 1.0 for v in box):
            raise DataValidationError(
                f"label file {path} (field {image}) line {i} = {' '.join(parts)!r}: expected "
                f"'class cx cy w h' with class in 0..{n_classes - 1} and coordinates in [0, 1]"
            )
    return "".join(" ".join(parts) + "\n" for parts in lines)


def write_yolo_dataset(df: pd.DataFrame, dest: Path, classes: list[str]) -> Path:
    """Lay out the smear fields of a materialized manifest the way Ultralytics reads them.

    ``dest/images/<split>/<sha>.<ext>`` are symlinks to the curated files (copies where links
    fail); ``dest/labels/<split>/<sha>.txt`` are checked copies of the YOLO labels. Only
    ``kind == "field"`` rows count. If the manifest has no ``val`` fields, training validates on
    ``train`` (a logged warning: early stopping and best-epoch choice then see training images);
    final metrics are always computed on ``test``, which must not be empty. Returns
    ``dest/data.yaml``.
    """
    if "path" not in df.columns:
        raise DataValidationError("the manifest has no 'path' column: run dataset.materialize()")
    if not classes:
        raise ConfigError("detector classes are empty: set data.detector_classes")
    fields = df[df["kind"] == "field"]
    counts = {s: int((fields["split"] == s).sum()) for s in SPLITS}
    if counts["train"] == 0 or counts["test"] == 0:
        raise DataValidationError(
            f"the detector needs smear fields in train and test, got {counts} "
            f"({len(fields)} fields in all)"
        )
    dest = Path(dest)
    for sub in ("images", "labels"):
        shutil.rmtree(dest / sub, ignore_errors=True)  # no stale files from an older version
    seen: set[str] = set()
    for row in fields.itertuples(index=False):
        if row.split not in SPLITS:
            raise DataValidationError(f"field {row.sha256} has split {row.split!r}, not {SPLITS}")
        if row.sha256 in seen:
            continue
        seen.add(row.sha256)
        src = Path(row.path)
        if not src.is_file():
            raise DataValidationError(f"image {src} of field {row.sha256} is missing")
        label_path = getattr(row, "label_path", "") or ""
        text = _read_labels(str(label_path), len(classes), row.sha256)
        _link(src.resolve(), dest / "images" / row.split / f"{row.sha256}{src.suffix.lower()}")
        label = dest / "labels" / row.split / f"{row.sha256}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(text)
    val = "images/val"
    if counts["val"] == 0:
        log.warning("no smear fields in the val split: validating on train during training "
                    "(best-epoch choice is then optimistic); test metrics are unaffected")
        val = "images/train"
    data = {
        "path": str(dest.resolve()),
        "train": "images/train",
        "val": val,
        "test": "images/test",
        "nc": len(classes),
        "names": dict(enumerate(classes)),
    }
    data_yaml = dest / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


# ----------------------------------------------------------------------------- training
def _device() -> int | str:
    import torch

    return 0 if torch.cuda.is_available() else "cpu"


def _amp(device: int | str) -> bool:
    """AMP on GPU only, and only when its self-check needs no download (offline-safe)."""
    if device == "cpu":
        return False
    from ultralytics.utils import ONLINE, SETTINGS

    if ONLINE or (Path(SETTINGS["weights_dir"]) / _AMP_CHECK_WEIGHTS).is_file():
        return True
    log.warning("AMP off: its self-check needs %s in %s and this machine is offline",
                _AMP_CHECK_WEIGHTS, SETTINGS["weights_dir"])
    return False


def _nominal_batch(nbs: int | None, batch: int, n_train: int) -> int:
    """Ultralytics' ``nbs`` (accumulation target) for this run; see ``DetectorConfig.nbs``.

    Ultralytics steps the optimizer every ``round(nbs / batch)`` batches: with its 64 and
    a demo-sized set (say 24 fields, batch 4: 6 batches an epoch) that is one step in about
    three epochs, and a short run ends with mAP 0. Without an explicit value, accumulate
    only when an epoch still makes ten or more steps.
    """
    if nbs is not None:
        return nbs
    return 64 if n_train >= 640 else batch


def _metric_name(key: str) -> str:
    """Ultralytics result keys -> MLflow names: ``metrics/mAP50-95(B)`` -> ``val/map50_95``."""
    key = key.replace("(B)", "")
    if key.startswith("metrics/"):
        key = "val/" + key[len("metrics/"):].replace("mAP50-95", "map50_95").replace("mAP", "map")
    return re.sub(r"[^\w\-./ :]", "_", key)


def _safe(name: str) -> str:
    return re.sub(r"[^\w\-.]", "_", name)


def _epoch_logger(run_id: str) -> Callable[[Any], None]:
    """An ``on_fit_epoch_end`` callback: losses, val metrics and lr to MLflow, step = epoch.

    Ultralytics fires the same event once more after the loop, for its final validation of
    ``best.pt``; those numbers go to ``best_val/*`` (no step) instead of a fake extra epoch.
    """
    state = {"stopped": False}

    def on_fit_epoch_end(trainer: Any) -> None:
        import mlflow

        if state["stopped"]:  # the event after the last epoch: final validation of best.pt
            best = {_metric_name(k).replace("val/", "best_val/", 1): float(v)
                    for k, v in trainer.metrics.items()}
            mlflow.log_metrics({k: v for k, v in best.items() if math.isfinite(v)},
                               run_id=run_id)
            return
        state["stopped"] = bool(trainer.stop)
        values = {**trainer.label_loss_items(trainer.tloss, prefix="train"),
                  **trainer.metrics, **trainer.lr}
        metrics = {_metric_name(k): float(v) for k, v in values.items()}
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        epoch = int(trainer.epoch) + 1
        mlflow.log_metrics(metrics, step=epoch, run_id=run_id)
        log.info("detector epoch %d/%d: %s", epoch, trainer.epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

    return on_fit_epoch_end


def _build_model(cfg: Config) -> Any:
    """A YOLO from the model yaml (random init) or a local .pt, plus optional local weights."""
    from ultralytics import YOLO

    spec = cfg.detector.model
    if spec.endswith(".pt") and not Path(spec).is_file():
        raise ConfigError(f"detector.model = {spec!r} is not a local file; offline, .pt weights "
                          "cannot be downloaded: use a model yaml (e.g. yolov8n.yaml) or a path")
    try:
        model = YOLO(spec, task="detect")
    except (FileNotFoundError, KeyError) as exc:
        raise ConfigError(f"detector.model = {spec!r} is not a known Ultralytics model yaml "
                          f"or file (e.g. yolov8n.yaml, yolov5nu.yaml): {exc}") from exc
    if cfg.detector.weights:
        if not Path(cfg.detector.weights).is_file():
            raise ConfigError(f"detector.weights = {cfg.detector.weights!r} is not a local file; "
                              "offline, weights cannot be downloaded: give a path or null")
        model.load(cfg.detector.weights)
    return model


def _train(
    model: Any, cfg: Config, data_yaml: Path, work: Path, *, nbs: int, device: int | str
) -> tuple[Path, float]:
    """Run Ultralytics' trainer; return the best weights and the wall time of training."""
    det = cfg.detector
    start = time.perf_counter()
    try:
        model.train(data=str(data_yaml), imgsz=det.imgsz, epochs=det.epochs, batch=det.batch,
                    nbs=nbs, warmup_epochs=det.warmup_epochs, workers=det.workers,
                    seed=det.seed, deterministic=True, device=device, amp=_amp(device),
                    plots=False, project=str(work), name="train", exist_ok=True, verbose=False)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        raise TrainingError(f"YOLO training of {det.model} failed: {exc}") from exc
    train_time = time.perf_counter() - start
    for weights in (model.trainer.best, model.trainer.last):
        if Path(weights).is_file():
            return Path(weights), train_time
    raise TrainingError(f"YOLO training of {det.model} wrote no weights under {work}")


def _label_classes(labels_dir: Path) -> set[int]:
    """Class ids that occur in a split's label files (per-class metrics exist only for them)."""
    found: set[int] = set()
    for path in labels_dir.glob("*.txt"):
        found.update(int(ln.split()[0]) for ln in path.read_text().splitlines() if ln.strip())
    return found


def _evaluate(
    weights: Path, data_yaml: Path, *, imgsz: int, batch: int, device: int | str,
    classes: list[str], out_dir: Path,
) -> dict[str, float]:
    """Test-split metrics of one weights file: P, R, mAP50, mAP50-95 (overall and per class),
    latency per image and parameter count. Every number is measured here."""
    from PIL import Image
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    names = {int(k): str(v) for k, v in model.names.items()}
    if [names[i] for i in sorted(names)] != list(classes):
        raise TrainingError(f"model {weights} detects {list(names.values())} but the dataset's "
                            f"classes are {classes}: the two cannot be compared")
    res = model.val(data=str(data_yaml), split="test", imgsz=imgsz, batch=batch, device=device,
                    plots=False, project=str(out_dir.parent), name=out_dir.name, exist_ok=True,
                    verbose=False, workers=0)
    box = res.box
    metrics = {"precision": float(box.mp), "recall": float(box.mr),
               "map50": float(box.map50), "map50_95": float(box.map)}
    index = {int(c): i for i, c in enumerate(box.ap_class_index)}
    root = data_yaml.parent
    for c in sorted(_label_classes(root / "labels" / "test")):
        i = index.get(c)  # a class with no true positive at all has no row: its scores are 0
        p, r, ap50, ap = box.class_result(i) if i is not None else (0.0, 0.0, 0.0, 0.0)
        name = _safe(classes[c])
        metrics.update({f"precision__{name}": float(p), f"recall__{name}": float(r),
                        f"map50__{name}": float(ap50), f"map50_95__{name}": float(ap)})

    images = sorted((root / "images" / "test").iterdir())[:LATENCY_IMAGES]
    pil = [Image.open(p).convert("RGB") for p in images]
    model.predict(pil[0], imgsz=imgsz, device=device, verbose=False)  # warm-up
    start = time.perf_counter()
    for im in pil:
        model.predict(im, imgsz=imgsz, device=device, verbose=False)
    metrics["latency_ms_per_image"] = 1000.0 * (time.perf_counter() - start) / len(pil)
    metrics["params"] = float(sum(p.numel() for p in model.model.parameters()))
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(f"evaluation of {weights} gave non-finite metrics: {bad}")
    return metrics


def _champion(cfg: Config, dest: Path) -> tuple[str, Path, dict[str, Any]] | None:
    """The champion's version, local model dir and metadata; None when there is none yet."""
    found = download_champion(cfg, "detector", dest)
    if found is None:
        return None
    version, local = found
    _, meta = _read_model_dir(local)
    return version, local, meta


def _pip_requirements() -> list[str]:
    return pinned_requirements(
        ("mlflow", "ultralytics", "torch", "torchvision", "pillow", "numpy", "pandas"))


def _fields(cfg: Config, dataset_version: int | None) -> tuple[pd.DataFrame, Any]:
    from training.dataset import load_manifest, materialize

    df, ds = load_manifest(cfg, dataset_version)
    fields = df[df["kind"] == "field"]
    if fields.empty:
        raise DataValidationError(
            f"dataset version {ds.version} holds no smear fields (kind=field): the detector "
            "needs YOLO-labelled fields; ingest a YOLO or Pascal VOC batch first"
        )
    return materialize(cfg, fields, cfg.home / "cache"), ds


def train_and_evaluate_detector(
    cfg: Config,
    *,
    dataset_version: int | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Candidate:
    """Train a YOLO candidate on the curated fields and judge it and the champion on test.

    Everything goes to one MLflow run (nested under ``parent_run_id`` if given): resolved
    detector params, ``config.json``, per-epoch metrics (step = epoch), test metrics, the
    pyfunc model and ``candidate.json``.
    """
    from training.dataset import measured_split_kind, test_set_sha256
    from training.detector_pyfunc import DetectorModel
    from training.tracking import configure_mlflow

    fields, ds = _fields(cfg, dataset_version)  # first: a missing dataset fails in a second
    configure_ultralytics(cfg.home)
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_id = configure_mlflow(cfg)
    classes = list(cfg.data.detector_classes)
    det = cfg.detector
    arch = Path(det.model).stem
    split_kind = measured_split_kind(fields)
    test_sha = test_set_sha256(fields)
    device = _device()
    model = _build_model(cfg)  # before the run: a bad model spec leaves no failed run behind
    run_tags = {"family": "detector", "architecture": arch, "dataset_version": str(ds.version),
                "manifest_sha256": ds.manifest_sha256, "split_kind": split_kind,
                "test_set_sha256": test_sha, **(tags or {})}
    try:
        run_ctx = mlflow.start_run(experiment_id=experiment_id, run_name=f"detector-{arch}",
                                   nested=parent_run_id is not None,
                                   parent_run_id=parent_run_id, tags=run_tags)
    except MlflowException as exc:
        raise RegistryError(
            f"cannot start the detector run (parent run {parent_run_id}): {exc}") from exc

    with run_ctx as run:
        run_id = run.info.run_id
        work = cfg.runs_dir / "detector" / run_id
        data_yaml = write_yolo_dataset(fields, work / "data", classes)
        counts = {f"n_{s}_fields": int((fields["split"] == s).sum()) for s in SPLITS}
        nbs = _nominal_batch(det.nbs, det.batch, counts["n_train_fields"])
        mlflow.log_params({**{f"detector.{k}": v for k, v in det.model_dump().items()},
                           **counts, "classes": ",".join(classes), "device": str(device),
                           "dataset_version": ds.version, "nbs_resolved": nbs})
        mlflow.set_tag("val_split", yaml.safe_load(data_yaml.read_text())["val"].split("/")[-1])
        mlflow.log_dict(cfg.dump(), "config.json")

        model.add_callback("on_fit_epoch_end", _epoch_logger(run_id))
        best, train_time = _train(model, cfg, data_yaml, work, nbs=nbs, device=device)
        metrics = _evaluate(best, data_yaml, imgsz=det.imgsz, batch=det.batch, device=device,
                            classes=classes, out_dir=work / "test")
        metrics["train_time_s"] = train_time
        mlflow.log_metrics(metrics)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=DetectorModel(imgsz=det.imgsz, classes=classes),
            artifacts={"weights": str(best)},
            metadata={"family": "detector", "architecture": arch, "classes": classes,
                      "imgsz": det.imgsz},
            pip_requirements=_pip_requirements(),
        )

        champion_version, champion_metrics = None, None
        champ = _champion(cfg, work / "champion")
        if champ is not None:
            champion_version, champ_dir, meta = champ
            champion_metrics = _evaluate(
                champ_dir / "artifacts" / "best.pt", data_yaml,
                imgsz=int(meta.get("imgsz") or det.imgsz), batch=det.batch, device=device,
                classes=classes, out_dir=work / "champion_test")
            mlflow.log_metrics({f"champion/{k}": v for k, v in champion_metrics.items()})
            mlflow.set_tag("champion_version", champion_version)

        candidate = Candidate(
            family="detector", architecture=arch, run_id=run_id,
            model_uri=f"runs:/{run_id}/model", metrics=metrics, split_kind=split_kind,
            test_set_sha256=test_sha, dataset_version=ds.version,
            champion_version=champion_version, champion_metrics=champion_metrics,
        )
        mlflow.log_dict(candidate.to_dict(), "candidate.json")
    return candidate


# ------------------------------------------------------------------------------ serving
def _read_model_dir(model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The weights path and MLmodel metadata of a logged detector (read as YAML: no MLflow)."""
    model_dir = Path(model_dir)
    weights, mlmodel = model_dir / "artifacts" / "best.pt", model_dir / "MLmodel"
    if not weights.is_file() or not mlmodel.is_file():
        raise RegistryError(f"{model_dir} is not a logged leukoflow detector: it needs MLmodel "
                            "and artifacts/best.pt")
    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    if meta.get("family") != "detector":
        raise RegistryError(f"{model_dir} holds a {meta.get('family')!r} model, not a detector")
    return weights, meta


def load_detector(model_dir: Path) -> tuple[object, dict]:
    """Load a logged detector for serving: the YOLO model and its metadata (classes, imgsz)."""
    weights, meta = _read_model_dir(model_dir)
    configure_ultralytics()
    from ultralytics import YOLO

    return YOLO(str(weights), task="detect"), meta


def detect(model: Any, image: Any, imgsz: int, conf: float = 0.25) -> list[dict]:
    """Boxes of one PIL image, in that image's pixel coordinates, best first."""
    image = image.convert("RGB")
    width, height = image.size
    result = model.predict(image, imgsz=imgsz, conf=conf, verbose=False)[0]
    names = result.names
    boxes = []
    for (x1, y1, x2, y2), c, p in zip(result.boxes.xyxy.tolist(), result.boxes.cls.tolist(),
                                      result.boxes.conf.tolist(), strict=True):
        boxes.append({
            "x1": round(min(max(x1, 0.0), width), 2), "y1": round(min(max(y1, 0.0), height), 2),
            "x2": round(min(max(x2, 0.0), width), 2), "y2": round(min(max(y2, 0.0), height), 2),
            "label": str(names[int(c)]), "confidence": round(float(p), 4),
        })
    return sorted(boxes, key=lambda b: -b["confidence"])


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m training.detector --out candidate.json``: train, judge, write the Candidate."""
    return run_candidate_entry(
        argv, prog="python -m training.detector", doc=__doc__,
        train=lambda cfg, args, tags: train_and_evaluate_detector(
            cfg, dataset_version=args.dataset_version, parent_run_id=args.parent_run_id,
            tags=tags),
    )


if __name__ == "__main__":
    sys.exit(main())
