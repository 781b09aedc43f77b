"""Drift of an incoming batch: does it look like what the champion was trained on?

A batch from another lab, scanner or stain can pass every per-file check and still be far from
the training data; the model's answers on it are then not what its test metrics promise. For
each validated batch this module compares the batch with a seeded sample of the current
champion's own training rows (the dataset version its registry version is tagged with) on
image statistics: size, exposure and contrast, blur, per-channel colour mean/spread and colour
histograms (:data:`FEATURES`). The score is the maximum mean discrepancy (MMD², RBF kernel,
median-distance bandwidth, features standardised by the reference) with a permutation p-value;
a per-feature standardised mean shift says *what* moved.

Where it runs: the image statistics in the ingest task itself (numpy and PIL only). The
champion's own embedding (penultimate-layer features, MMD² too) needs TensorFlow, which the
ingest process must not import where it may also hold torch: with
``validation.drift_embedding`` on and a classifier champion present, a child process
(``python -m training.classifier.embedding``) computes it for cell batches. It is off by
default because it costs a TensorFlow start and two forward passes per batch.

The threshold is **calibrated on the reference itself** (``validation.drift_threshold_mode:
calibrated``, :func:`calibrated_threshold`): new patients of the training source differ from the
training patients too (C-NMC: a batch of two test patients of the same lab scored 0.278 against
a fixed 0.1), so the question is not "is the batch different" (with hundreds of images a
permutation test always says yes) but "is it more different than the source's own patients are
from each other". The champion's training rows are split by subject into two disjoint sides
many times (seeded, the batch side sized like the batch), the same MMD² taken between the sides,
and a high quantile of that null times a margin is the threshold, never below the fixed
``validation.drift_threshold``. Fewer than ``drift_calibration_min_subjects`` subjects in the
reference cannot be split that way: the fixed threshold is used and the result says so.

The GX suite carries the score as a batch-level **warning** (``drift``: score above the batch's
threshold): a drifted batch is reported to the steward, in the report and in MLflow, never
quarantined or rejected for it — another lab's images are exactly what a platform must be able
to take in, and judge.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from training.config import Config

__all__ = ["FEATURES", "DriftResult", "batch_drift", "calibrated_threshold", "drift_score",
           "image_features", "threshold_for"]

log = logging.getLogger(__name__)

HIST_BINS = 8
THUMB_SIDE = 256  # statistics are taken on a copy at most this big: the same for both sides
FEATURES = (
    ["log_width", "log_height", "exposure", "contrast", "log_blur"]
    + [f"mean_{c}" for c in "RGB"] + [f"std_{c}" for c in "RGB"]
    + [f"hist_{c}{b}" for c in "RGB" for b in range(HIST_BINS)]
)
_STD_FLOOR = {"log_width": 0.05, "log_height": 0.05}  # constant sizes (C-NMC: all 450 px)


def image_features(path: str | Path) -> np.ndarray:
    """The :data:`FEATURES` of one image file (float64); raises ``OSError`` if unreadable."""
    from training.data.metadata import _laplacian_variance

    with Image.open(path) as im:
        width, height = im.size
        rgb = im.convert("RGB")
        rgb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    px = np.asarray(rgb, dtype=np.uint8)
    grey = np.asarray(rgb.convert("L"), dtype=np.uint8)
    flat = px.reshape(-1, 3).astype(np.float64)
    hist = [np.bincount(px[..., c].ravel() // (256 // HIST_BINS), minlength=HIST_BINS) / grey.size
            for c in range(3)]
    return np.concatenate([
        [math.log(max(width, 1)), math.log(max(height, 1)), float(grey.mean()),
         float(grey.std()), math.log1p(_laplacian_variance(grey))],
        flat.mean(axis=0), flat.std(axis=0), *hist,
    ])


def _features(paths: list[str]) -> np.ndarray:
    """The :data:`FEATURES` of the readable files among ``paths``."""
    return _features_of(pd.DataFrame({"path": list(paths)}))[0]


def _mmd2(k: np.ndarray, n_ref: int) -> float:
    """Biased MMD² estimate from the pooled kernel matrix (reference rows first)."""
    a, b = k[:n_ref, :n_ref], k[n_ref:, n_ref:]
    return float(a.mean() + b.mean() - 2 * k[:n_ref, n_ref:].mean())


def _kernel(reference: np.ndarray, batch: np.ndarray,
            names: list[str] | None) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """The pooled RBF kernel matrix (reference rows first), its bandwidth, and the reference's
    mean and SD the features were standardised by."""
    mean = reference.mean(axis=0)
    floor = np.array([_STD_FLOOR.get(f, 1e-3) for f in names] if names else 1e-3)
    std = np.maximum(reference.std(axis=0), floor)
    pooled = (np.vstack([reference, batch]) - mean) / std
    sq = np.square(pooled).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    off = d2[~np.eye(len(d2), dtype=bool)]
    bandwidth = float(np.median(off)) or 1.0
    return np.exp(-d2 / bandwidth), bandwidth, mean, std


def _check_sizes(reference: np.ndarray, batch: np.ndarray) -> None:
    if len(reference) < 2 or len(batch) < 2:
        raise ValueError(f"need at least 2 images a side, got {len(reference)} reference and "
                         f"{len(batch)} batch images")


def drift_score(reference: np.ndarray, batch: np.ndarray, *, n_permutations: int = 200,
                seed: int = 0, names: list[str] | None = FEATURES) -> dict[str, Any]:
    """MMD² between feature rows of the reference and the batch, its permutation p-value and
    the standardised mean shift of every feature (``shift.<feature>``, in reference SDs).

    ``names``: the columns (default :data:`FEATURES`); None for unnamed features such as an
    embedding (then no per-feature shifts are returned)."""
    reference, batch = np.asarray(reference, float), np.asarray(batch, float)
    _check_sizes(reference, batch)
    k, bandwidth, mean, std = _kernel(reference, batch, names)
    n_ref = len(reference)
    score = _mmd2(k, n_ref)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        perm = rng.permutation(len(k))
        exceed += _mmd2(k[np.ix_(perm, perm)], n_ref) >= score
    shift = (batch.mean(axis=0) - mean) / std
    return {"score": score, "p_value": (exceed + 1) / (n_permutations + 1),
            "n_reference": n_ref, "n_batch": len(batch), "bandwidth": bandwidth,
            "dimensions": reference.shape[1],
            "shift": {f: float(s) for f, s in zip(names, shift, strict=True)} if names else {}}


def _score_at(reference: np.ndarray, batch: np.ndarray, names: list[str] | None,
              sizes: tuple[int, int]) -> float:
    """:func:`drift_score`'s MMD² (same standardisation and bandwidth, no p-value), as it would
    read with ``sizes`` (reference, batch) images a side. The biased estimate's within-side means
    hold their diagonal (k(x, x) = 1) with weight 1/n: ``off + (1 - off) / n``; putting the real
    sizes there keeps a split's smaller sides from inflating the null by sample size alone."""
    _check_sizes(reference, batch)
    k = _kernel(reference, batch, names)[0]
    n_a = len(reference)
    score = _mmd2(k, n_a)
    for block, real in ((k[:n_a, :n_a], sizes[0]), (k[n_a:, n_a:], sizes[1])):
        n = len(block)
        off = (block.sum() - np.trace(block)) / (n * (n - 1))
        score += (1 - off) / real - (1 - off) / n
    return float(score)


