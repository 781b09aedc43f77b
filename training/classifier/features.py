"""Deep features of a real backbone -> the classical-classifier sweep (Narendra & Negi, Khan).

The feature extractor is, in order of preference:

1. the backbone of a trained leukoflow classifier (``model_dir``: a logged MLflow model dir,
   or a ``runs:/`` / ``models:/`` URI on the CLI), cut at its pooled feature layer;
2. the architecture built with ``cfg.classifier.weights`` (``"imagenet"``, the papers' setting,
   or a local weights file) when those weights can be loaded;
3. otherwise (offline, no trained model given) the architecture trained briefly on this very
   dataset through the existing harness
   (:func:`training.classifier.train.train_and_evaluate`), which
   the output says (``feature_source``): such features have seen the train split.

Every image goes through the one preprocessing function (``training.classifier.inputs``), then
:func:`training.classifier.classical.sweep` scores each classifier on the held-out test split,
and :func:`grouped_cv` runs ``training.classifier.classical.grouped_kfold`` with groups =
``split_group``
(subjects where they exist, k = 10 as in Khan's thesis). Results go to one MLflow run.

XIncept-ALL's XGBoost variant is :func:`xincept_xgboost`: the ``xincept_all`` model's fused
(concatenated InceptionV3 + Xception) feature layer with ``names=["xgboost"]``.

TensorFlow is imported only inside the extraction functions: this module imports without it,
and ``python -m training.classifier.features`` is the subprocess entry for processes that hold
torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config, load_config
from training.data.dataset import measured_split_kind
from training.entry import child_process_setup
from training.errors import ConfigError, DataValidationError, LeukoflowError, TrainingError

__all__ = [
    "BRIEF_EPOCHS", "DeepFeatures", "cv_features", "deep_feature_sweep", "default_feature_layer",
    "extract_deep_features", "grouped_cv", "log_feature_results", "main", "measured_split_kind",
    "sweep_features", "sweep_markdown", "xincept_xgboost",
]

log = logging.getLogger(__name__)

BRIEF_EPOCHS = 3  # epochs of the fallback training when the config leaves epochs null
FEATURE_BATCH = 64  # images per forward pass while extracting
_FEATURE_LAYERS = {"xincept_all": "fused_features", "resnet50_custom_head": "conv5_block3_out"}


def default_feature_layer(architecture: str) -> str:
    """The pooled backbone output of an architecture (what the papers feed their classifiers).

    GAP-head models: ``head_gap`` (2048-d for ResNet50); XIncept-ALL: the fused concat;
    the custom-head ResNet50: ``conv5_block3_out``, global-average-pooled to 2048-d.
    """
    return _FEATURE_LAYERS.get(architecture, "head_gap")


@dataclass
class DeepFeatures:
    """Feature vectors of every labelled cell of one dataset version, with their rows."""

    X: np.ndarray  # (n, d) float32
    rows: pd.DataFrame  # sha256, label, subject_id, split, split_group (aligned with X)
    classes: list[str]
    positive_class: str | None
    architecture: str
    feature_layer: str
    feature_source: str  # where the backbone's weights came from, in words
    backbone_saw_train: bool  # True when the backbone was trained on this dataset's train split
    dataset_version: int = 0
    test_set_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return self.rows["label"].map(index).to_numpy(dtype=np.int64)

    @property
    def split_kind(self) -> str:
        return measured_split_kind(self.rows)

    def part(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.rows["split"].isin(splits).to_numpy()
        return self.X[mask], self.y[mask]


# ------------------------------------------------------------------------------ pure part
def sweep_features(feats: DeepFeatures, names: Sequence[str] | None = None, *,
                   n_bootstrap: int = 1000) -> pd.DataFrame:
    """Fit each classifier on the train features, score it on the test features.

    Columns of :func:`training.classifier.classical.sweep` plus what the row was measured on
    (backbone, layer, feature source, split kind, n_train, n_test).
    """
    from training.classifier.classical import sweep

    X_train, y_train = feats.part("train")
    X_test, y_test = feats.part("test")
    if len(X_train) == 0 or len(X_test) == 0:
        raise DataValidationError("the sweep needs train and test rows; the manifest has "
                                  f"{len(X_train)} train and {len(X_test)} test cells")
    from training.evaluation.metrics import subject_groups

    test_rows = feats.rows[feats.rows["split"] == "test"]
    table = sweep(X_train, y_train, X_test, y_test, feats.classes, names,
                  positive_class=feats.positive_class, n_bootstrap=n_bootstrap,
                  groups=subject_groups(test_rows))
    return _describe(table, feats, n_train=len(X_train), n_test=len(X_test))


def _describe(table: pd.DataFrame, feats: DeepFeatures, **extra: Any) -> pd.DataFrame:
    table = table.copy()
    for key, value in {"backbone": feats.architecture, "feature_layer": feats.feature_layer,
                       "feature_dim": int(feats.X.shape[1]), "feature_source": feats.feature_source,
                       "split_kind": feats.split_kind, **extra}.items():
        table[key] = value
    return table


def cv_features(feats: DeepFeatures, names: Sequence[str] | None = None, k: int = 10,
                rows: str | Sequence[str] = "auto") -> pd.DataFrame:
    """Grouped k-fold CV on the features; groups = ``split_group`` (subjects where they exist).

    ``rows="auto"`` uses every split for an independent backbone (ImageNet: the thesis'
    setting), but only val + test when the backbone was trained on this dataset's train
    split: its features of training images would flatter every fold. ``k`` shrinks to the
    number of groups when there are fewer (``k_used`` says so).
    """
    from training.classifier.classical import grouped_folds, grouped_kfold

    if rows == "auto":
        splits = ("val", "test") if feats.backbone_saw_train else ("train", "val", "test")
    else:
        splits = (rows,) if isinstance(rows, str) else tuple(rows)
    mask = feats.rows["split"].isin(splits).to_numpy()
    X, y = feats.X[mask], feats.y[mask]
    groups = feats.rows.loc[mask, "split_group"].astype(str).to_numpy()
    n_groups = len(np.unique(groups))
    n_classes = len(np.unique(y))
    if n_groups < 2 or n_classes < 2:
        raise DataValidationError(f"grouped CV on {'+'.join(splits)} needs 2+ groups and 2+ "
                                  f"classes; found {n_groups} group(s), {n_classes} class(es)")
    k_used = min(int(k), n_groups)
    if k_used < k:
        log.warning("grouped CV: only %d groups in %s, so %d folds instead of %d", n_groups,
                    "+".join(splits), k_used, k)
    single = [i for i, (train, _) in enumerate(grouped_folds(y, groups, k_used))
              if len(np.unique(y[train])) < 2]
    if single:
        raise DataValidationError(
            f"grouped CV on {'+'.join(splits)}: with {n_groups} groups, the training part of "
            f"fold(s) {single} holds a single class (too few subjects per class)")
    table = grouped_kfold(X, y, groups, feats.classes, names, k_used,
                          positive_class=feats.positive_class)
    cv_kind = "subject" if all(g.startswith("subject:") for g in groups) else "image"
    return _describe(table, feats, k_requested=int(k), k_used=k_used, cv_rows="+".join(splits),
                     n_rows=int(mask.sum()), n_groups=n_groups, cv_kind=cv_kind)


def sweep_markdown(table: pd.DataFrame) -> str:
    """The sweep as a markdown table: metric [95 % CI] per classifier, fit time, n test."""
    def cell(row: Any, key: str) -> str:
        value = row.get(key, math.nan)
        if value is None or not math.isfinite(float(value)):
            return "-"
        low, high = row.get(f"{key}_ci_low", math.nan), row.get(f"{key}_ci_high", math.nan)
        ci = f" [{low:.3f}, {high:.3f}]" if math.isfinite(float(low)) else ""
        return f"{float(value):.3f}{ci}"

    head = ["Classifier", "Accuracy [95% CI]", "Balanced acc.", "ROC AUC", "F1 macro",
            "Fit (s)", "Split", "n test"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join([
            str(row["classifier"]), cell(row, "accuracy"), cell(row, "balanced_accuracy"),
            cell(row, "roc_auc"), cell(row, "f1_macro"), f"{row['fit_time_s']:.2f}",
            str(row.get("split_kind", "?")), str(row.get("n_test", "?"))]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ MLflow
def log_feature_results(cfg: Config, feats: DeepFeatures, *, sweep: pd.DataFrame | None = None,
                        cv: pd.DataFrame | None = None, parent_run_id: str | None = None,
                        cv_note: str = "") -> str:
    """One MLflow run (nested under ``parent_run_id``): params, per-classifier metrics and
    the tables as artifacts (``features/sweep.csv|md``, ``features/grouped_cv.csv``)."""
    import mlflow

    from training.tracking import configure_mlflow

    experiment_id = configure_mlflow(cfg)
    tags = {"family": "classical", "leukoflow_role": "feature_sweep",
            "architecture": feats.architecture, "feature_layer": feats.feature_layer,
            "feature_source": feats.feature_source[:5000], "split_kind": feats.split_kind,
            "dataset_version": str(feats.dataset_version),
            "test_set_sha256": feats.test_set_sha256}
    with mlflow.start_run(experiment_id=experiment_id,
                          run_name=f"features-{feats.architecture}-{feats.feature_layer}",
                          nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags=tags) as run:
        counts = feats.rows["split"].value_counts()
        mlflow.log_params({"architecture": feats.architecture,
                           "feature_layer": feats.feature_layer,
                           "feature_dim": int(feats.X.shape[1]),
                           "backbone_saw_train": feats.backbone_saw_train,
                           **{f"n_{s}": int(counts.get(s, 0)) for s in ("train", "val", "test")},
                           **{k: str(v)[:500] for k, v in feats.extra.items()}})
        metrics: dict[str, float] = {}
        if sweep is not None:
            mlflow.log_param("classifiers", ",".join(sweep["classifier"]))
            metrics.update(_metric_dict(sweep, "", skip=("n_train", "n_test", "feature_dim")))
            mlflow.log_text(sweep.to_csv(index=False), "features/sweep.csv")
            mlflow.log_text(sweep_markdown(sweep), "features/sweep.md")
        if cv is not None:
            mlflow.log_params({"cv_k": int(cv["k_used"].iloc[0]), "cv_rows": cv["cv_rows"].iloc[0],
                               "cv_kind": cv["cv_kind"].iloc[0]})
            metrics.update(_metric_dict(cv, "cv/", skip=("k_requested", "k_used", "n_rows",
                                                         "n_groups", "feature_dim", "n_folds")))
            mlflow.log_text(cv.to_csv(index=False), "features/grouped_cv.csv")
        if cv_note:
            mlflow.set_tag("cv_note", cv_note[:5000])
        mlflow.log_metrics(metrics)
        return run.info.run_id


def _metric_dict(table: pd.DataFrame, prefix: str, skip: Sequence[str]) -> dict[str, float]:
    out = {}
    for _, row in table.iterrows():
        for key, value in row.items():
            if key in skip or isinstance(value, str) or isinstance(value, bool):
                continue
            if value is not None and math.isfinite(float(value)):
                out[f"{prefix}{row['classifier']}/{key}"] = float(value)
    return out


# ------------------------------------------------------------------------------ extraction
def _labelled_cells(cfg: Config, dataset_version: int | None) -> tuple[pd.DataFrame, Any]:
    from training.data.dataset import load_manifest, materialize

    df, ds = load_manifest(cfg, dataset_version)
    classes = list(cfg.data.classes)
    cells = df[(df["kind"] == "cell") & df["label"].isin(classes)]
    for split in ("train", "test"):
        if not (cells["split"] == split).any():
            raise DataValidationError(
                f"dataset version {ds.version} has no {split} cells of classes {classes}")
    return materialize(cfg, cells, cfg.home / "cache").reset_index(drop=True), ds


def _feature_model(model: Any, layer: str) -> Any:
    import difflib

    import keras

    names = [x.name for x in model.layers]
    if layer not in names:
        near = difflib.get_close_matches(layer, names, n=3)
        raise ConfigError(f"model {model.name!r} has no layer {layer!r}"
                          + (f"; did you mean {near}?" if near else ""))
    return keras.Model(model.inputs, model.get_layer(layer).output, name=f"features_{layer}")


def _fallback_train(cfg: Config, architecture: str, dataset_version: int | None,
                    parent_run_id: str | None, why: str, dest: Path) -> tuple[Path, str]:
    """Train ``architecture`` briefly with the harness; returns (model dir, source text)."""
    import mlflow

    from training.classifier.train import train_and_evaluate

    brief = cfg.model_copy(deep=True)
    if brief.classifier.epochs is None:
        brief.classifier.epochs = BRIEF_EPOCHS
    log.warning("%s: training %s for %d epoch(s) first to get a feature extractor", why,
                architecture, brief.classifier.epochs)
    cand = train_and_evaluate(brief, architecture, dataset_version=dataset_version,
                              parent_run_id=parent_run_id,
                              tags={"leukoflow_role": "feature_extractor"})
    local = mlflow.artifacts.download_artifacts(artifact_uri=cand.model_uri, dst_path=str(dest))
    source = (f"{architecture} trained here for {brief.classifier.epochs} epoch(s) on the train "
              f"split (run {cand.run_id}) because {why}")
    return Path(local), source


def extract_deep_features(
    cfg: Config,
    *,
    dataset_version: int | None = None,
    architecture: str = "resnet50",
    feature_layer: str | None = None,
    model_dir: str | Path | None = None,
    parent_run_id: str | None = None,
) -> DeepFeatures:
    """Features of every labelled cell (all splits) from the best backbone available.

    See the module docstring for the order of preference; ``feature_source`` says which one
    was used and why.
    """
    from training.classifier.architectures import build_model, resolve_hparams
    from training.classifier.classical import extract_features
    from training.classifier.inputs import make_dataset
    from training.classifier.predict import load_classifier
    from training.data.dataset import test_set_sha256
    from training.preprocess import PreprocessParams

    classes = list(cfg.data.classes)
    positive = cfg.data.positive_class if len(classes) == 2 else None
    cells, ds = _labelled_cells(cfg, dataset_version)
    with tempfile.TemporaryDirectory(prefix="leukoflow-features-") as tmp:
        saw_train = True
        if model_dir is None and cfg.classifier.weights:
            hp = resolve_hparams(cfg, architecture)
            try:
                model = build_model(architecture, len(classes), hp)
                params = PreprocessParams(int(hp["image_size"]), hp["source_size"],
                                          hp["segmentation"])
                source, saw_train = f"{architecture} with weights {cfg.classifier.weights}", False
            except TrainingError as exc:
                model_dir, source = _fallback_train(
                    cfg, architecture, ds.version, parent_run_id,
                    f"weights {cfg.classifier.weights!r} could not be loaded ({exc})", Path(tmp))
        elif model_dir is None:
            model_dir, source = _fallback_train(
                cfg, architecture, ds.version, parent_run_id,
                "no trained model was given and classifier.weights is null (offline: no "
                "ImageNet weights)", Path(tmp))
        else:
            source = f"backbone of the trained classifier at {model_dir}"
        if model_dir is not None:
            model, meta = load_classifier(Path(model_dir))
            architecture = str(meta.get("architecture") or architecture)
            params = PreprocessParams.from_dict(meta["preprocess"])
        layer = feature_layer or default_feature_layer(architecture)
        extractor = _feature_model(model, layer)
        images = make_dataset(list(cells["path"]), None, len(classes), params,
                              batch_size=FEATURE_BATCH, cache=False)
        X = extract_features(extractor, images)
    rows = cells[["sha256", "label", "subject_id", "split", "split_group"]].reset_index(drop=True)
    log.info("extracted %s features of %d cells from %s (%s)", X.shape[1], len(X), layer, source)
    return DeepFeatures(
        X=X, rows=rows, classes=classes, positive_class=positive, architecture=architecture,
        feature_layer=layer, feature_source=source, backbone_saw_train=saw_train,
        dataset_version=ds.version, test_set_sha256=test_set_sha256(cells),
        extra={"image_size": params.image_size},
    )


# ------------------------------------------------------------------------------ front doors
def deep_feature_sweep(
    cfg: Config,
    *,
    dataset_version: int | None = None,
    architecture: str = "resnet50",
    feature_layer: str | None = None,
    model_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    parent_run_id: str | None = None,
    features: DeepFeatures | None = None,
    n_bootstrap: int = 1000,
) -> pd.DataFrame:
    """Deep features -> every classical classifier (or ``names``), scored on the test split.

    Logs one MLflow run; the returned table carries its ``run_id`` and the feature source.
    ``features`` skips the extraction (already extracted, or made up in tests).
    """
    feats = features or extract_deep_features(
        cfg, dataset_version=dataset_version, architecture=architecture,
        feature_layer=feature_layer, model_dir=model_dir, parent_run_id=parent_run_id)
    table = sweep_features(feats, names, n_bootstrap=n_bootstrap)
    table["run_id"] = log_feature_results(cfg, feats, sweep=table, parent_run_id=parent_run_id)
    return table


def grouped_cv(
    cfg: Config,
    *,
    dataset_version: int | None = None,
    architecture: str = "resnet50",
    feature_layer: str | None = None,
    model_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    k: int = 10,
    rows: str | Sequence[str] = "auto",
    parent_run_id: str | None = None,
    features: DeepFeatures | None = None,
) -> pd.DataFrame:
    """k-fold CV (default 10, as the thesis) grouped by ``split_group``; one MLflow run."""
    feats = features or extract_deep_features(
        cfg, dataset_version=dataset_version, architecture=architecture,
        feature_layer=feature_layer, model_dir=model_dir, parent_run_id=parent_run_id)
    table = cv_features(feats, names, k, rows)
    table["run_id"] = log_feature_results(cfg, feats, cv=table, parent_run_id=parent_run_id)
    return table


def xincept_xgboost(cfg: Config, **kwargs: Any) -> pd.DataFrame:
    """Khan's XIncept-ALL variant: XGBoost on the fused InceptionV3 + Xception features."""
    kwargs.setdefault("feature_layer", "fused_features")
    return deep_feature_sweep(cfg, architecture="xincept_all", names=["xgboost"], **kwargs)


