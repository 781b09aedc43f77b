"""Uncertainty of detector metrics: bootstrap 95 % CIs over test images, and the paired test.

Ultralytics reports one mAP50 for the test fields and no interval; with a few dozen fields the
number moves a lot from one draw of fields to another. Here every test image's predictions are
matched to its labelled boxes once - by Ultralytics' validator itself in training
(:func:`from_matched`), or by :func:`match_image` (IoU >= threshold, greedy by confidence, per
class, as VOC/COCO do) for predictions from elsewhere - then images are resampled with
replacement and the metrics are recomputed from the pooled matches of each resample (101-point
interpolated precision, averaged over the classes that have labelled boxes; the same integral
as Ultralytics', so perfect detections score 0.995). The
gate reads ``map50_ci_low`` / ``map50_ci_high`` like the classifier's CIs.

The same matches, kept at the ten COCO IoU thresholds 0.50:0.95, give every metric the gate may
read (:data:`DETECTION_METRICS`: mAP50, mAP50-95, and precision and recall at the confidence
that maximises the mean F1, as Ultralytics picks it) and :func:`detection_intervals` resamples
images for all of them at once. :func:`paired_detection_delta` is the detector's twin of the
classifier's paired test (``training.evaluation.metrics.paired_bootstrap_delta``): candidate and
champion matched on the SAME test images, each resample draws images once and scores both, so
the interval is that of the difference itself; the gate reads ``paired_<metric>_delta*``.
Only numpy: the predictions come from the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.boxes import box_iou

__all__ = [
    "DETECTION_METRICS", "ImageMatches", "ap50", "bootstrap_map50", "detection_intervals",
    "detection_scores", "from_matched", "match_image", "paired_detection_delta",
    "save_detection_comparison",
]

IOU = 0.5
IOUS = np.linspace(0.5, 0.95, 10)  # COCO's thresholds: mAP50-95 averages AP over them
DETECTION_METRICS = ("precision", "recall", "map50", "map50_95")
CI_LEVEL = 0.95


@dataclass(frozen=True)
class ImageMatches:
    """One image's detections, judged: per class, (confidence, is-true-positive) and #labels."""

    scores: dict[int, np.ndarray]
    true_positive: dict[int, np.ndarray]  # at IoU 0.5
    n_labels: dict[int, int]
    # per class, (n predictions, 10): true positive at each of IOUS (column 0 = true_positive)
    true_positive_iou: dict[int, np.ndarray] | None = None


def match_image(pred_boxes: np.ndarray, pred_cls: np.ndarray, pred_conf: np.ndarray,
                true_boxes: np.ndarray, true_cls: np.ndarray) -> ImageMatches:
    """Greedy matching by confidence: a prediction is a true positive when it overlaps a
    still-unmatched labelled box of its class with IoU >= the threshold (0.5, and each of
    :data:`IOUS` for mAP50-95). Boxes are ``x1 y1 x2 y2``."""
    pred_boxes, true_boxes = np.asarray(pred_boxes, float), np.asarray(true_boxes, float)
    pred_cls, true_cls = np.asarray(pred_cls, int), np.asarray(true_cls, int)
    pred_conf = np.asarray(pred_conf, float)
    scores, tps, tps_iou, n_labels = {}, {}, {}, {}
    for c in set(pred_cls.tolist()) | set(true_cls.tolist()):
        truth = true_boxes[true_cls == c]
        idx = np.flatnonzero(pred_cls == c)
        idx = idx[np.argsort(-pred_conf[idx], kind="stable")]
        tp = np.zeros((len(idx), len(IOUS)), dtype=bool)
        if len(truth) and len(idx):
            overlaps = np.stack([box_iou(pred_boxes[i], truth) for i in idx])
            for t, threshold in enumerate(IOUS):
                used = np.zeros(len(truth), dtype=bool)
                for k in range(len(idx)):
                    overlap = np.where(used, -1.0, overlaps[k])
                    j = int(np.argmax(overlap))
                    if overlap[j] >= threshold:
                        used[j], tp[k, t] = True, True
        scores[c], tps[c], tps_iou[c], n_labels[c] = pred_conf[idx], tp[:, 0], tp, len(truth)
    return ImageMatches(scores, tps, n_labels, tps_iou)


