"""Honest classification metrics: sklearn point estimates, bootstrap 95 % CIs, plots, tables.

Every number here is computed from ``y_true`` and ``y_prob``; nothing is typed in. Point
estimates come from scikit-learn. Confidence intervals are percentile bootstraps over test rows,
or, given ``groups`` (subject ids), over whole subjects (a cluster bootstrap): cells of one
patient share stain, scanner day and disease state, so they are not independent, and an
interval that resamples them pretends to know far more than a handful of patients can tell.
Both are stratified by class: every resample keeps the test set's class mix.
The resamples are drawn once as a matrix of row counts, so 1000 resamples of 1000 rows cost a
few matrix products instead of 1000 sklearn calls (``bootstrap_ci`` is the slow, generic twin
used to check them). No TensorFlow or torch here: serving and the DAGs import this module.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import (
    accuracy_score,
    auc,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from training.evaluation.calibration import expected_calibration_error, save_reliability_diagram

__all__ = [
    "COMPARISON_COLUMNS",
    "CI_METRICS",
    "bootstrap_ci",
    "classification_metrics",
    "comparison_table",
    "majority_baseline",
    "paired_bootstrap_delta",
    "save_classification_plots",
    "save_comparison",
    "row_ids",
    "subject_groups",
    "subjects_per_class",
]

CI_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
CI_LEVEL = 0.95
_MAX_CELLS = 2_000_000  # resample-matrix cells per chunk (16 MB of float64)


# ---------------------------------------------------------------------------- inputs


def _key(cls: str) -> str:
    """A class name as an MLflow-safe metric-name suffix."""
    return re.sub(r"[^0-9A-Za-z_.-]", "_", str(cls))


def _check(y_true: Any, y_prob: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and label range; labels may be indices or class names."""
    classes = list(classes)
    y_true = np.asarray(y_true)
    if y_true.dtype.kind in "UO":
        unknown = sorted(set(y_true.tolist()) - set(classes))
        if unknown:
            raise ValueError(f"labels {unknown} are not among classes {classes}")
        y_true = np.array([classes.index(c) for c in y_true], dtype=np.int64)
    y_true = y_true.astype(np.int64).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, got {classes}")
    if y_prob.ndim != 2 or y_prob.shape != (len(y_true), len(classes)):
        raise ValueError(
            f"y_prob must have shape (n_rows, n_classes) = ({len(y_true)}, {len(classes)}), "
            f"got {y_prob.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("no test rows: cannot evaluate on an empty set")
    if y_true.min() < 0 or y_true.max() >= len(classes):
        raise ValueError(
            f"y_true holds indices outside 0..{len(classes) - 1} for classes {classes}"
        )
    if not np.all(np.isfinite(y_prob)):
        raise ValueError("y_prob holds NaN or infinite values")
    return y_true, y_prob


def _positive_index(classes: Sequence[str], positive_class: str | None) -> int:
    """Binary tasks: which column is 'positive' (default: the second class, as in sklearn)."""
    if positive_class is None:
        return 1
    if positive_class not in classes:
        raise ValueError(
            f"positive_class={positive_class!r} is not one of the classes {list(classes)}"
        )
    return list(classes).index(positive_class)


# ---------------------------------------------------------------------------- bootstrap


def _unit_draws(unit_strata: np.ndarray, n_boot: int, seed: int,
                n_rows: int | None = None) -> Iterator[np.ndarray]:
    """Unit indices of ``n_boot`` resamples, in chunks of shape (b, n_units); seeded, shared.

    Stratified: each resample draws, with replacement, as many units of each stratum (class)
    as the stratum has, so every resample keeps the test set's class mix. A plain bootstrap of
    a few subjects often draws no healthy donor at all, and balanced accuracy or recall of a
    missing class is then undefined or wild. ``n_rows`` (default the number of units) sizes
    the chunks: what each resample expands to in memory.
    """
    rng = np.random.default_rng(seed)
    n_units = len(unit_strata)
    members = [np.flatnonzero(unit_strata == s) for s in np.unique(unit_strata)]
    chunk = max(1, _MAX_CELLS // max(n_rows or n_units, 1))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        yield np.concatenate([m[rng.integers(0, len(m), size=(b, len(m)))] for m in members],
                             axis=1) if n_units else np.zeros((b, 0), dtype=np.int64)
        done += b


def _counts(idx: np.ndarray) -> np.ndarray:
    """(b, n) index matrix -> (b, n) float matrix of how often each row was drawn."""
    b, n = idx.shape
    flat = (np.arange(b)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _group_codes(groups: Any, n_rows: int) -> tuple[np.ndarray, int]:
    """Group labels -> (row -> group index, number of groups)."""
    groups = np.asarray(groups).astype(str).ravel()
    if len(groups) != n_rows:
        raise ValueError(f"groups has {len(groups)} entries but there are {n_rows} rows")
    uniques, codes = np.unique(groups, return_inverse=True)
    return codes.ravel(), len(uniques)


def _resample_weights(y_true: Any, groups: Any, n_boot: int,
                      seed: int) -> Iterator[np.ndarray]:
    """(b, n_rows) matrices of how often each row is drawn: rows one by one, or, with
    ``groups``, whole groups (a drawn subject brings all its cells, as often as it is drawn);
    stratified by ``y_true`` (a group's class is its most common one, see :func:`_unit_draws`)."""
    y_true = np.asarray(y_true).astype(str).ravel()
    n_rows = len(y_true)
    if groups is None:
        for idx in _unit_draws(y_true, n_boot, seed):
            yield _counts(idx)
        return
    codes, n_groups = _group_codes(groups, n_rows)
    by_group = pd.DataFrame({"g": codes, "y": y_true}).groupby("g")["y"]
    strata = by_group.agg(lambda s: s.value_counts().index[0]).reindex(range(n_groups))
    for idx in _unit_draws(strata.to_numpy(dtype=str), n_boot, seed, n_rows=n_rows):
        yield _counts(idx)[:, codes]


def subject_groups(rows: pd.DataFrame) -> np.ndarray | None:
    """The resampling unit of each row: its subject, or the row itself when it has none.

    None when no row has a subject (then rows are the only unit there is). The returned
    labels are what ``groups=`` of this module's bootstraps take.
    """
    if "subject_id" not in rows.columns:
        return None
    subjects = rows["subject_id"].fillna("").astype(str).str.strip()
    if not (subjects != "").any():
        return None
    own = pd.Series([f"row:{i}" for i in range(len(rows))], index=rows.index)
    return np.where(subjects != "", "subject:" + subjects, own).astype(str)


def row_ids(rows: pd.DataFrame) -> np.ndarray | None:
    """The images' sha256, for ``row_ids=`` of :func:`classification_metrics` (None without)."""
    if "sha256" not in rows or rows["sha256"].isna().any():
        return None
    return rows["sha256"].astype(str).to_numpy()


def subjects_per_class(rows: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    """``n_subjects_<split>`` and ``n_subjects_<split>__<class>``: distinct subjects per split.

    What every figure rests on: 600 test cells from 3 patients are 3 observations of how the
    model does on a patient, not 600. Rows without a subject count as one subject each.
    """
    out: dict[str, float] = {}
    if "split" not in rows.columns or "label" not in rows.columns:
        return out
    groups = subject_groups(rows)
    if groups is None:
        return out
    frame = pd.DataFrame({"split": rows["split"].to_numpy(), "label": rows["label"].to_numpy(),
                          "g": groups})
    for split, part in frame.groupby("split", sort=True):
        out[f"n_subjects_{split}"] = float(part["g"].nunique())
        for cls in classes:
            out[f"n_subjects_{split}__{_key(cls)}"] = float(
                part.loc[part["label"] == cls, "g"].nunique())
    return out


def _percentile_ci(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: np.ndarray,
    y_pred_or_prob: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile 95 % CI of any ``metric_fn(y_true, y)`` over ``n`` resamples.

    Resamples rows, or whole ``groups`` (subject ids) when given. Generic and slow (one call
    per resample); resamples where the metric is undefined (``ValueError``, e.g. a class
    missing) are skipped. Uses the same seeded resamples as :func:`classification_metrics`,
    so the two agree exactly.
    """
    y_true = np.asarray(y_true)
    y = np.asarray(y_pred_or_prob)
    if len(y_true) != len(y):
        raise ValueError(f"y_true has {len(y_true)} rows but predictions have {len(y)}")
    values = []
    rows = np.arange(len(y_true))
    for w_chunk in _resample_weights(y_true, groups, n, seed):
        for w in w_chunk:
            idx = np.repeat(rows, w.astype(np.int64))
            try:
                values.append(float(metric_fn(y_true[idx], y[idx])))
            except ValueError:
                values.append(math.nan)
    return _percentile_ci(np.array(values))


PAIRED_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, p: float(accuracy_score(y, p)),
    "balanced_accuracy": lambda y, p: float(balanced_accuracy_score(y, p)),
    "f1_macro": lambda y, p: float(f1_score(y, p, average="macro", zero_division=0)),
}


def paired_bootstrap_delta(
    metric: str, y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
    groups: np.ndarray | None = None, n: int = 1000, seed: int = 0,
) -> dict[str, float]:
    """Candidate ``a`` minus champion ``b`` on the SAME rows: the difference and its 95 % CI.

    Each resample draws rows (or, with ``groups``, whole groups such as subjects: the unit the
    data are independent at) once and scores both models on them, so the interval is that of
    the difference itself, much narrower than comparing two separate intervals. Resamples where
    the metric is undefined are skipped.
    """
    fn = PAIRED_METRICS[metric]
    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not len(y_true) == len(pred_a) == len(pred_b):
        raise ValueError("candidate and champion predictions must cover the same rows")
    rows = np.arange(len(y_true))
    deltas = []
    for w_chunk in _resample_weights(y_true, groups, n, seed):
        for w in w_chunk:
            idx = np.repeat(rows, w.astype(np.int64))
            try:
                deltas.append(fn(y_true[idx], pred_a[idx]) - fn(y_true[idx], pred_b[idx]))
            except ValueError:
                continue
    n_units = len(y_true) if groups is None else len(np.unique(np.asarray(groups).astype(str)))
    low, high = _percentile_ci(np.array(deltas))
    return {"delta": fn(y_true, pred_a) - fn(y_true, pred_b), "delta_ci_low": low,
            "delta_ci_high": high, "n_units": float(n_units)}


def _weighted_auc(score: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties count half) for each row of weights ``w`` (b, n)."""
    order = np.argsort(score, kind="mergesort")
    s, pos, w = score[order], positive[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups of equal scores
    pos_g = np.add.reduceat(w * pos, starts, axis=1)
    neg_g = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    num = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
    denom = pos_g.sum(axis=1) * neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.nan)


def _bootstrap_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, pos: int | None, n_boot: int, seed: int,
    with_auc: bool, groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Vectorised resample values of CI_METRICS, matching sklearn's definitions."""
    n, k = y_prob.shape
    y_pred = y_prob.argmax(axis=1)
    onehot = np.zeros((n, k * k))
    onehot[np.arange(n), y_true * k + y_pred] = 1.0
    out: dict[str, list[np.ndarray]] = {m: [] for m in CI_METRICS}
    for w in _resample_weights(y_true, groups, n_boot, seed):
        cm = (w @ onehot).reshape(-1, k, k)  # (b, true, pred)
        tp = np.einsum("bii->bi", cm)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        out["accuracy"].append(tp.sum(axis=1) / w.sum(axis=1))  # groups: sizes vary
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, tp / np.where(support > 0, support, 1), np.nan)
            # sklearn: F1 = 2TP / (2TP + FP + FN), 0 when undefined; macro over all labels
            denom = support + predicted
            f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        out["balanced_accuracy"].append(np.nanmean(recall, axis=1))
        out["f1_macro"].append(f1.mean(axis=1))
        if with_auc:
            if pos is not None:
                out["roc_auc"].append(_weighted_auc(y_prob[:, pos], y_true == pos, w))
            else:
                per_class = [_weighted_auc(y_prob[:, j], y_true == j, w) for j in range(k)]
                out["roc_auc"].append(np.mean(per_class, axis=0))  # NaN if any class absent
    return {m: np.concatenate(v) for m, v in out.items() if v}


# ---------------------------------------------------------------------------- metrics


def _specificity(cm: np.ndarray) -> np.ndarray:
    """Per class TN / (TN + FP) from a (true, pred) confusion matrix; 0 when undefined."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    denom = tn + fp
    return np.divide(tn, denom, out=np.zeros_like(tn), where=denom > 0)


def _roc_auc(
    y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], pos: int | None
) -> dict[str, float]:
    """Binary: AUC of the positive class's probability. Multiclass: one-vs-rest macro.

    Keys are left out (not NaN) when a class has no positive or no negative test row.
    """
    present = np.unique(y_true)
    if pos is not None:
        if len(present) < 2:
            return {}
        return {"roc_auc": float(roc_auc_score(y_true == pos, y_prob[:, pos]))}
    out: dict[str, float] = {}
    for j, cls in enumerate(classes):
        if j in present and len(present) > 1:
            out[f"roc_auc__{_key(cls)}"] = float(roc_auc_score(y_true == j, y_prob[:, j]))
    if len(present) == len(classes):
        # sklearn's 'ovr' macro is this mean; computed per class so scores need not sum to 1
        out["roc_auc"] = float(np.mean([out[f"roc_auc__{_key(c)}"] for c in classes]))
    return out


def classification_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: list[str],
    positive_class: str | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """Every classification metric the reports and the gate use, as a flat dict of floats.

    ``y_true``: (n,) indices into ``classes``; ``y_prob``: (n, k) class probabilities, the
    prediction is their argmax. ``positive_class`` (binary only; default ``classes[1]``) picks
    the column ROC AUC is computed on. ``n_bootstrap=0`` skips the confidence intervals.

    ``groups`` (one subject id per row, see :func:`subject_groups`): ``<metric>_ci_low/high``
    then resample subjects, the cell-level intervals stay beside them as
    ``<metric>_cell_ci_low/high``, and ``n_subjects`` / ``n_subjects__<class>`` say how many
    subjects of each class the figures rest on; ``ci_units``: how many units were resampled.

    ``row_ids`` (one unique id per row, e.g. the image's sha256): the row-level resamples are
    drawn in the order of the ids, not of the rows, so the same images listed in another order
    (``leukoflow evaluate`` reads a folder; training reads its manifest) get the same intervals.
    """
    y_true, y_prob = _check(y_true, y_prob, classes)
    pos = _positive_index(classes, positive_class) if len(classes) == 2 else None
    with warnings.catch_warnings():  # classes absent from y_true are handled explicitly below
        warnings.simplefilter("ignore", UserWarning)
        m = _point_metrics(y_true, y_prob, classes, pos)
    m["ece"] = expected_calibration_error(y_true, y_prob)  # training.evaluation.calibration
    if groups is not None:
        codes, n_groups = _group_codes(groups, len(y_true))
        m["n_subjects"] = float(n_groups)
        for j, cls in enumerate(classes):
            m[f"n_subjects__{_key(cls)}"] = float(len(np.unique(codes[y_true == j])))
    if n_bootstrap > 0:
        levels = [("", row_ids)] if groups is None else [("", groups), ("_cell", row_ids)]
        for label, g in levels:
            boot = _bootstrap_metrics(y_true, y_prob, pos, n_bootstrap, seed, "roc_auc" in m, g)
            for name, values in boot.items():
                low, high = _percentile_ci(values)
                if math.isfinite(low):
                    m[f"{name}{label}_ci_low"], m[f"{name}{label}_ci_high"] = low, high
        if groups is not None:
            m["ci_units"] = m["n_subjects"]
    return m


def _point_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], pos: int | None
) -> dict[str, float]:
    labels = list(range(len(classes)))
    y_pred = y_prob.argmax(axis=1)
    m: dict[str, float] = {
        "n_test": float(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    for avg in ("macro", "weighted"):
        kw = {"labels": labels, "average": avg, "zero_division": 0}
        m[f"precision_{avg}"] = float(precision_score(y_true, y_pred, **kw))
        m[f"recall_{avg}"] = float(recall_score(y_true, y_pred, **kw))
        m[f"f1_{avg}"] = float(f1_score(y_true, y_pred, **kw))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    spec = _specificity(cm)
    m["specificity_macro"] = float(spec.mean())
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for j, cls in enumerate(classes):
        c = _key(cls)
        m[f"precision__{c}"] = float(p[j])
        m[f"recall__{c}"] = float(r[j])
        m[f"f1__{c}"] = float(f[j])
        m[f"specificity__{c}"] = float(spec[j])
        m[f"support__{c}"] = float(s[j])
    m.update(_roc_auc(y_true, y_prob, classes, pos))
    return m


def majority_baseline(
    y_train: np.ndarray, y_test: np.ndarray, classes: list[str]
) -> dict[str, float]:
    """Scores of always predicting the training set's most frequent class on the test set.

    A model is only worth reporting next to this: on imbalanced data (C-NMC is ~2:1) a
    constant predictor already reaches a high accuracy, but balanced accuracy 1/k.
    """
    k = len(classes)
    y_train = _check(y_train, np.zeros((len(np.ravel(y_train)), k)), classes)[0]
    y_test = _check(y_test, np.zeros((len(np.ravel(y_test)), k)), classes)[0]
    majority = int(np.bincount(y_train, minlength=k).argmax())
    y_pred = np.full_like(y_test, majority)
    with warnings.catch_warnings():  # the majority class may be absent from the test rows
        warnings.simplefilter("ignore", UserWarning)
        return {
            "accuracy": float(accuracy_score(y_test, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_test, y_pred)),
            "f1_macro": float(
                f1_score(y_test, y_pred, labels=list(range(k)), average="macro", zero_division=0)
            ),
            "majority_class_index": float(majority),
        }


# ---------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _confusion_axes(ax: Any, mat: np.ndarray, classes: Sequence[str], title: str, fmt: str,
                    vmax: float) -> None:
    im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45 if len(classes) > 3 else 0, ha="right"
                  if len(classes) > 3 else "center")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            colour = "white" if mat[i, j] > vmax / 2 else "black"
            ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", color=colour)


def save_classification_plots(
    y_true: np.ndarray, y_prob: np.ndarray, classes: list[str], out_dir: Path, title: str = "",
    uncalibrated: np.ndarray | None = None, temperature: float = 1.0,
) -> list[Path]:
    """Write ``confusion_matrix.png`` (counts and row-normalised), ``roc_curves.png`` and
    ``reliability.png`` (with ``uncalibrated``: before and after temperature scaling)."""
    y_true, y_prob = _check(y_true, y_prob, classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = len(classes)
    cm = confusion_matrix(y_true, y_prob.argmax(axis=1), labels=list(range(k)))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = 4.5 + 0.6 * k
    fig = Figure(figsize=(2 * size + 1, size), layout="constrained")
    axes = fig.subplots(1, 2)
    _confusion_axes(axes[0], cm, classes, "Counts", "d", max(int(cm.max()), 1))
    _confusion_axes(axes[1], norm, classes, "Row-normalised (recall per class)", ".2f", 1.0)
    fig.suptitle(f"{title + ' - ' if title else ''}confusion matrix (n = {len(y_true)})")
    paths = [_save(fig, out_dir / "confusion_matrix.png")]

    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    for j, cls in enumerate(classes):
        positive = y_true == j
        if positive.all() or not positive.any():
            why = "only class present" if positive.all() else "absent from y_true"
            ax.plot([], [], label=f"{cls} (AUC undefined: {why})")
            continue
        fpr, tpr, _ = roc_curve(positive, y_prob[:, j])
        ax.plot(fpr, tpr, lw=2, label=f"{cls} vs rest (AUC = {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance (AUC = 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"{title + ' - ' if title else ''}ROC curves (one vs rest, n = {len(y_true)})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "roc_curves.png"))
    paths.append(save_reliability_diagram(y_true, y_prob, out_dir / "reliability.png", title,
                                          uncalibrated=uncalibrated, temperature=temperature))
    return paths


# ---------------------------------------------------------------------------- comparison

COMPARISON_COLUMNS = [
    "architecture", "split_kind", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc",
    "trainable_params", "train_time_s", "latency_ms", "n_test", "n_subjects", "ci_units",
]
_ALIASES = {
    "split_kind": ("split_kind", "split"),
    "trainable_params": ("trainable_params", "trainable_parameters", "params"),
    "train_time_s": ("train_time_s", "train_time"),
    "latency_ms": ("latency_ms", "latency_ms_per_image", "latency"),
}


def _lookup(row: dict, column: str) -> Any:
    """A column from the row itself or from its nested ``metrics`` dict (Candidate-shaped)."""
    metrics = row.get("metrics") or {}
    for name in _ALIASES.get(column, (column,)):
        for source in (row, metrics):
            if source.get(name) is not None:
                return source[name]
    return None


def comparison_table(rows: list[dict],
                     columns: Sequence[str] = tuple(COMPARISON_COLUMNS)) -> pd.DataFrame:
    """One row per (architecture, split kind), in the shape of the papers' comparison tables.

    A row is a flat dict (``architecture``, ``split_kind`` and metric keys as
    :func:`classification_metrics` names them, ``trainable_params``, ``train_time_s``,
    ``latency_ms``) or a Candidate-like dict with those metrics under ``metrics``.
    ``columns``: another family's columns (the first two are always architecture, split kind).
    """
    columns = list(columns)
    records = []
    for row in rows:
        rec = {c: _lookup(row, c) for c in columns}
        if rec["architecture"] is None:
            raise ValueError(f"comparison row without 'architecture': {sorted(row)}")
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=columns)
    numeric = columns[2:]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    df["split_kind"] = df["split_kind"].fillna("unknown")
    return df


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, spec)


def _markdown(df: pd.DataFrame) -> str:
    header = ["Architecture", "Split", "Accuracy [95% CI]", "Balanced acc.", "Precision",
              "Recall", "F1", "ROC AUC", "Trainable params", "Train time (s)", "Latency (ms)",
              "n test", "Test subjects", "CI over"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in df.itertuples(index=False):
        acc = _fmt(r.accuracy, ".4f")
        if not math.isnan(r.accuracy_ci_low):
            acc += f" [{r.accuracy_ci_low:.4f}, {r.accuracy_ci_high:.4f}]"
        cells = [str(r.architecture), str(r.split_kind), acc, _fmt(r.balanced_accuracy, ".4f"),
                 _fmt(r.precision_macro, ".4f"), _fmt(r.recall_macro, ".4f"),
                 _fmt(r.f1_macro, ".4f"), _fmt(r.roc_auc, ".4f"), _fmt(r.trainable_params, ",.0f"),
                 _fmt(r.train_time_s, ".1f"), _fmt(r.latency_ms, ".2f"), _fmt(r.n_test, ".0f"),
                 _fmt(r.n_subjects, ".0f"),
                 "subjects" if math.isfinite(r.ci_units) else ("cells" if math.isfinite(
                     r.accuracy_ci_low) else "-")]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nPrecision, recall and F1 are macro averages. Accuracy intervals are percentile "
            "bootstrap 95 % CIs; 'CI over' says what was resampled: whole test subjects when "
            "the rows have them (cells of one patient are not independent), else test cells. "
            "Split 'subject' keeps every subject's images on one side; 'image' is the random "
            "image-level split of the papers.\n")
    return "\n".join(lines) + "\n" + note


def save_comparison(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` (accuracy with CIs)."""
    df = comparison_table(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    df.to_csv(csv_path, index=False)
    md_path.write_text(_markdown(df))

    fig = Figure(figsize=(max(6.0, 1.1 * len(df) + 3), 5), layout="constrained")
    ax = fig.subplots()
    kinds = list(dict.fromkeys(df["split_kind"]))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    colour = {kind: palette[i % len(palette)] for i, kind in enumerate(kinds)}
    x = np.arange(len(df))
    acc = df["accuracy"].to_numpy(dtype=float)
    ci_low = df["accuracy_ci_low"].to_numpy(dtype=float)
    ci_high = df["accuracy_ci_high"].to_numpy(dtype=float)
    baseline = df["architecture"].astype(str).str.contains("baseline", case=False).to_numpy()
    ax.bar(x, np.nan_to_num(acc),
           yerr=[np.nan_to_num(acc - ci_low, nan=0.0), np.nan_to_num(ci_high - acc, nan=0.0)],
           capsize=4, color=[colour[s] for s in df["split_kind"]], edgecolor="black",
           linewidth=0.5, hatch=["//" if b else "" for b in baseline],
           alpha=0.9)
    for xi, a, hi in zip(x, acc, ci_high, strict=True):
        if math.isfinite(a):
            top = hi if math.isfinite(hi) else a
            ax.text(xi, top + 0.01, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels=[str(a) for a in df["architecture"]], rotation=30, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Test accuracy (95 % bootstrap CI)")
    ax.set_xlabel("Architecture (hatched: baselines: majority class, hand-crafted features)")
    ax.set_title("Model comparison")
    handles = [Patch(facecolor=colour[k], edgecolor="black", label=f"{k}-level split")
               for k in kinds]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return [csv_path, md_path, _save(fig, out_dir / "comparison.png")]
