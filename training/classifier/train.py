"""The cell classifier: a Keras architecture trained on curated cells, judged on the test split.

One front door per job:

* :func:`train_and_evaluate` - curated manifest (cells) -> tf.data pipeline through the shared
  preprocessing -> train (architecture from ``training.classifier.architectures``,
  hyperparameters of its paper unless the config says otherwise) -> evaluate the model AND
  the current champion on the same frozen test split -> one MLflow run (params, per-epoch
  metrics, test metrics, plots, the pyfunc model of ``training.classifier.pyfunc``) ->
  :class:`~training.records.Candidate`.
* inference (load, preprocess, predict) is :mod:`training.classifier.predict`, used here too.
* ``python -m training.classifier.train --architecture NAME --out candidate.json`` - the subprocess
  the retrain DAG runs, so TensorFlow never shares a process with torch.

TensorFlow/Keras are imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.classifier.predict import (
    apply_temperature,
    load_classifier,
    model_temperature,
    postprocess_probs,
    predict_array,
)
from training.config import Config
from training.entry import run_candidate_entry
from training.errors import ConfigError, DataValidationError, TrainingError
from training.families import get_family
from training.preprocess import PreprocessParams
from training.promotion.aliases import download_champion
from training.records import Candidate
from training.runs import candidate_run
from training.tracking import pinned_requirements

__all__ = ["main", "train_and_evaluate"]

log = logging.getLogger(__name__)

FAMILY = get_family("classifier")

SPLITS = ("train", "val", "test")
LATENCY_IMAGES = 32  # test images timed one by one for latency_ms_per_image
GRADCAM_IMAGES = 8  # test images shown in the run's gradcam/grid.png


# ------------------------------------------------------------------------------ data
def _cells(cfg: Config, dataset_version: int | None) -> tuple[pd.DataFrame, Any]:
    """The manifest's cell rows whose label is a configured class, with local file paths."""
    from training.data.dataset import load_manifest, materialize

    classes = list(cfg.data.classes)
    if len(classes) == 2 and cfg.data.positive_class not in (None, *classes):
        raise ConfigError(f"'data.positive_class' = {cfg.data.positive_class!r} is not one of "
                          f"data.classes {classes}")
    df, ds = load_manifest(cfg, dataset_version)
    cells = df[df["kind"] == "cell"]
    if cells.empty:
        raise DataValidationError(
            f"dataset version {ds.version} holds no cell images (kind=cell): ingest a cell batch "
            "(C-NMC, class folders, ...) first")
    other = cells.loc[~cells["label"].isin(classes), "label"].value_counts()
    if len(other):
        log.warning("ignoring %d cells whose label is not in data.classes %s: %s",
                    int(other.sum()), classes, other.to_dict())
    cells = cells[cells["label"].isin(classes)]
    for split in ("train", "test"):
        if not (cells["split"] == split).any():
            raise DataValidationError(
                f"dataset version {ds.version} has no {split} cells of classes {classes}")
    absent = sorted(set(classes) - set(cells.loc[cells["split"] == "train", "label"]))
    if absent:
        raise DataValidationError(f"the train split of dataset version {ds.version} has no "
                                  f"images of class(es) {absent}: a model cannot learn them")
    return materialize(cfg, cells, cfg.home / "cache").reset_index(drop=True), ds


# ------------------------------------------------------------------------------ training
def _epoch_logger(run_id: str) -> Any:
    """A Keras callback sending each epoch's losses, accuracies and lr to MLflow, step=epoch."""
    import keras
    import mlflow

    names = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss",
             "val_accuracy": "val_accuracy", "learning_rate": "lr"}

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            values = {names.get(k, k): float(v) for k, v in (logs or {}).items()}
            mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)},
                               step=epoch, run_id=run_id)

    return EpochLogger()


def _latency_ms(model: Any, paths: list[str], params: PreprocessParams) -> float:
    """Mean milliseconds per image, one image per call as serving does (after a warm-up)."""
    from training.classifier.inputs import load_uint8

    images = [load_uint8(p, params).astype(np.float32)[None] for p in paths[:LATENCY_IMAGES]]
    predict_array(model, images[0])
    start = time.perf_counter()
    for image in images:
        predict_array(model, image)
    return 1000.0 * (time.perf_counter() - start) / len(images)


def _probabilities(model: Any, paths: list[str], params: PreprocessParams,
                   batch_size: int) -> np.ndarray:
    if getattr(model, "kind", None) == "handcrafted":
        from training.classifier.baseline import predict_paths

        return np.asarray(predict_paths(model, paths, params), dtype=np.float64)
    from training.classifier.inputs import make_dataset

    n_classes = int(model.output_shape[-1])
    ds = make_dataset(paths, None, n_classes, params, batch_size=batch_size, cache=False)
    return postprocess_probs(model.predict(ds, verbose=0)).astype(np.float64)