# ---------------------------------------------------------------------------------- CLI
def _local_model_dir(model: str | None, dest: Path) -> Path | None:
    """A local dir as is; a ``runs:/`` or ``models:/`` URI downloaded into ``dest``."""
    if model is None or Path(model).is_dir():
        return Path(model) if model else None
    if ":/" not in model:
        raise ConfigError(f"--model {model!r} is neither a folder nor an MLflow model URI")
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(dest)))


def _records(table: pd.DataFrame | None) -> list[dict[str, Any]] | None:
    if table is None:
        return None
    return json.loads(table.to_json(orient="records"))


def main(argv: list[str] | None = None) -> int:
    """``python -m training.classifier.features --architecture NAME [--model DIR|URI] --out F``."""
    parser = argparse.ArgumentParser(prog="python -m training.classifier.features",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--feature-layer", default=None,
                        help="layer to cut at (default: the architecture's pooled features)")
    parser.add_argument("--model", default=None,
                        help="trained classifier: a logged model dir, runs:/ or models:/ URI")
    parser.add_argument("--dataset-version", type=int, default=None)
    parser.add_argument("--names", default=None,
                        help="comma-separated classifiers for the sweep (default: all)")
    parser.add_argument("--cv-k", type=int, default=10, help="grouped CV folds; 0 skips CV")
    parser.add_argument("--cv-names", default=None,
                        help="comma-separated classifiers for the CV (default: --names)")
    parser.add_argument("--cv-rows", default="auto", help="auto, or splits joined by +")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--parent-run-id", default=None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    child_process_setup()
    split = (lambda s: [n for n in s.split(",") if n] if s else None)  # noqa: E731
    names, cv_names = split(args.names), split(args.cv_names) or split(args.names)
    try:
        cfg = load_config()
        from training.tracking import configure_mlflow

        configure_mlflow(cfg)  # before a runs:/ or models:/ URI is downloaded
        with tempfile.TemporaryDirectory(prefix="leukoflow-model-") as tmp:
            model_dir = _local_model_dir(args.model, Path(tmp))
            feats = extract_deep_features(
                cfg, dataset_version=args.dataset_version, architecture=args.architecture,
                feature_layer=args.feature_layer, model_dir=model_dir,
                parent_run_id=args.parent_run_id)
        if args.model:  # name the model as the caller did, not by a temporary download folder
            feats.feature_source = f"backbone of the trained classifier {args.model}"
        table = sweep_features(feats, names, n_bootstrap=args.bootstrap)
        cv, cv_note = None, ""
        if args.cv_k:
            rows = args.cv_rows if args.cv_rows == "auto" else args.cv_rows.split("+")
            try:
                cv = cv_features(feats, cv_names, args.cv_k, rows)
            except DataValidationError as exc:
                cv_note = f"grouped CV skipped: {exc}"
                log.warning(cv_note)
        run_id = log_feature_results(cfg, feats, sweep=table, cv=cv,
                                     parent_run_id=args.parent_run_id, cv_note=cv_note)
    except (LeukoflowError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    result = {"run_id": run_id, "architecture": feats.architecture,
              "feature_layer": feats.feature_layer, "feature_dim": int(feats.X.shape[1]),
              "feature_source": feats.feature_source, "split_kind": feats.split_kind,
              "backbone_saw_train": feats.backbone_saw_train,
              "test_set_sha256": feats.test_set_sha256, "dataset_version": feats.dataset_version,
              "sweep": _records(table), "grouped_cv": _records(cv), "cv_note": cv_note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(sweep_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
