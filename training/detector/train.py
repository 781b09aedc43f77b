"""The cell detector's training: Ultralytics YOLO on curated smear fields, judged on test.

* :func:`train_and_evaluate_detector` - curated manifest -> YOLO dataset
  (:mod:`training.detector.yolo_data`) -> train -> evaluate the best weights AND the current
  champion on the same frozen test split -> one MLflow run (:mod:`training.runs`) with params,
  per-epoch metrics and the model (pyfunc, :mod:`training.detector.pyfunc`) ->
  :class:`~training.records.Candidate`.
* ``python -m training.detector.train --architecture NAME --out candidate.json`` - the
  subprocess the retrain DAG runs once per architecture (:mod:`training.detector.architectures`),
  so torch never shares a process with TensorFlow.

Inference (offline Ultralytics set-up, load, detect) is :mod:`training.detector.predict`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from training.config import Config
from training.detector.architectures import DetectorSpec, get_spec
from training.detector.predict import configure_ultralytics, read_model_dir
from training.detector.yolo_data import SPLITS, write_yolo_dataset
from training.entry import run_candidate_entry
from training.errors import ConfigError, DataValidationError, TrainingError
from training.evaluation.detection import (
    DETECTION_METRICS,
    ImageMatches,
    detection_intervals,
    paired_detection_delta,
)
from training.families import get_family
from training.promotion.aliases import download_champion
from training.records import Candidate
from training.runs import candidate_run
from training.tracking import pinned_requirements

__all__ = ["evaluate_weights", "main", "train_and_evaluate_detector"]

log = logging.getLogger(__name__)

FAMILY = get_family("detector")
LATENCY_IMAGES = 32  # test images timed for latency_ms_per_image (after one warm-up call)
# Ultralytics' AMP self-check loads this file and downloads it when missing (online only).
_AMP_CHECK_WEIGHTS = "yolo26n.pt"


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


def _epoch_logger(run_id: str, best_val: dict[str, float]) -> Callable[[Any], None]:
    """An ``on_fit_epoch_end`` callback: losses, val metrics and lr to MLflow, step = epoch.

    Ultralytics fires the same event once more after the loop, for its final validation of
    ``best.pt``; those numbers go to ``best_val/*`` (no step) instead of a fake extra epoch,
    and into ``best_val`` (what candidates are ranked on).
    """
    state = {"stopped": False}

    def on_fit_epoch_end(trainer: Any) -> None:
        import mlflow

        if state["stopped"]:  # the event after the last epoch: final validation of best.pt
            best = {_metric_name(k).replace("val/", "best_val/", 1): float(v)
                    for k, v in trainer.metrics.items()}
            best = {k: v for k, v in best.items() if math.isfinite(v)}
            mlflow.log_metrics(best, run_id=run_id)
            best_val.update(best)
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


def _build_model(cfg: Config, spec: DetectorSpec) -> Any:
    """A YOLO from the architecture's model yaml (random init), plus optional local weights."""
    from ultralytics import YOLO

    try:
        model = YOLO(spec.model_yaml, task="detect")
    except (FileNotFoundError, KeyError) as exc:
        raise ConfigError(f"detector architecture {spec.name!r}: {spec.model_yaml} is not a "
                          f"model yaml this Ultralytics knows: {exc}") from exc
    if cfg.detector.weights:
        if not Path(cfg.detector.weights).is_file():
            raise ConfigError(f"detector.weights = {cfg.detector.weights!r} is not a local file; "
                              "offline, weights cannot be downloaded: give a path or null")
        model.load(cfg.detector.weights)
    return model


def _train(
    model: Any, cfg: Config, data_yaml: Path, work: Path, *, nbs: int, device: int | str,
    arch: str,
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
        raise TrainingError(f"YOLO training of {arch} failed: {exc}") from exc
    train_time = time.perf_counter() - start
    for weights in (model.trainer.best, model.trainer.last):
        if Path(weights).is_file():
            return Path(weights), train_time
    raise TrainingError(f"YOLO training of {arch} wrote no weights under {work}")


def _label_classes(labels_dir: Path) -> set[int]:
    """Class ids that occur in a split's label files (per-class metrics exist only for them)."""
    found: set[int] = set()
    for path in labels_dir.glob("*.txt"):
        found.update(int(ln.split()[0]) for ln in path.read_text().splitlines() if ln.strip())
    return found


def evaluate_weights(
    weights: Path, data_yaml: Path, *, imgsz: int, batch: int, device: int | str,
    classes: list[str], out_dir: Path, n_bootstrap: int = 1000,
) -> tuple[dict[str, float], list[ImageMatches]]:
    """Test-split metrics of one weights file: P, R, mAP50, mAP50-95 (overall and per class,
    with bootstrap CIs over images, ``n_bootstrap`` resamples), latency per image and
    parameter count, and the per-image matches (for the paired test), in file-name order.
    Every number is measured here; ``leukoflow evaluate`` scores a detector with it too."""
    from PIL import Image
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    names = {int(k): str(v) for k, v in model.names.items()}
    if [names[i] for i in sorted(names)] != list(classes):
        raise TrainingError(f"model {weights} detects {list(names.values())} but the dataset's "
                            f"classes are {classes}: the two cannot be compared")
    callbacks, judged = _validation_matches(model)
    for event, callback in callbacks.items():
        model.add_callback(event, callback)
    res = model.val(data=str(data_yaml), split="test", imgsz=imgsz, batch=batch, device=device,
                    plots=False, project=str(out_dir.parent), name=out_dir.name, exist_ok=True,
                    verbose=False, workers=0)
    matches = [judged[name] for name in sorted(judged)]  # by file name: aligned across models
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

    intervals = detection_intervals(matches, n=n_bootstrap)
    metrics.update({k: v for k, v in intervals.items() if math.isfinite(v)})

    images = sorted((root / "images" / "test").iterdir())[:LATENCY_IMAGES]
    pil = [Image.open(p).convert("RGB") for p in images]
    model.predict(pil[0], imgsz=imgsz, device=device, verbose=False)  # warm-up
    start = time.perf_counter()
    for im in pil:
        model.predict(im, imgsz=imgsz, device=device, verbose=False)
    metrics["latency_ms_per_image"] = 1000.0 * (time.perf_counter() - start) / len(pil)
    metrics["total_params"] = float(sum(p.numel() for p in model.model.parameters()))
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(f"evaluation of {weights} gave non-finite metrics: {bad}")
    return metrics, matches


def _validation_matches(model: Any) -> tuple[dict[str, Callable[[Any], None]],
                                              dict[str, ImageMatches]]:
    """Callbacks that keep Ultralytics' own per-image judgement (true positives at IoU
    0.50:0.95, confidences, classes) by image file name, so the bootstrap over images resamples
    exactly what the reported metrics were computed from. The validator's stats grow by one
    entry per image in its loader's order and are emptied before ``on_val_end``."""
    from training.evaluation.detection import from_matched

    kept: list[dict[str, Any]] = []
    found: dict[str, ImageMatches] = {}

    def on_val_batch_end(validator: Any) -> None:
        stats = validator.metrics.stats
        for i in range(len(kept), len(stats["tp"])):
            kept.append({k: stats[k][i] for k in ("tp", "conf", "pred_cls", "target_cls")})

    def on_val_end(validator: Any) -> None:
        files = list(validator.dataloader.dataset.im_files)
        if len(files) != len(kept):
            raise TrainingError(f"validation judged {len(kept)} images of {len(files)}")
        for path, st in zip(files, kept, strict=True):
            found[Path(path).name] = from_matched(st["tp"], st["conf"], st["pred_cls"],
                                                  st["target_cls"])

    return {"on_val_batch_end": on_val_batch_end, "on_val_end": on_val_end}, found


def _paired(cfg: Config, matches: list[ImageMatches],
            champion: list[ImageMatches]) -> dict[str, float]:
    """Candidate minus champion on the same test images, with its paired bootstrap 95 % CI
    over images: what the gate's paired test reads (``paired_<metric>_*``)."""
    metric = FAMILY.gate_metric(cfg)
    if metric not in DETECTION_METRICS or len(matches) != len(champion):
        return {}
    out = paired_detection_delta(metric, matches, champion)
    return {f"paired_{metric}_{k}": v for k, v in out.items() if math.isfinite(v)}


def _champion(cfg: Config, dest: Path) -> tuple[str, Path, dict[str, Any]] | None:
    """The champion's version, local model dir and metadata; None when there is none yet."""
    found = download_champion(cfg, FAMILY, dest)
    if found is None:
        return None
    version, local = found
    _, meta = read_model_dir(local)
    return version, local, meta


def _pip_requirements() -> list[str]:
    return pinned_requirements(
        ("mlflow", "ultralytics", "torch", "torchvision", "pillow", "numpy", "pandas"))


def _fields(cfg: Config, dataset_version: int | None) -> tuple[pd.DataFrame, Any]:
    from training.data.dataset import load_manifest, materialize

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
    architecture: str | None = None,
    dataset_version: int | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Candidate:
    """Train one YOLO architecture on the curated fields and judge it and the champion on test.

    ``architecture``: a name of :data:`training.detector.architectures.ARCHITECTURES` (default:
    the first of ``detector.architectures``). Everything goes to one MLflow run (see
    :mod:`training.runs`; nested under ``parent_run_id`` if given): resolved detector params,
    ``config.json``, per-epoch metrics (step = epoch), the final validation of the best
    weights (``val/*`` of the candidate: what the retrain DAG ranks architectures on), test
    metrics with bootstrap CIs, the paired difference with the champion, the pyfunc model and
    ``candidate.json``.
    """
    from training.detector.pyfunc import DetectorModel

    spec = get_spec(architecture or cfg.detector.architectures[0])
    fields, ds = _fields(cfg, dataset_version)  # first: a missing dataset fails in a second
    configure_ultralytics(cfg.home)
    import mlflow

    classes = list(cfg.data.detector_classes)
    det = cfg.detector
    arch = spec.name
    device = _device()
    model = _build_model(cfg, spec)  # before the run: a bad model spec leaves no failed run
    counts = {f"n_{s}_fields": int((fields["split"] == s).sum()) for s in SPLITS}
    nbs = _nominal_batch(det.nbs, det.batch, counts["n_train_fields"])
    params = {**{f"detector.{k}": v for k, v in det.model_dump().items()}, **counts,
              "classes": ",".join(classes), "device": str(device), "nbs_resolved": nbs,
              "architecture": arch, "model_yaml": spec.model_yaml}
    with candidate_run(cfg, FAMILY, arch, ds, fields, params=params,
                       parent_run_id=parent_run_id, tags=tags,
                       extra_tags={"yolo_family": spec.family, "paper": spec.paper}) as run:
        data_yaml = write_yolo_dataset(fields, run.work / "data", classes)
        val_split = yaml.safe_load(data_yaml.read_text())["val"].split("/")[-1]
        mlflow.set_tag("val_split", val_split)

        best_val: dict[str, float] = {}
        model.add_callback("on_fit_epoch_end", _epoch_logger(run.run_id, best_val))
        trained: dict[str, float] = {}  # what the optimizer updates (Ultralytics freezes some)
        model.add_callback("on_train_start", lambda trainer: trained.update(
            trainable_params=float(sum(p.numel() for p in trainer.model.parameters()
                                       if p.requires_grad))))
        best, train_time = _train(model, cfg, data_yaml, run.work, nbs=nbs, device=device,
                                  arch=arch)
        metrics, matches = evaluate_weights(best, data_yaml, imgsz=det.imgsz, batch=det.batch,
                                     device=device, classes=classes, out_dir=run.work / "test")
        metrics.update(train_time_s=train_time, **trained)
        if val_split == "val":  # validated on train: no validation metrics to rank on
            metrics.update({k.replace("best_val/", "val/", 1): v for k, v in best_val.items()
                            if k.replace("best_val/", "", 1) in DETECTION_METRICS})
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=DetectorModel(imgsz=det.imgsz, classes=classes),
            artifacts={"weights": str(best)},
            metadata={"family": FAMILY.name, "architecture": arch, "classes": classes,
                      "imgsz": det.imgsz, "split_kind": run.split_kind},
            pip_requirements=_pip_requirements(),
        )

        champ = _champion(cfg, run.work / "champion")
        if champ is not None:
            champion_version, champ_dir, meta = champ
            champ_metrics, champ_matches = evaluate_weights(
                champ_dir / "artifacts" / "best.pt", data_yaml,
                imgsz=int(meta.get("imgsz") or det.imgsz), batch=det.batch, device=device,
                classes=classes, out_dir=run.work / "champion_test")
            run.record_champion(champion_version, champ_metrics)
            metrics.update(_paired(cfg, matches, champ_matches))
        return run.finish(metrics, logged)


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m training.detector.train [--architecture yolov5nu] --out candidate.json``:
    train, judge, write it."""
    return run_candidate_entry(
        argv, prog=f"python -m {FAMILY.train_module}", doc=__doc__, architecture=True,
        train=lambda cfg, args, tags: train_and_evaluate_detector(
            cfg, architecture=args.architecture, dataset_version=args.dataset_version,
            parent_run_id=args.parent_run_id, tags=tags),
    )


if __name__ == "__main__":
    sys.exit(main())