def _ids(values: Any, n: int) -> np.ndarray:
    """Subject ids or labels as strings, ``""`` for none (None, NaN, blank)."""
    if values is None:
        return np.full(n, "", dtype=object)
    out = np.array(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                    str(v).strip() for v in values], dtype=object)
    if len(out) != n:
        raise ValueError(f"{len(out)} ids for {n} rows")
    return out


def _batch_side(rng: np.random.Generator, rows: np.ndarray, labels: np.ndarray, n_batch: int,
                shares: dict[str, float]) -> np.ndarray:
    """At most ``n_batch`` of ``rows``, in the batch's class shares as far as the rows allow."""
    m = min(n_batch, len(rows))
    if not shares:
        return rng.choice(rows, m, replace=False) if len(rows) > m else rows
    picked = []
    for label, share in shares.items():
        pool = rows[labels[rows] == label]
        want = min(len(pool), round(share * m))
        picked.append(rng.choice(pool, want, replace=False) if want < len(pool) else pool)
    return np.concatenate(picked).astype(int) if picked else rows[:0]


def _stochastic_round(rng: np.random.Generator, x: float) -> int:
    return int(math.floor(x) + (rng.random() < x - math.floor(x)))


def calibrated_threshold(reference: np.ndarray, subjects: Any, labels: Any = None, *,
                         n_batch: int, batch_subjects: int = 0, batch_labels: Any = None,
                         n_splits: int = 200, quantile: float = 0.95, margin: float = 1.5,
                         min_subjects: int = 4, seed: int = 0,
                         names: list[str] | None = FEATURES) -> dict[str, Any]:
    """How different are new patients of the reference's own source: a threshold for MMD².

    ``n_splits`` times (seeded) the reference's subjects are dealt into two disjoint sides. The
    "batch" side gets as many subjects as the batch has (``batch_subjects``; half when the batch
    names none, at most half), drawn within each label (``labels``, per row; a subject takes its
    first row's) in the batch's class shares (``batch_labels``, else the reference's), never the
    last subject of a label; it is then cut to at most ``n_batch`` images in those shares. Every
    other subject plays the reference, so that side stays as close to the real reference's size
    as the split allows. Rows without a subject (``""``) go to the batch side at the same rate
    as subjects, one by one. The MMD² of :func:`drift_score` between the sides, read at the
    real sizes (:func:`_score_at`), is the null, "a batch of new patients from the same source";
    its ``quantile`` times ``margin`` is ``threshold``. The reference side holds fewer subjects
    than the real one, so the null is, if anything, a little wider than the truth: the rule
    errs towards not flagging.

    Returns ``threshold`` (None with a ``note`` when the reference has fewer than
    ``min_subjects`` subjects: nothing to split), the null's quantile and median, and what it
    was derived from (splits used, subjects, images per side)."""
    reference = np.asarray(reference, float)
    n = len(reference)
    subj, lab = _ids(subjects, n), _ids(labels, n)
    named = sorted(set(subj) - {""})
    base = {"threshold": None, "n_splits": 0, "quantile": quantile, "margin": margin,
            "n_subjects": len(named), "min_subjects": min_subjects}
    if len(named) < min_subjects:
        return {**base, "note": f"the reference has {len(named)} subject(s), fewer than "
                                f"validation.drift_calibration_min_subjects={min_subjects}: "
                                f"no subject split to calibrate on"}
    rows_of = {s_: np.flatnonzero(subj == s_) for s_ in named}
    strata: dict[str, list[str]] = {}
    for s_ in named:
        strata.setdefault(str(lab[rows_of[s_][0]]), []).append(s_)
    loose = np.flatnonzero(subj == "")
    batch = [b for b in _ids(batch_labels, len(batch_labels)) if b] \
        if batch_labels is not None else []
    image_shares = {c: v / len(batch) for c, v in pd.Series(batch).value_counts().items()
                    if c in strata} if batch else {}
    subject_shares = (image_shares or {c: len(m) / len(named) for c, m in strata.items()})
    k = max(1, min(batch_subjects or math.ceil(len(named) / 2), len(named) // 2))
    rng = np.random.default_rng(seed)
    null, sides, drawn = [], [], []
    for _ in range(n_splits):
        picked = np.zeros(n, dtype=bool)
        took = 0
        for label, members in strata.items():
            cap = len(members) - 1 if len(members) > 1 else len(members)
            want = min(cap, _stochastic_round(rng, k * subject_shares.get(label, 0.0)))
            for i in rng.permutation(len(members))[:want]:
                picked[rows_of[members[i]]] = True
            took += want
        if took == 0:  # every share rounded to nothing: one subject of a label that has two
            members = strata[rng.choice([c for c, m in strata.items() if len(m) > 1])] \
                if any(len(m) > 1 for m in strata.values()) else named
            picked[rows_of[members[rng.integers(len(members))]]] = True
            took = 1
        picked[loose[rng.random(len(loose)) < k / len(named)]] = True
        b_rows = _batch_side(rng, np.flatnonzero(picked), lab, n_batch, image_shares)
        a_rows = np.flatnonzero(~picked)
        if len(a_rows) < 2 or len(b_rows) < 2:
            continue
        null.append(_score_at(reference[a_rows], reference[b_rows], names, (n, n_batch)))
        sides.append((len(a_rows), len(b_rows)))
        drawn.append(took)
    if not null:
        return {**base, "note": "no subject split left two images a side: nothing to "
                                "calibrate on"}
    q = float(np.quantile(null, quantile))
    ref_side, batch_side = np.mean(sides, axis=0)
    return {**base, "threshold": q * margin, "null_quantile": q,
            "null_median": float(np.median(null)), "n_splits": len(null),
            "split_subjects": round(float(np.mean(drawn)), 2),
            "split_images": [round(float(ref_side), 1), round(float(batch_side), 1)],
            "note": (f"{quantile:g} quantile of MMD² between subject-disjoint sides of the "
                     f"reference ({len(null)} seeded splits of its {len(named)} subjects: "
                     f"{np.mean(drawn):.1f} new subjects, {batch_side:.0f} images, against the "
                     f"other {ref_side:.0f} images) x margin {margin:g}")}


@dataclass
class DriftResult:
    """What the steward report, the GX suite and MLflow are told about one batch."""

    status: str  # "measured" | "no_reference" | "unavailable"
    threshold: float
    score: float | None = None
    p_value: float | None = None
    drifted: bool = False
    reference: str = ""  # e.g. "leukemia-classifier v3, dataset version 2 (train split)"
    n_reference: int = 0
    n_batch: int = 0
    top_shifts: dict[str, float] = field(default_factory=dict)  # the 5 largest |shift|
    note: str = ""
    # how ``threshold`` was set: "calibrated" (on the reference's own subjects, never below
    # validation.drift_threshold), "fixed" (validation.drift_threshold_mode) or
    # "fixed_fallback" (too few subjects to calibrate on; ``calibration["note"]`` says why)
    threshold_mode: str = "fixed"
    calibration: dict[str, Any] = field(default_factory=dict)  # calibrated_threshold's answer
    # the champion's own embedding (validation.drift_embedding; cells only, a TF child process)
    embedding_score: float | None = None
    embedding_p_value: float | None = None
    embedding_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FAMILY_OF_KIND = {"cell": "classifier", "field": "detector"}


def _reference_paths(cfg: Config, kind: str
                     ) -> tuple[pd.DataFrame, str, str, str] | None:
    """A seeded sample of the champion's training rows of ``kind`` (``path`` local,
    ``subject_id``, ``label``) and what they are; None when that family has no champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.data.dataset import load_manifest, materialize
    from training.families import get_family
    from training.tracking import configure_mlflow

    name = get_family(_FAMILY_OF_KIND[kind]).registered_name(cfg)
    configure_mlflow(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None  # no such model or alias: nothing was promoted yet
        raise
    version, tags = str(mv.version), mv.tags
    data_version = tags.get("dataset_version")
    if not data_version:
        return None
    df, _ = load_manifest(cfg, int(data_version))
    rows = df[(df["split"] == "train") & (df["kind"] == kind)]
    n = cfg.validation.drift_reference_images
    if len(rows) > n:
        rows = rows.sample(n=n, random_state=0)
    rows = materialize(cfg, rows, cfg.home / "cache")
    return _id_columns(rows), (f"{name} v{version}, dataset version {data_version} "
                                f"(train split, {len(rows)} images)"), name, version


def _embedding_drift(cfg: Config, name: str, version: str, reference: list[str],
                     batch: list[str]) -> dict[str, Any]:
    """MMD² of the champion classifier's penultimate-layer features, in a child process."""
    import subprocess
    import sys
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="drift-", dir=cfg.state_dir) as tmp:
        work = Path(tmp)
        model_dir = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(work / "model"))
        (work / "ref.txt").write_text("\n".join(reference))
        (work / "batch.txt").write_text("\n".join(batch))
        proc = subprocess.run(
            [sys.executable, "-m", "training.classifier.embedding", "--model-dir", model_dir,
             "--reference", str(work / "ref.txt"), "--batch", str(work / "batch.txt"),
             "--permutations", str(cfg.validation.drift_permutations),
             "--out", str(work / "out.json")],
            capture_output=True, text=True, timeout=cfg.pipeline.task_timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"embedding child exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-500:]}")
        import json

        return json.loads((work / "out.json").read_text())


