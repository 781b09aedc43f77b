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

The GX suite carries the score as a batch-level **warning** (``drift``, threshold
``validation.drift_threshold``): a drifted batch is reported to the steward, in the report and
in MLflow, never quarantined or rejected for it — another lab's images are exactly what a
platform must be able to take in, and judge.
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

__all__ = ["FEATURES", "DriftResult", "batch_drift", "drift_score", "image_features"]

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
    rows = []
    for p in paths:
        try:
            rows.append(image_features(p))
        except (OSError, ValueError) as exc:  # the suite reports unreadable files itself
            log.debug("drift: skipping %s: %s", p, exc)
    return np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES))


def _mmd2(k: np.ndarray, n_ref: int) -> float:
    """Biased MMD² estimate from the pooled kernel matrix (reference rows first)."""
    a, b = k[:n_ref, :n_ref], k[n_ref:, n_ref:]
    return float(a.mean() + b.mean() - 2 * k[:n_ref, n_ref:].mean())


def drift_score(reference: np.ndarray, batch: np.ndarray, *, n_permutations: int = 200,
                seed: int = 0, names: list[str] | None = FEATURES) -> dict[str, Any]:
    """MMD² between feature rows of the reference and the batch, its permutation p-value and
    the standardised mean shift of every feature (``shift.<feature>``, in reference SDs).

    ``names``: the columns (default :data:`FEATURES`); None for unnamed features such as an
    embedding (then no per-feature shifts are returned)."""
    reference, batch = np.asarray(reference, float), np.asarray(batch, float)
    if len(reference) < 2 or len(batch) < 2:
        raise ValueError(f"need at least 2 images a side, got {len(reference)} reference and "
                         f"{len(batch)} batch images")
    mean = reference.mean(axis=0)
    floor = np.array([_STD_FLOOR.get(f, 1e-3) for f in names] if names else 1e-3)
    std = np.maximum(reference.std(axis=0), floor)
    pooled = (np.vstack([reference, batch]) - mean) / std
    sq = np.square(pooled).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    off = d2[~np.eye(len(d2), dtype=bool)]
    bandwidth = float(np.median(off)) or 1.0
    k = np.exp(-d2 / bandwidth)
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
    # the champion's own embedding (validation.drift_embedding; cells only, a TF child process)
    embedding_score: float | None = None
    embedding_p_value: float | None = None
    embedding_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FAMILY_OF_KIND = {"cell": "classifier", "field": "detector"}


def _reference_paths(cfg: Config, kind: str) -> tuple[list[str], str, str, str] | None:
    """Local paths of a seeded sample of the champion's training rows of ``kind``, and what
    they are; None when that family has no champion (yet)."""
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
    return list(rows["path"]), (f"{name} v{version}, dataset version {data_version} "
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
        ref_paths, described, name, version = ref
        batch_paths = [str(Path(root) / p) for p in ok.loc[ok["kind"] == kind, "path"]]
        reference = _features(ref_paths)
        batch = _features(batch_paths)
        out = drift_score(reference, batch, n_permutations=cfg.validation.drift_permutations)
    except Exception as exc:  # noqa: BLE001 - drift is advice: never let it sink an ingest
        log.warning("drift of the batch could not be measured: %s", exc)
        return DriftResult("unavailable", threshold, note=f"{type(exc).__name__}: {exc}"[:500])
    top = dict(sorted(out["shift"].items(), key=lambda kv: -abs(kv[1]))[:5])
    result = DriftResult("measured", threshold, score=out["score"], p_value=out["p_value"],
                         drifted=out["score"] > threshold, reference=described,
                         n_reference=out["n_reference"], n_batch=out["n_batch"], top_shifts=top)
    if not cfg.validation.drift_embedding or kind != "cell":
        result.embedding_note = ("off (validation.drift_embedding)" if kind == "cell" else
                                 "cells only")
        return result
    try:
        emb = _embedding_drift(cfg, name, version, ref_paths, batch_paths)
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
            mlflow.log_params({"drift_threshold": drift.threshold,
                               "n_reference": drift.n_reference, "n_batch": drift.n_batch})
            if drift.embedding_score is not None:
                mlflow.log_metrics({"drift_embedding_score": drift.embedding_score,
                                    "drift_embedding_p_value": float(drift.embedding_p_value)})
            mlflow.log_metrics({"drift_score": float(drift.score or 0.0),
                                "drift_p_value": float(drift.p_value or 1.0),
                                **{f"drift_shift.{k}": v for k, v in drift.top_shifts.items()}})
            return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the report still has it
        log.warning("drift of batch %s not logged to MLflow: %s", batch_id, exc)
        return None
