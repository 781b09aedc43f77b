"""Fitting the hand-crafted baseline (:mod:`training.classifier.handcrafted`) on train rows.

Two uses, one code path:

* beside every Keras candidate (:func:`baseline_metrics`, called by
  :func:`training.classifier.train.train_and_evaluate`): fitted on the candidate's own train
  rows, scored on its own test rows, logged as ``baseline/<metric>`` in the candidate's run,
  so the comparison table, the model card and the gate (``gate.must_beat_baseline``) compare
  the two on exactly the same cells;
* as a classifier architecture of its own (``handcrafted_baseline``), trained, gated,
  registered and served like any other (no GPU, seconds on a CPU).

The estimator is ``classifier.baseline_model``, a name of the classical table
(:data:`training.classifier.classical.CLASSIFIERS`, default logistic regression on
standardised features), weighted as the CNNs are (``class_weights``, ``balance_subjects``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from training.classifier.handcrafted import HandcraftedModel, cell_features
from training.config import Config
from training.errors import ConfigError, DataValidationError
from training.families import BASELINE_ARCHITECTURE
from training.preprocess import PreprocessParams

__all__ = ["BASELINE_ARCHITECTURE", "baseline_hparams", "baseline_metrics", "features_of_paths",
           "fit_handcrafted", "predict_paths", "sample_weights"]

log = logging.getLogger(__name__)

PREFIX = "baseline/"
_KERAS_ONLY = ("epochs", "learning_rate", "learning_rate_after", "lr_drop_epoch", "optimizer",
               "loss", "dropout", "weights", "augmentation")


def baseline_hparams(cfg: Config) -> dict[str, Any]:
    """The baseline's resolved hyperparameters (its image size unless the config sets one)."""
    from training.classifier.architectures import resolve_hparams
    from training.classifier.classical import CLASSIFIERS

    name = cfg.classifier.baseline_model
    if name not in CLASSIFIERS:
        raise ConfigError(f"'classifier.baseline_model' = {name!r} is not a classical "
                          f"classifier: choose from {', '.join(CLASSIFIERS)}")
    hp = resolve_hparams(cfg, BASELINE_ARCHITECTURE)
    for unused in _KERAS_ONLY:  # logged parameters say what trained the model, nothing else
        hp.pop(unused, None)
    return {**hp, "baseline_model": name}


def features_of_paths(paths: Sequence[str], params: PreprocessParams) -> np.ndarray:
    """``(n, d)`` hand-crafted features of image files, through the shared preprocessing."""
    from training.classifier.handcrafted import FEATURE_NAMES
    from training.classifier.inputs import load_uint8

    if not len(paths):
        return np.zeros((0, len(FEATURE_NAMES)))
    return np.stack([cell_features(load_uint8(p, params)) for p in paths])


def sample_weights(hp: dict[str, Any], y: np.ndarray, subjects: Sequence[Any],
                   n_classes: int) -> np.ndarray | None:
    """The CNNs' weighting rule, as per-image weights (None: unweighted)."""
    from training.classifier.inputs import balanced_class_weights, subject_balanced_weights

    if hp.get("balance_subjects"):
        return subject_balanced_weights(y, subjects, n_classes,
                                        balance_classes=bool(hp.get("class_weights")))
    if hp.get("class_weights"):
        w = balanced_class_weights(y, n_classes)
        return np.array([w[int(c)] for c in y])
    return None


def _fit(estimator: Any, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
    """Fit with sample weights where the estimator takes them (a pipeline's last step)."""
    if weights is None:
        estimator.fit(X, y)
        return
    from sklearn.pipeline import Pipeline

    key = f"{estimator.steps[-1][0]}__sample_weight" if isinstance(estimator, Pipeline) \
        else "sample_weight"
    try:
        estimator.fit(X, y, **{key: weights})
    except TypeError:  # kNN and a few others take no weights
        log.warning("%s takes no sample weights: fitted unweighted",
                    type(estimator).__name__)
        estimator.fit(X, y)


def fit_handcrafted(
    hp: dict[str, Any], train: pd.DataFrame, y_train: np.ndarray, n_classes: int,
) -> tuple[HandcraftedModel, PreprocessParams, float]:
    """Fit the baseline on ``train`` rows (``path``, ``subject_id``): model, its
    preprocessing (stain reference fitted on the same rows) and the measured fit time (s)."""
    from training.classifier.classical import CLASSIFIERS
    from training.classifier.inputs import fit_preprocess

    present = np.unique(y_train)
    if len(present) < 2:
        raise DataValidationError(f"the baseline needs two classes in its train rows, got "
                                  f"{present.tolist()}")
    start = time.perf_counter()
    paths = list(train["path"])
    params = fit_preprocess(hp, paths)
    X = features_of_paths(paths, params)
    weights = sample_weights(hp, y_train, list(train["subject_id"]), n_classes)
    estimator = CLASSIFIERS[hp["baseline_model"]]()
    _fit(estimator, X, np.searchsorted(present, y_train), weights)
    model = HandcraftedModel(estimator, n_classes, [int(c) for c in present])
    return model, params, time.perf_counter() - start


def predict_paths(model: HandcraftedModel, paths: Sequence[str],
                  params: PreprocessParams) -> np.ndarray:
    """Probabilities ``(n, k)`` of image files (features streamed, no image stack held)."""
    return model.predict_features(features_of_paths(paths, params))


def baseline_metrics(
    cfg: Config, part: dict[str, pd.DataFrame], y: dict[str, np.ndarray], classes: list[str],
    positive: str | None,
) -> dict[str, float]:
    """The baseline fitted on ``part["train"]`` and scored on ``part["test"]`` (and ``val``),
    as ``baseline/<metric>``: the very rows the candidate beside it is judged on."""
    from training.evaluation.metrics import classification_metrics, row_ids, subject_groups

    hp = baseline_hparams(cfg)
    model, params, fit_time = fit_handcrafted(hp, part["train"], y["train"], len(classes))
    out = {"fit_time_s": fit_time}
    prob = predict_paths(model, list(part["test"]["path"]), params)
    out.update(classification_metrics(y["test"], prob, classes, positive,
                                      groups=subject_groups(part["test"]),
                                      row_ids=row_ids(part["test"])))
    if len(part.get("val", ())):
        val = classification_metrics(y["val"], predict_paths(model, list(part["val"]["path"]),
                                                             params), classes, positive,
                                     n_bootstrap=0)
        out.update({f"val/{k}": v for k, v in val.items() if "__" not in k and "_ci_" not in k})
    log.info("hand-crafted baseline (%s) on the same rows: %s", hp["baseline_model"],
             {k: round(v, 4) for k, v in out.items() if "__" not in k and "_ci_" not in k
              and not k.startswith("val/")})
    return {f"{PREFIX}{k}": float(v) for k, v in out.items()}