def _metrics(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
             positive: str | None, who: str, n_bootstrap: int = 1000,
             groups: np.ndarray | None = None,
             row_ids: np.ndarray | None = None) -> dict[str, float]:
    """Test metrics; ``groups`` (subjects) make the intervals resample patients, not cells;
    ``row_ids`` (sha256) make them independent of the rows' order."""
    from training.evaluation.metrics import classification_metrics

    if not np.all(np.isfinite(y_prob)):
        raise TrainingError(f"{who} produced non-finite probabilities (did training diverge?)")
    return classification_metrics(y_true, y_prob, classes, positive, n_bootstrap=n_bootstrap,
                                  groups=groups, row_ids=row_ids)


def _val_metrics(y_prob: np.ndarray, y: np.ndarray, classes: list[str],
                 positive: str | None, who: str) -> dict[str, float]:
    """``val/*`` metrics: what architectures are chosen on (the test rows are for the gate)."""
    if len(y) == 0:
        return {}
    val = _metrics(y, y_prob, classes, positive, f"{who} (val)", n_bootstrap=0)
    return {f"val/{k}": v for k, v in val.items() if "__" not in k and "_ci_" not in k}


def _temperature(cfg: Config, raw_val: np.ndarray | None, y_val: np.ndarray) -> float:
    """The temperature fitted on the val rows (1.0 when scaling is off or there is no val)."""
    import mlflow

    from training.evaluation.calibration import fit_temperature

    on = cfg.classifier.temperature_scaling and raw_val is not None
    temperature = fit_temperature(y_val, raw_val) if on else 1.0
    mlflow.log_params({"temperature_scaling": cfg.classifier.temperature_scaling,
                       "temperature": temperature})
    return temperature