def from_matched(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray,
                 true_cls: np.ndarray) -> ImageMatches:
    """One image's matches as a validator already judged them: ``tp`` (n predictions, 10) at
    :data:`IOUS`, their confidences and classes, and the labelled boxes' classes. The trainer
    takes them from Ultralytics' own validation, so the metrics recomputed here from all images
    equal the ones it reports, and the bootstrap resamples exactly those."""
    tp = np.asarray(tp, bool).reshape(-1, len(IOUS))
    conf, pred_cls = np.asarray(conf, float).ravel(), np.asarray(pred_cls).astype(int).ravel()
    true_cls = np.asarray(true_cls).astype(int).ravel()
    scores, tps, tps_iou, n_labels = {}, {}, {}, {}
    for c in set(pred_cls.tolist()) | set(true_cls.tolist()):
        idx = np.flatnonzero(pred_cls == c)
        idx = idx[np.argsort(-conf[idx], kind="stable")]
        scores[c], tps[c], tps_iou[c] = conf[idx], tp[idx, 0], tp[idx]
        n_labels[c] = int((true_cls == c).sum())
    return ImageMatches(scores, tps, n_labels, tps_iou)


def ap50(images: Sequence[ImageMatches]) -> float:
    """mAP50 over the classes with labelled boxes in ``images`` (nan when there are none)."""
    classes = {c for im in images for c, n in im.n_labels.items() if n}
    aps = []
    for c in classes:
        n = sum(im.n_labels.get(c, 0) for im in images)
        conf = np.concatenate([im.scores.get(c, np.empty(0)) for im in images])
        tp = np.concatenate([im.true_positive.get(c, np.empty(0, bool)) for im in images])
        order = np.argsort(-conf, kind="stable")
        tp_cum = np.cumsum(tp[order])
        fp_cum = np.cumsum(~tp[order])
        aps.append(_ap(tp_cum / n, tp_cum / np.maximum(tp_cum + fp_cum, 1e-12)))
    return float(np.mean(aps)) if aps else math.nan