def _id_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """``path``, ``subject_id`` and ``label`` of rows, ``""`` where a row has none."""
    out = rows[["path"]].copy()
    for col in ("subject_id", "label"):
        out[col] = (rows[col].fillna("").astype(str).str.strip() if col in rows
                    else pd.Series("", index=rows.index))
    return out.reset_index(drop=True)


def _features_of(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """:func:`_features` of the readable files of ``rows`` (``path``), and those rows."""
    feats, kept = [], []
    for i, p in enumerate(rows["path"]):
        try:
            feats.append(image_features(p))
            kept.append(i)
        except (OSError, ValueError) as exc:  # the suite reports unreadable files itself
            log.debug("drift: skipping %s: %s", p, exc)
    return (np.array(feats, dtype=np.float64).reshape(-1, len(FEATURES)),
            rows.iloc[kept].reset_index(drop=True))


def threshold_for(cfg: Config, reference: np.ndarray, subjects: Any, labels: Any = None, *,
                  n_batch: int, batch_subjects: int = 0, batch_labels: Any = None,
                  names: list[str] | None = FEATURES) -> tuple[float, str, dict[str, Any]]:
    """The batch's threshold, its mode (see :class:`DriftResult`) and how it was derived."""
    v = cfg.validation
    if v.drift_threshold_mode == "fixed":
        return v.drift_threshold, "fixed", {}
    cal = calibrated_threshold(reference, subjects, labels, n_batch=n_batch,
                               batch_subjects=batch_subjects, batch_labels=batch_labels,
                               n_splits=v.drift_calibration_splits,
                               quantile=v.drift_calibration_quantile,
                               margin=v.drift_calibration_margin,
                               min_subjects=v.drift_calibration_min_subjects, names=names)
    cal["floor"] = v.drift_threshold
    if cal["threshold"] is None:
        return v.drift_threshold, "fixed_fallback", cal
    return max(v.drift_threshold, cal["threshold"]), "calibrated", cal


def batch_drift(cfg: Config, root: Path, frame: pd.DataFrame) -> DriftResult:
    """Drift of the decodable images of a batch (``frame``: the metadata frame, paths relative
    to ``root``) against the champion of their kind. Never raises: an unavailable reference
    (no champion, registry down) is a status with a note, not an ingest failure."""
    threshold = cfg.validation.drift_threshold
    ok = frame[frame["decodable"].fillna(False).astype(bool)]
    kinds = ok["kind"].value_counts()
    if kinds.empty or kinds.index[0] not in _FAMILY_OF_KIND:
        return DriftResult("no_reference", threshold, note="no decodable cell or field images")
    kind = str(kinds.index[0])
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # no tracking database, so no registry and no champion: skip importing MLflow at all
        return DriftResult("no_reference", threshold,
                           note=f"no {_FAMILY_OF_KIND[kind]} champion to compare with yet")
    try:
        ref = _reference_paths(cfg, kind)
        if ref is None:
            return DriftResult("no_reference", threshold,
                               note=f"no {_FAMILY_OF_KIND[kind]} champion to compare with yet")
        ref_rows, described, name, version = ref
        mine = _id_columns(ok[ok["kind"] == kind])
        mine["path"] = [str(Path(root) / p) for p in mine["path"]]
        reference, ref_rows = _features_of(ref_rows)
        batch, mine = _features_of(mine)
        out = drift_score(reference, batch, n_permutations=cfg.validation.drift_permutations)
        threshold, mode, calibration = threshold_for(
            cfg, reference, ref_rows["subject_id"], ref_rows["label"], n_batch=len(batch),
            batch_subjects=len(set(mine["subject_id"]) - {""}), batch_labels=mine["label"])
    except Exception as exc:  # noqa: BLE001 - drift is advice: never let it sink an ingest
        log.warning("drift of the batch could not be measured: %s", exc)
        return DriftResult("unavailable", threshold, note=f"{type(exc).__name__}: {exc}"[:500])
    top = dict(sorted(out["shift"].items(), key=lambda kv: -abs(kv[1]))[:5])
    result = DriftResult("measured", threshold, score=out["score"], p_value=out["p_value"],
                         drifted=out["score"] > threshold, reference=described,
                         n_reference=out["n_reference"], n_batch=out["n_batch"], top_shifts=top,
                         threshold_mode=mode, calibration=calibration,
                         note=calibration.get("note", "") if mode == "fixed_fallback" else "")
    if not cfg.validation.drift_embedding or kind != "cell":
        result.embedding_note = ("off (validation.drift_embedding)" if kind == "cell" else
                                 "cells only")
        return result
    try:
        emb = _embedding_drift(cfg, name, version, list(ref_rows["path"]), list(mine["path"]))
        result.embedding_score, result.embedding_p_value = emb["score"], emb["p_value"]
        result.embedding_note = f"{emb['dimensions']}-d penultimate layer of {name} v{version}"
    except Exception as exc:  # noqa: BLE001 - advice again: the statistics still stand
        log.warning("embedding drift of the batch could not be measured: %s", exc)
        result.embedding_note = f"unavailable: {type(exc).__name__}: {exc}"[:500]
    return result


def log_drift(cfg: Config, batch_id: str, drift: DriftResult) -> str | None:
    """One MLflow run per measured batch (``run_kind=drift``): score, p-value, shifts."""
    import mlflow

    from training.tracking import configure_mlflow

    if drift.status != "measured":
        return None
    try:
        experiment_id = configure_mlflow(cfg)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{batch_id}",
                              tags={"run_kind": "drift", "batch_id": batch_id,
                                    "drift_reference": drift.reference,
                                    "drifted": str(drift.drifted)}) as run:
            cal = drift.calibration
            mlflow.log_params({
                "drift_threshold": drift.threshold, "drift_threshold_mode": drift.threshold_mode,
                "n_reference": drift.n_reference, "n_batch": drift.n_batch,
                **{f"drift_calibration.{k}": cal[k] for k in (
                    "n_splits", "quantile", "margin", "n_subjects", "floor")
                   if cal.get(k) is not None}})
            if drift.embedding_score is not None:
                mlflow.log_metrics({"drift_embedding_score": drift.embedding_score,
                                    "drift_embedding_p_value": float(drift.embedding_p_value)})
            if cal.get("null_quantile") is not None:
                mlflow.log_metrics({"drift_calibration_null_quantile": cal["null_quantile"],
                                    "drift_calibration_null_median": cal["null_median"]})
            mlflow.log_metrics({"drift_score": float(drift.score or 0.0),
                                "drift_p_value": float(drift.p_value or 1.0),
                                **{f"drift_shift.{k}": v for k, v in drift.top_shifts.items()}})
            return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the report still has it
        log.warning("drift of batch %s not logged to MLflow: %s", batch_id, exc)
        return None