def _calibration(y_test: np.ndarray, raw_test: np.ndarray, raw_val: np.ndarray | None,
                 y_val: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE before and after temperature scaling, on test (and val, where T was fitted).

    ``ece`` itself (after scaling) comes with the test metrics; these are the comparison.
    """
    from training.evaluation.calibration import expected_calibration_error

    out = {"ece_uncalibrated": expected_calibration_error(y_test, raw_test),
           "temperature": float(temperature)}
    if raw_val is not None and len(y_val):
        out["val/ece_uncalibrated"] = expected_calibration_error(y_val, raw_val)
    return out


def _predictions_table(test: pd.DataFrame, y_prob: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per-image test predictions (for paired comparisons and error analysis)."""
    table = test[["sha256", "label", "subject_id"]].copy()
    for j, cls in enumerate(classes):
        table[f"p_{cls}"] = y_prob[:, j]
    table["predicted"] = [classes[i] for i in y_prob.argmax(axis=1)]
    return table


def _gradcam_rows(y: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` test rows, one class after the other in turn, so every class is shown."""
    by_class = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < n and any(by_class):
        for rows in by_class:
            if rows and len(picked) < n:
                picked.append(int(rows.pop(0)))
    return picked


def _log_gradcam(model: Any, test: pd.DataFrame, y: np.ndarray, classes: list[str],
                 params: PreprocessParams, layer: str, work: Path) -> None:
    """Grad-CAM of a few test images at the model's ``gradcam_layer`` -> ``gradcam/grid.png``.

    An explanation artifact must not sink a finished training run: a failure is logged as a
    warning and a ``gradcam_error`` tag instead.
    """
    import mlflow

    from training.classifier.gradcam import save_gradcam_grid
    from training.classifier.inputs import load_uint8

    rows = _gradcam_rows(y, GRADCAM_IMAGES)
    if not rows:
        return
    images = np.stack([load_uint8(test["path"].iloc[i], params).astype(np.float32)
                       for i in rows])
    try:
        path = save_gradcam_grid(model, images, y[rows], classes, work / "gradcam" / "grid.png",
                                 layer_name=layer or None)
    except Exception as exc:  # noqa: BLE001 - TF raises many kinds; the run itself succeeded
        log.warning("Grad-CAM grid failed at layer %r: %s", layer, exc)
        mlflow.set_tag("gradcam_error", f"{type(exc).__name__}: {exc}"[:5000])
        return
    mlflow.log_artifact(str(path), artifact_path="gradcam")


def _champion(cfg: Config, dest: Path) -> tuple[str, Path] | None:
    """The champion's version and local model dir; None when there is none yet."""
    return download_champion(cfg, FAMILY, dest)


def _evaluate_champion(
    cfg: Config, test: pd.DataFrame, y_true: np.ndarray, classes: list[str],
    positive: str | None, batch_size: int, work: Path,
) -> tuple[str | None, dict[str, float] | None, pd.DataFrame | None]:
    """The champion's metrics on OUR test rows, preprocessed with ITS OWN parameters."""
    from training.evaluation.metrics import row_ids, subject_groups

    champ = _champion(cfg, work / "champion")
    if champ is None:
        return None, None, None
    version, model_dir = champ
    model, meta = load_classifier(model_dir)
    champ_classes = [str(c) for c in meta["classes"]]
    if sorted(champ_classes) != sorted(classes):
        log.warning("champion v%s predicts %s, not data.classes %s: not comparable, skipped",
                    version, champ_classes, classes)
        return None, None, None
    params = PreprocessParams.from_dict(meta["preprocess"])
    y_prob = apply_temperature(_probabilities(model, list(test["path"]), params, batch_size),
                               model_temperature(meta))  # served as the champion serves it
    y_prob = y_prob[:, [champ_classes.index(c) for c in classes]]
    metrics = _metrics(y_true, y_prob, classes, positive, f"champion v{version}",
                       groups=subject_groups(test), row_ids=row_ids(test))
    return version, metrics, _predictions_table(test, y_prob, classes)


def _paired(cfg: Config, y_true: np.ndarray, y_prob: np.ndarray, champion: pd.DataFrame,
            classes: list[str], test: pd.DataFrame) -> dict[str, float]:
    """Candidate minus champion on the same test rows, with its paired bootstrap 95 % CI
    (resampling subjects whenever the rows have them): what the gate's paired test reads."""
    from training.evaluation.metrics import PAIRED_METRICS, paired_bootstrap_delta, subject_groups

    metric = FAMILY.gate_metric(cfg)
    if metric not in PAIRED_METRICS:
        return {}
    champ = champion[[f"p_{c}" for c in classes]].to_numpy().argmax(axis=1)
    out = paired_bootstrap_delta(metric, y_true, y_prob.argmax(axis=1), champ,
                                 groups=subject_groups(test))
    return {f"paired_{metric}_{k}": v for k, v in out.items()}


def _pip_requirements() -> list[str]:
    return pinned_requirements(
        ("mlflow", "tensorflow-cpu", "keras", "numpy", "pillow", "pyyaml", "pandas", "torchstain"))


def _flat_params(hp: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in hp.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = "null" if value is None else value
    return out


def _log_model(model: Any, work: Path, meta: dict[str, Any], params: PreprocessParams) -> Any:
    """Log the pyfunc model of the contract: ``artifacts/model.keras`` + metadata.

    The pyfunc takes raw images and preprocesses them itself (see
    :mod:`training.classifier.pyfunc`), so it declares no tensor signature. The hand-crafted
    kind logs ``artifacts/baseline.joblib`` instead (no TensorFlow needed to serve it).
    """
    import mlflow

    if meta.get("model_kind") == "handcrafted":
        from training.classifier.handcrafted import MODEL_FILE
        from training.classifier.pyfunc import HandcraftedClassifierModel

        path = model.save(work / MODEL_FILE)
        return mlflow.pyfunc.log_model(
            name="model", python_model=HandcraftedClassifierModel(
                classes=meta["classes"], preprocess=params.to_dict()),
            artifacts={"baseline": str(path)}, metadata=meta,
            pip_requirements=pinned_requirements(
                ("mlflow", "scikit-learn", "joblib", "numpy", "pillow", "pyyaml", "pandas",
                 "torchstain")))
    import keras

    from training.classifier.pyfunc import KerasClassifierModel

    keras_path = work / "model.keras"
    # A fresh functional view over the same layers is uncompiled: it saves the weights
    # without the optimizer's slots, which would triple the file for nothing at serving time.
    keras.Model(model.inputs, model.outputs, name=model.name).save(keras_path)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=KerasClassifierModel(classes=meta["classes"], preprocess=params.to_dict(),
                                          temperature=meta["temperature"]),
        artifacts={"keras_model": str(keras_path)}, metadata=meta,
        pip_requirements=_pip_requirements(),
    )
    keras_path.unlink()  # MLflow holds the copy; large heads weigh hundreds of MB
    return info


def _fit(model: Any, hp: dict[str, Any], part: dict[str, pd.DataFrame],
         y: dict[str, np.ndarray], params: PreprocessParams, work: Path, run_id: str) -> int:
    """Train on ``train`` (validating on ``val`` each epoch), then re-estimate BatchNorm.

    Returns how many batches re-estimated the BatchNorm statistics (0: no BatchNorm).
    """
    import keras
    import tensorflow as tf

    from training.classifier.batchnorm import recalibrate_batchnorm
    from training.classifier.inputs import (
        augmentation_model,
        balanced_class_weights,
        colour_jitter,
        lr_schedule,
        make_dataset,
        subject_balanced_weights,
    )

    seed, batch_size = int(hp["seed"]), int(hp["batch_size"])
    n_classes = int(model.output_shape[-1])
    train_paths = list(part["train"]["path"])
    weights = (subject_balanced_weights(y["train"], list(part["train"]["subject_id"]),
                                        n_classes, balance_classes=bool(hp["class_weights"]))
               if hp.get("balance_subjects") else None)
    train_ds = make_dataset(
        train_paths, y["train"], n_classes, params, batch_size=batch_size, training=True,
        seed=seed, augment=augmentation_model(hp["augmentation"], seed),
        colour=colour_jitter(hp["augmentation"], seed), weights=weights,
        cache_file=str(work / "train.cache"))
    val_ds = (make_dataset(list(part["val"]["path"]), y["val"], n_classes, params,
                           batch_size=batch_size, cache_file=str(work / "val.cache"))
              if len(part["val"]) else None)
    class_weight = (balanced_class_weights(y["train"], n_classes)
                    if hp["class_weights"] and weights is None else None)  # else in weights
    try:
        model.fit(train_ds, validation_data=val_ds, epochs=int(hp["epochs"]),
                  class_weight=class_weight, shuffle=False, verbose=2, callbacks=[
                      keras.callbacks.LearningRateScheduler(lr_schedule(hp)),
                      _epoch_logger(run_id)])
        plain = make_dataset(train_paths, None, n_classes, params, batch_size=batch_size,
                             cache=False)  # un-augmented: the statistics inference will see
        return recalibrate_batchnorm(model, plain)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise TrainingError(f"training {hp['architecture']} failed: {exc}") from exc
    finally:
        for stale in work.glob("*.cache*"):  # file caches exist only for huge datasets
            stale.unlink()


def _fit_handcrafted(
    hp: dict[str, Any], part: dict[str, pd.DataFrame], y: dict[str, np.ndarray], n_classes: int,
) -> tuple[Any, PreprocessParams, float, int]:
    """The hand-crafted baseline as the candidate: model, preprocessing, fit time, and its
    number of fitted coefficients (linear models; 0 when the estimator has none)."""
    from training.classifier.baseline import fit_handcrafted

    model, params, fit_time = fit_handcrafted(hp, part["train"], y["train"], n_classes)
    final = model.estimator.steps[-1][1] if hasattr(model.estimator, "steps") else model.estimator
    n_params = sum(int(np.size(getattr(final, a))) for a in ("coef_", "intercept_")
                   if hasattr(final, a))
    return model, params, fit_time, n_params


def _fit_keras(hp: dict[str, Any], part: dict[str, pd.DataFrame], y: dict[str, np.ndarray],
               n_classes: int, run: Any) -> tuple[Any, PreprocessParams, float, int, int]:
    """Build and train the Keras architecture: model, preprocessing, time, param counts."""
    import keras
    import mlflow

    from training.classifier.architectures import build_model, count_params
    from training.classifier.inputs import fit_preprocess

    keras.utils.set_random_seed(int(hp["seed"]))
    params = fit_preprocess(hp, list(part["train"]["path"]))
    model = build_model(hp["architecture"], n_classes, hp)
    total, trainable = count_params(model)
    log.info("training %s (%d params, %d trainable) on %s", hp["architecture"], total,
             trainable, {s: len(part[s]) for s in SPLITS})
    start = time.perf_counter()
    bn_batches = _fit(model, hp, part, y, params, run.work, run.run_id)
    train_time = time.perf_counter() - start
    mlflow.log_param("bn_recalibration_batches", bn_batches)
    return model, params, train_time, total, trainable


def train_and_evaluate(
    cfg: Config,
    architecture: str,
    *,
    dataset_version: int | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Candidate:
    """Train ``architecture`` on the curated cells and judge it and the champion on test.

    Everything goes to one MLflow run (see :mod:`training.runs`; nested under
    ``parent_run_id`` if given): resolved hyperparameters, ``config.json``, per-epoch metrics
    (step = epoch), test metrics with bootstrap CIs, plots, per-image predictions, the pyfunc
    model and ``candidate.json``. A Keras candidate's run also holds the hand-crafted
    baseline fitted and scored on the same rows (``baseline/*``, ``classifier.baseline``);
    the ``handcrafted_baseline`` architecture is that baseline as a candidate of its own.
    """
    from training.classifier.architectures import get_spec, resolve_hparams
    from training.classifier.baseline import baseline_hparams, baseline_metrics
    from training.evaluation.metrics import (
        row_ids,
        save_classification_plots,
        subject_groups,
        subjects_per_class,
    )

    spec = get_spec(architecture)
    # a bad name/value fails before any heavy work
    hp = baseline_hparams(cfg) if spec.kind == "handcrafted" else resolve_hparams(cfg,
                                                                                  architecture)
    cells, ds = _cells(cfg, dataset_version)
    import mlflow

    classes = list(cfg.data.classes)
    positive = cfg.data.positive_class if len(classes) == 2 else None
    index = {c: i for i, c in enumerate(classes)}
    part = {s: cells[cells["split"] == s].reset_index(drop=True) for s in SPLITS}
    y = {s: part[s]["label"].map(index).to_numpy(dtype=np.int64) for s in SPLITS}
    counts = {f"n_{s}": len(part[s]) for s in SPLITS}
    with candidate_run(cfg, FAMILY, architecture, ds, cells,
                       params={**_flat_params(hp), **counts, "classes": ",".join(classes)},
                       parent_run_id=parent_run_id, tags=tags,
                       extra_tags={"paper": spec.paper}) as run:
        if spec.kind == "handcrafted":
            model, params, train_time, n_params = _fit_handcrafted(hp, part, y, len(classes))
            total = trainable = n_params
        else:
            model, params, train_time, total, trainable = _fit_keras(hp, part, y,
                                                                     len(classes), run)
        batch_size = int(hp["batch_size"])
        test_paths = list(part["test"]["path"])
        raw_val = _probabilities(model, list(part["val"]["path"]), params,
                                 batch_size) if len(part["val"]) else None
        temperature = _temperature(cfg, raw_val, y["val"])
        raw_test = _probabilities(model, test_paths, params, batch_size)
        y_prob = apply_temperature(raw_test, temperature).astype(np.float64)
        metrics = _metrics(y["test"], y_prob, classes, positive, architecture,
                           groups=subject_groups(part["test"]), row_ids=row_ids(part["test"]))
        metrics.update(_calibration(y["test"], raw_test, raw_val, y["val"], temperature))
        metrics.update(subjects_per_class(cells, classes))  # what every figure rests on
        if raw_val is not None:
            metrics.update(_val_metrics(apply_temperature(raw_val, temperature), y["val"],
                                        classes, positive, architecture))
        metrics.update(total_params=float(total), trainable_params=float(trainable),
                       train_time_s=train_time,
                       latency_ms_per_image=_latency_ms(model, test_paths, params))
        if spec.kind != "handcrafted" and cfg.classifier.baseline:
            metrics.update(baseline_metrics(cfg, part, y, classes, positive))
        for path in save_classification_plots(
                y["test"], y_prob, classes, run.work / "plots", title=architecture,
                uncalibrated=raw_test if temperature != 1.0 else None, temperature=temperature):
            mlflow.log_artifact(str(path), artifact_path="plots")
        predictions = _predictions_table(part["test"], y_prob, classes)
        mlflow.log_text(predictions.to_csv(index=False), "predictions/test.csv")

        meta = {"family": FAMILY.name, "architecture": architecture, "classes": classes,
                "preprocess": params.to_dict(), "positive_class": positive,
                "gradcam_layer": spec.gradcam_layer, "split_kind": run.split_kind,
                "model_kind": spec.kind, "temperature": temperature}
        if spec.kind == "keras":
            _log_gradcam(model, part["test"], y["test"], classes, params,
                         meta["gradcam_layer"], run.work)
        logged = _log_model(model, run.work, meta, params)
        del model

        champion = _evaluate_champion(cfg, part["test"], y["test"], classes, positive,
                                      batch_size, run.work)
        run.record_champion(*champion)
        if champion[2] is not None:
            metrics.update(_paired(cfg, y["test"], y_prob, champion[2], classes, part["test"]))
        return run.finish(metrics, logged)


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m training.classifier.train --architecture NAME --out candidate.json``."""
    return run_candidate_entry(
        argv, prog=f"python -m {FAMILY.train_module}", doc=__doc__, architecture=True,
        train=lambda cfg, args, tags: train_and_evaluate(
            cfg, args.architecture or cfg.classifier.architectures[0],
            dataset_version=args.dataset_version, parent_run_id=args.parent_run_id, tags=tags),
    )


if __name__ == "__main__":
    sys.exit(main())