def bootstrap_map50(images: Sequence[ImageMatches], n: int = 1000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(mAP50, CI low, CI high): the percentile 95 % interval over image resamples."""
    point = ap50(images)
    rng = np.random.default_rng(seed)
    values = [ap50([images[i] for i in rng.integers(0, len(images), len(images))])
              for _ in range(n)] if images else []
    values = np.array([v for v in values if math.isfinite(v)])
    if values.size == 0:
        return point, math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)


def _smooth(y: np.ndarray, f: float = 0.1) -> np.ndarray:
    """Box filter of fraction ``f`` (Ultralytics' ``smooth``, used to pick the F1 peak)."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    return np.convolve(np.concatenate((pad * y[0], y, pad * y[-1])), np.ones(nf) / nf, "valid")


def _pooled(images: Sequence[ImageMatches], c: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(#labels, confidences sorted descending, their (n, 10) true-positive matrix)."""
    n = sum(im.n_labels.get(c, 0) for im in images)
    conf = np.concatenate([im.scores.get(c, np.empty(0)) for im in images])
    tp = np.concatenate([
        (im.true_positive_iou or {}).get(c, np.zeros((len(im.scores.get(c, ())), len(IOUS)),
                                                     bool)) for im in images])
    order = np.argsort(-conf, kind="stable")
    return n, conf[order], tp[order]


def _ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """101-point interpolated AP of one precision/recall curve, with Ultralytics' (8.4)
    sentinels: precision falls to 0 right after the last recall reached, then recall 1."""
    last = recall[-1] if len(recall) else 1.0
    recall = np.concatenate([[0.0], recall, [last], [1.0]])
    precision = np.concatenate([[1.0], precision, [0.0], [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    grid = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(grid, recall, precision), grid))


def detection_scores(images: Sequence[ImageMatches]) -> dict[str, float]:
    """mAP50, mAP50-95, and precision and recall at the confidence of the highest (smoothed)
    mean F1 over classes, as Ultralytics reports them; nan where no class has labels.

    Every class with labelled boxes in ``images`` counts (a class never found scores 0).
    """
    classes = sorted({c for im in images for c, n in im.n_labels.items() if n})
    if not classes:
        return dict.fromkeys(DETECTION_METRICS, math.nan)
    grid = np.linspace(0, 1, 1000)
    aps = np.zeros((len(classes), len(IOUS)))
    p_curve, r_curve = np.zeros((len(classes), 1000)), np.zeros((len(classes), 1000))
    for k, c in enumerate(classes):
        n, conf, tp = _pooled(images, c)
        if len(conf) == 0:
            continue
        tp_cum = np.cumsum(tp, axis=0)
        fp_cum = np.cumsum(~tp, axis=0)
        recall = tp_cum / n
        precision = tp_cum / np.maximum(tp_cum + fp_cum, 1e-12)
        r_curve[k] = np.interp(-grid, -conf, recall[:, 0], left=0)
        p_curve[k] = np.interp(-grid, -conf, precision[:, 0], left=1)
        aps[k] = [_ap(recall[:, t], precision[:, t]) for t in range(len(IOUS))]
    f1 = 2 * p_curve * r_curve / np.maximum(p_curve + r_curve, 1e-16)
    best = int(_smooth(f1.mean(axis=0)).argmax())
    return {"precision": float(p_curve[:, best].mean()), "recall": float(r_curve[:, best].mean()),
            "map50": float(aps[:, 0].mean()), "map50_95": float(aps.mean())}


def _ci(values: list[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if math.isfinite(v)])
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def detection_intervals(images: Sequence[ImageMatches], n: int = 1000,
                        seed: int = 0) -> dict[str, float]:
    """Every metric of :func:`detection_scores` recomputed from the matches
    (``<metric>_image_level``) with its percentile 95 % CI over image resamples
    (``<metric>_ci_low`` / ``<metric>_ci_high``), and ``n_test_images``."""
    point = detection_scores(images)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in DETECTION_METRICS}
    for _ in range(n if images else 0):
        sample = detection_scores([images[i] for i in rng.integers(0, len(images), len(images))])
        for m in DETECTION_METRICS:
            draws[m].append(sample[m])
    out = {"n_test_images": float(len(images))}
    for m in DETECTION_METRICS:
        low, high = _ci(draws[m])
        out.update({f"{m}_image_level": point[m], f"{m}_ci_low": low, f"{m}_ci_high": high})
    return out


def paired_detection_delta(metric: str, candidate: Sequence[ImageMatches],
                           champion: Sequence[ImageMatches], n: int = 1000,
                           seed: int = 0) -> dict[str, float]:
    """Candidate minus champion on the SAME test images: the difference of ``metric`` and its
    95 % CI, each resample drawing images once and scoring both on them (the keys of
    ``paired_bootstrap_delta``: delta, delta_ci_low, delta_ci_high, n_units)."""
    if metric not in DETECTION_METRICS:
        raise ValueError(f"no paired test for detector metric {metric!r}: "
                         f"choose one of {DETECTION_METRICS}")
    if len(candidate) != len(champion):
        raise ValueError("candidate and champion matches must cover the same test images")
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n if candidate else 0):
        pick = rng.integers(0, len(candidate), len(candidate))
        deltas.append(detection_scores([candidate[i] for i in pick])[metric]
                      - detection_scores([champion[i] for i in pick])[metric])
    low, high = _ci(deltas)
    return {"delta": detection_scores(candidate)[metric] - detection_scores(champion)[metric],
            "delta_ci_low": low, "delta_ci_high": high, "n_units": float(len(candidate))}


def _detection_columns(rows: list[dict]) -> list[str]:
    """The detector table's columns: overall metrics with CIs, validation, per class, cost."""
    keys = {k for r in rows for k in (r.get("metrics") or r)}
    per_class = sorted(k for k in keys if "__" in k and k.split("__")[0] in DETECTION_METRICS)
    overall = [c for m in DETECTION_METRICS for c in (m, f"{m}_ci_low", f"{m}_ci_high")]
    return ["architecture", "split_kind", *overall, *(f"val/{m}" for m in DETECTION_METRICS),
            *per_class, "total_params", "trainable_params", "train_time_s", "latency_ms",
            "n_test_images"]


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, spec)


def save_detection_comparison(rows: list[dict], out_dir: Path) -> list[Path]:
    """The papers' detector table across architectures (Candidate-like rows), logged beside the
    classifier's: ``detector_comparison.csv`` (every column), ``.md`` and ``.png`` (mAP50 and
    mAP50-95 with their bootstrap CIs over test images). Built by the classifier's
    :func:`~training.evaluation.metrics.comparison_table` with the detector's columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from training.evaluation.metrics import comparison_table

    df = comparison_table(rows, columns=_detection_columns(rows))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "detector_comparison.csv", out_dir / "detector_comparison.md"
    df.to_csv(csv_path, index=False)

    def with_ci(r: dict, m: str) -> str:
        text = _cell(r[m], ".4f")
        if math.isfinite(r[f"{m}_ci_low"]):
            text += f" [{r[f'{m}_ci_low']:.3f}, {r[f'{m}_ci_high']:.3f}]"
        return text

    header = ["Architecture", "Split", "Precision", "Recall", "mAP50 [95% CI]",
              "mAP50-95 [95% CI]", "val mAP50", "Params", "Train time (s)", "Latency (ms)",
              "n test"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in df.to_dict("records"):
        lines.append("| " + " | ".join([
            str(r["architecture"]), str(r["split_kind"]), with_ci(r, "precision"),
            with_ci(r, "recall"), with_ci(r, "map50"), with_ci(r, "map50_95"),
            _cell(r["val/map50"], ".4f"), _cell(r["total_params"], ",.0f"),
            _cell(r["train_time_s"], ".1f"), _cell(r["latency_ms"], ".1f"),
            _cell(r["n_test_images"], ".0f")]) + " |")
    per_class = [c for c in df.columns if "__" in c]
    if per_class:
        classes = sorted({c.split("__", 1)[1] for c in per_class})
        lines += ["", "Per class (test): mAP50 / mAP50-95 / precision / recall", "",
                  "| Architecture | " + " | ".join(classes) + " |",
                  "|---|" + "|".join("---" for _ in classes) + "|"]
        order = ("map50", "map50_95", "precision", "recall")
        for r in df.to_dict("records"):
            lines.append(f"| {r['architecture']} | " + " | ".join(
                " / ".join(_cell(r.get(f"{m}__{c}"), ".3f") for m in order)
                for c in classes) + " |")
    md_path.write_text("\n".join(lines) + "\n\nIntervals: percentile bootstrap 95 % CIs over "
                       "test images. Precision and recall at the confidence of the highest "
                       "mean F1 (Ultralytics). Latency: one image at a time, this machine.\n")

    fig = Figure(figsize=(max(5.0, 1.4 * len(df) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(df))
    for offset, m, colour in ((-0.2, "map50", "tab:blue"), (0.2, "map50_95", "tab:orange")):
        v = df[m].to_numpy(dtype=float)
        err = [np.nan_to_num(v - df[f"{m}_ci_low"].to_numpy(dtype=float)),
               np.nan_to_num(df[f"{m}_ci_high"].to_numpy(dtype=float) - v)]
        ax.bar(x + offset, np.nan_to_num(v), 0.4, yerr=err, capsize=4, color=colour,
               edgecolor="black", linewidth=0.5, label=m.replace("map", "mAP").replace("_", "-"))
    ax.set_xticks(x, labels=[str(a) for a in df["architecture"]])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Test score (95 % bootstrap CI over images)")
    ax.set_title("Detector comparison")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    png = out_dir / "detector_comparison.png"
    FigureCanvasAgg(fig)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    return [csv_path, md_path, png]
