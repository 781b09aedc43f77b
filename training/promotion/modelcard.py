"""Model cards (Mitchell et al., FAT* 2019) from what the pipeline measured.

:func:`build_card` reads one registered version from the MLflow registry: the version's tags
(gate decision and reasons), its run's logged metrics, params and tags (lineage), the run's
``predictions/test.csv`` (per-class bootstrap CIs and calibration: expected calibration error
and a reliability diagram) and the curated manifest of the run's dataset version (images and
subjects per split and class). No figure on a card is typed in: every number is either a
logged metric copied as it is or computed here from the logged per-image predictions, and the
card says which.

:func:`log_card` renders the card as markdown, self-contained HTML (inline SVG, no external
files) and JSON, logs them under ``model_card/`` on the version's run and tags the version
``model_card`` with the artifact path. The promote stage calls it for every version it
registers; the web app shows the HTML.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config
from training.families import family_of_model

__all__ = [
    "CARD_DIR", "build_card", "expected_calibration_error", "log_card", "per_class_cis",
    "reliability_bins", "render_html", "render_markdown", "reliability_svg",
]

log = logging.getLogger("leukoflow.modelcard")

CARD_DIR = "model_card"
ECE_BINS = 10
FEW_SUBJECTS = 10  # fewer distinct test donors of a class than this is a stated limitation
WIDE_CI = 0.10  # a 95 % CI wider than this on the gated metric is a stated limitation
POOR_ECE = 0.05
COST_METRICS = ("total_params", "trainable_params", "train_time_s", "latency_ms_per_image")
N_BOOT = 1000


# ------------------------------------------------------------------------ measurements
def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy of each non-empty bin."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                        "count": int(mask.sum()), "confidence": float(confidence[mask].mean()),
                        "accuracy": float(correct[mask].mean())})
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               n_bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by bin share."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return math.nan
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins))


def per_class_cis(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                  n_boot: int = N_BOOT, seed: int = 0,
                  groups: np.ndarray | None = None) -> dict[str, list[tuple[float, float]]]:
    """Percentile 95 % bootstrap CIs of per-class precision, recall and F1: rows resampled,
    or whole subjects when ``groups`` (one subject id per row) is given; stratified by class."""
    from training.evaluation.metrics import _percentile_ci, _resample_weights

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = n_classes
    onehot = np.zeros((len(y_true), k * k))
    onehot[np.arange(len(y_true)), y_true * k + y_pred] = 1.0
    vals: dict[str, list[np.ndarray]] = {"precision": [], "recall": [], "f1": []}
    for w in _resample_weights(y_true, groups, n_boot, seed):
        cm = (w @ onehot).reshape(-1, k, k)
        tp = np.einsum("bii->bi", cm)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            vals["recall"].append(np.where(support > 0, tp / np.maximum(support, 1), np.nan))
            vals["precision"].append(np.where(predicted > 0, tp / np.maximum(predicted, 1),
                                              np.nan))
            denom = support + predicted
            vals["f1"].append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan))
    out: dict[str, list[tuple[float, float]]] = {}
    for name, chunks in vals.items():
        mat = np.concatenate(chunks)  # (n_boot, k)
        out[name] = [_percentile_ci(mat[:, j]) for j in range(k)]
    return out


def _key(cls: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", str(cls))


def _predictions_section(pred: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Per-class CIs and calibration from the logged per-image test predictions."""
    cols = [f"p_{c}" for c in classes]
    missing = [c for c in cols + ["label"] if c not in pred.columns]
    if missing:
        return {"error": f"predictions/test.csv lacks columns {missing}"}
    prob = pred[cols].to_numpy(dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    y_true = pred["label"].astype(str).map(index).to_numpy()
    if np.isnan(y_true.astype(np.float64)).any():
        return {"error": "predictions/test.csv holds labels outside the model's classes"}
    y_true = y_true.astype(np.int64)
    y_pred = prob.argmax(axis=1)
    confidence = prob.max(axis=1)
    correct = (y_pred == y_true).astype(np.float64)
    from training.evaluation.metrics import subject_groups

    groups = subject_groups(pred)
    cis = per_class_cis(y_true, y_pred, len(classes), groups=groups)
    return {
        "n_rows": len(pred),
        "ci_unit": "subjects" if groups is not None else "test images",
        "per_class_ci": {c: {m: list(cis[m][j]) for m in cis} for j, c in enumerate(classes)},
        "ece": expected_calibration_error(confidence, correct),
        "ece_bins": ECE_BINS,
        "reliability": reliability_bins(confidence, correct),
        "mean_confidence": float(confidence.mean()),
        "accuracy": float(correct.mean()),
    }


def _data_section(cfg: Config, kind: str, dataset_version: int | None) -> dict[str, Any]:
    """Images and distinct subjects per split and class in the version's curated manifest."""
    from training.data.dataset import load_manifest

    if dataset_version is None:
        return {"error": "the run names no dataset_version"}
    try:
        manifest, ds = load_manifest(cfg, dataset_version)
    except Exception as exc:  # noqa: BLE001 - a card without this section is still a card
        return {"error": f"manifest version {dataset_version} not readable: {exc}"}
    rows = manifest[manifest["kind"] == kind].copy()
    rows["subject_id"] = rows["subject_id"].fillna("").astype(str).str.strip()
    rows["label"] = rows["label"].fillna("").astype(str)
    table = []
    for (split, label), grp in rows.groupby(["split", "label"], sort=True):
        table.append({"split": str(split), "label": label or "(fields)", "images": len(grp),
                      "subjects": int(grp.loc[grp["subject_id"] != "", "subject_id"].nunique()),
                      "without_subject": int((grp["subject_id"] == "").sum())})
    return {"manifest_version": ds.version, "manifest_sha256": ds.manifest_sha256,
            "manifest_uri": ds.manifest_uri, "batch_ids": list(ds.batch_ids), "kind": kind,
            "per_split_class": table}


# ---------------------------------------------------------------------------- the card
def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _metric_rows(metrics: dict[str, float], classes: list[str],
                 pred: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(overall rows, per-class rows): the logged test metrics, CIs where they exist."""
    test = {k: v for k, v in metrics.items()
            if "/" not in k and not k.endswith(("_ci_low", "_ci_high"))}
    overall = []
    for name in sorted(k for k in test if "__" not in k and k not in COST_METRICS):
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        overall.append({"metric": name, "value": test[name], "ci_low": low, "ci_high": high,
                        "ci_source": "logged" if low is not None else None,
                        "cell_ci_low": metrics.get(f"{name}_cell_ci_low"),
                        "cell_ci_high": metrics.get(f"{name}_cell_ci_high")})
    per_class = []
    known = {_key(c): c for c in classes}
    suffixes = sorted({k.split("__", 1)[1] for k in test if "__" in k})
    cis = pred.get("per_class_ci", {})
    for suffix in suffixes:
        cls = known.get(suffix, suffix)
        row: dict[str, Any] = {"class": cls}
        for name in ("precision", "recall", "f1", "specificity", "roc_auc", "support",
                     "ap50", "map50", "map50_95"):
            value = test.get(f"{name}__{suffix}")
            if value is None:
                continue
            ci = cis.get(cls, {}).get(name)
            row[name] = {"value": value, "ci": ci}
        per_class.append(row)
    return overall, per_class


def _limitations(card: dict[str, Any]) -> list[str]:
    """Limits measured from the data and the metrics; each sentence carries its number."""
    out = []
    data = card["training_data"]
    for row in data.get("per_split_class", []):
        if row["split"] == "test" and row["subjects"] < FEW_SUBJECTS and row["label"] != "(fields)":
            out.append(f"The test split holds {row['subjects']} distinct donor(s) of class "
                       f"'{row['label']}' ({row['images']} images): per-class figures for it "
                       "rest on few people.")
        if row["split"] == "test" and row["without_subject"] and row["label"] != "(fields)":
            out.append(f"{row['without_subject']} test image(s) of '{row['label']}' name no "
                       "donor: subject-level separation cannot be checked for them.")
    if card["split_kind"] != "subject":
        out.append(f"The test set was separated at the {card['split_kind'] or 'unknown'} level, "
                   "not by donor: images of one person may sit on both sides, so the test "
                   "figures can be optimistic (as in the papers' random image splits).")
    gated = card["gate"]["metric"]
    for row in card["metrics"]["overall"]:
        if row["metric"] == gated and row["ci_low"] is not None:
            width = row["ci_high"] - row["ci_low"]
            if width > WIDE_CI:
                out.append(f"The 95% CI of the gated metric {gated} is {width:.3f} wide "
                           f"([{row['ci_low']:.3f}, {row['ci_high']:.3f}]): the test set is too "
                           "small to tell close versions apart.")
    n_test = next((r["value"] for r in card["metrics"]["overall"] if r["metric"] == "n_test"),
                  None)
    if n_test is None:  # the detector logs no n_test: count the test rows of the manifest
        n_test = sum(r["images"] for r in data.get("per_split_class", []) if r["split"] == "test")
    if n_test:
        out.append(f"All test figures come from {int(n_test)} test image(s)"
                   + (f" of {card['patients']}." if card.get("patients") else "."))
    ece = card["calibration"].get("ece")
    if ece is not None and ece > POOR_ECE:
        out.append(f"Expected calibration error is {ece:.3f} (> {POOR_ECE}): read the "
                   "probabilities as scores, not as frequencies.")
    supports = [r["support"]["value"] for r in card["metrics"]["per_class"] if "support" in r]
    if supports and min(supports) > 0 and max(supports) / min(supports) >= 3:
        out.append(f"The test classes are imbalanced ({int(min(supports))} to "
                   f"{int(max(supports))} images per class): prefer balanced accuracy.")
    out.append("Trained and tested on the curated batches listed above only: images from "
               "other scanners, stains or hospitals were not measured.")
    return out


def build_card(cfg: Config, name: str, version: str) -> dict[str, Any]:
    """The card of registered version ``name``/``version`` as plain data (see module doc)."""
    from mlflow import MlflowClient

    from training.tracking import configure_mlflow

    configure_mlflow(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    family = family_of_model(cfg, name)
    mv = client.get_model_version(name, str(version))
    run = client.get_run(mv.run_id)
    metrics = {k: float(v) for k, v in run.data.metrics.items()}
    params, tags, vtags = dict(run.data.params), dict(run.data.tags), dict(mv.tags or {})
    classes = [c for c in params.get("classes", "").split(",") if c]
    pred: dict[str, Any]
    logged = {a.path for a in client.list_artifacts(mv.run_id, "predictions")}
    if "predictions/test.csv" not in logged:  # the detector logs no per-image probabilities
        pred = {"error": "the run logged no per-image test probabilities "
                "(predictions/test.csv), so there are no per-class CIs and no calibration"}
    elif not classes:
        pred = {"error": "the run logs no 'classes' param"}
    else:
        with tempfile.TemporaryDirectory(prefix="leukoflow-card-") as tmp:
            local = client.download_artifacts(mv.run_id, "predictions/test.csv", tmp)
            frame = pd.read_csv(local, dtype={"label": str}, keep_default_na=False)
        pred = _predictions_section(frame, classes)
    overall, per_class = _metric_rows(metrics, classes, pred)
    try:
        reasons = json.loads(vtags.get("gate_reasons", "[]"))
    except ValueError:
        reasons = [vtags["gate_reasons"]]
    dataset_version = _as_float(tags.get("dataset_version") or params.get("dataset_version"))
    aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items()
                     if str(v) == str(mv.version))
    lineage_keys = ("git_sha", "git_sha_source", "airflow_run_id", "dataset_version",
                    "manifest_sha256", "batch_ids", "split_kind", "test_set_sha256",
                    "architecture", "paper", "champion_version")
    card: dict[str, Any] = {
        "model": name, "version": str(mv.version), "run_id": mv.run_id,
        "family": family.name, "architecture": tags.get("architecture", ""),
        "created": int(mv.creation_timestamp or 0), "aliases": aliases,
        "intended_use": family.intended_use, "out_of_scope": family.out_of_scope,
        "classes": classes,
        "training_data": _data_section(cfg, family.kind,
                                       int(dataset_version) if dataset_version else None),
        "split_kind": tags.get("split_kind", ""),
        "metrics": {"overall": overall, "per_class": per_class,
                    "cost": {k: metrics[k] for k in COST_METRICS if k in metrics},
                    "source": f"logged metrics of run {mv.run_id}",
                    "per_class_ci_source": f"bootstrap over predictions/test.csv, "
                    f"resampling {pred['ci_unit']}"
                    if "per_class_ci" in pred else pred.get("error")},
        "calibration": {k: v for k, v in pred.items() if k not in ("per_class_ci", "ci_unit")},
        "gate": {"passed": vtags.get("gate_passed"), "reasons": reasons,
                 "metric": family.gate_metric(cfg), "floor": family.gate_floor(cfg),
                 "max_regression": cfg.gate.max_regression},
        "champion_on_same_test": {k.split("/", 1)[1]: v for k, v in metrics.items()
                                  if k.startswith("champion/") and "__" not in k
                                  and not k.endswith(("_ci_low", "_ci_high"))},
        "baseline_on_same_test": _baseline_metrics(metrics),
        "lineage": {k: tags[k] for k in lineage_keys if tags.get(k)},
        "params": params,
    }
    card["patients"] = _patients(metrics, card["training_data"])
    card["limitations"] = _limitations(card)
    return card


def _patients(metrics: dict[str, float], data: dict[str, Any]) -> str:
    """'N subject(s) (class: n, ...)': how many people the test figures rest on."""
    per_class = {k.split("__", 1)[1]: int(v) for k, v in metrics.items()
                 if k.startswith("n_subjects_test__")}
    total = metrics.get("n_subjects_test")
    if not per_class:  # runs from before subjects were logged: count them in the manifest
        rows = [r for r in data.get("per_split_class", [])
                if r["split"] == "test" and r["label"] != "(fields)" and r["subjects"]]
        per_class = {r["label"]: int(r["subjects"]) for r in rows}
        total = sum(per_class.values()) if per_class else None
    if not per_class or total is None:
        return ""
    listed = ", ".join(f"{c}: {n}" for c, n in sorted(per_class.items()))
    return f"{int(total)} subject(s) ({listed})"


def _baseline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The hand-crafted baseline fitted and scored on this version's own train/test rows."""
    return {k.removeprefix("baseline/"): v for k, v in metrics.items()
            if k.startswith("baseline/") and "__" not in k and not k.startswith("baseline/val/")
            and not k.endswith(("_ci_low", "_ci_high"))}


# ------------------------------------------------------------------------- rendering
def _num(value: Any) -> str:
    """Figures as logged, to 4 decimals (counts as integers)."""
    if value is None:
        return ""
    v = float(value)
    return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.4f}"


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or not all(math.isfinite(float(x)) for x in ci):
        return ""
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def reliability_svg(bins: list[dict[str, float]], size: int = 260) -> str:
    """A reliability diagram (accuracy against confidence per bin) as an inline SVG."""
    pad, inner = 34, size - 44
    def x(v: float) -> float:
        return pad + v * inner

    def y(v: float) -> float:
        return 10 + (1 - v) * inner

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
             f'viewBox="0 0 {size} {size}" role="img" aria-label="reliability diagram">',
             f'<rect x="{pad}" y="10" width="{inner}" height="{inner}" fill="#fafafa" '
             'stroke="#999"/>',
             f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#999" '
             'stroke-dasharray="4 3"/>']
    for b in bins:
        w = (b["high"] - b["low"]) * inner
        top = y(b["accuracy"])
        parts.append(f'<rect class="bin" x="{x(b["low"]):.1f}" y="{top:.1f}" '
                     f'width="{w:.1f}" height="{y(0) - top:.1f}" fill="#3b6ea5" '
                     f'fill-opacity="0.75" stroke="#fff"><title>confidence '
                     f'{b["low"]:.1f}-{b["high"]:.1f}: {b["count"]} image(s), accuracy '
                     f'{b["accuracy"]:.3f}, mean confidence {b["confidence"]:.3f}</title></rect>')
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{x(t)}" y="{size - 18}" font-size="10" '
                     f'text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{pad - 4}" y="{y(t) + 3}" font-size="10" '
                     f'text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{x(0.5)}" y="{size - 4}" font-size="11" text-anchor="middle">'
                 'confidence</text>')
    parts.append(f'<text x="10" y="{y(0.5)}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 10 {y(0.5)})">accuracy</text></svg>')
    return "".join(parts)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _sections(card: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, text, table header, table rows) of each card section, shared by md and HTML."""
    data = card["training_data"]
    cal = card["calibration"]
    gate = card["gate"]
    per_class_metrics = ["precision", "recall", "f1", "specificity", "roc_auc", "support",
                         "ap50", "map50", "map50_95"]
    shown = [m for m in per_class_metrics if any(m in r for r in card["metrics"]["per_class"])]
    per_class_rows = []
    for r in card["metrics"]["per_class"]:
        row = [str(r["class"])]
        for m in shown:
            cell = r.get(m)
            row.append("" if cell is None else f"{_num(cell['value'])} {_ci(cell.get('ci'))}"
                       .strip())
        per_class_rows.append(row)
    gate_text = {"true": "passed: promoted to champion", "false": "failed: not promoted"}.get(
        str(gate["passed"]), f"not recorded ({gate['passed']})")
    champ = card["champion_on_same_test"]
    with_cells = any(r.get("cell_ci_low") is not None for r in card["metrics"]["overall"])
    base = card.get("baseline_on_same_test") or {}
    own = {r["metric"]: r["value"] for r in card["metrics"]["overall"]}
    own.update(card["metrics"]["cost"])
    out = [
        ("Model details", f"{card['model']} version {card['version']} "
         f"({card['family']}, architecture {card['architecture'] or 'n/a'}); MLflow run "
         f"{card['run_id']}; aliases: {', '.join(card['aliases']) or 'none'}; classes: "
         f"{', '.join(card['classes']) or 'n/a'}.", [], []),
        ("Intended use", card["intended_use"], [], []),
        ("Out-of-scope use", card["out_of_scope"], [], []),
        ("Training data",
         data.get("error") or f"Curated manifest version {data['manifest_version']} "
         f"(sha256 {data['manifest_sha256'][:16]}...), batches: "
         f"{', '.join(data['batch_ids']) or 'none'}. Split kind (measured): "
         f"{card['split_kind'] or 'unknown'}.",
         ["split", "class", "images", "subjects", "images without subject"],
         [[r["split"], r["label"], str(r["images"]), str(r["subjects"]),
           str(r["without_subject"])] for r in data.get("per_split_class", [])]),
        ("Metrics (test split)", _metrics_text(card),
         ["metric", "value", "95% CI", *(["95% CI (cells)"] if with_cells else [])],
         [[r["metric"], _num(r["value"]), _ci([r["ci_low"], r["ci_high"]]),
           *([_ci([r.get("cell_ci_low"), r.get("cell_ci_high")])] if with_cells else [])]
          for r in card["metrics"]["overall"]]),
        ("Size and cost", "Logged by the same run." if card["metrics"]["cost"] else
         "The run logged no size or cost figures.", ["measure", "value"],
         [[k, _num(v)] for k, v in card["metrics"]["cost"].items()]),
        ("Metrics per class", "Values as logged; 95% CIs: "
         f"{card['metrics']['per_class_ci_source'] or 'none'}.", ["class", *shown],
         per_class_rows),
        ("Calibration", cal.get("error") or
         f"Expected calibration error {_num(cal['ece'])} over {cal['ece_bins']} equal-width "
         f"confidence bins ({cal['n_rows']} test images; mean confidence "
         f"{_num(cal['mean_confidence'])}, accuracy {_num(cal['accuracy'])}).",
         ["confidence bin", "images", "mean confidence", "accuracy"],
         [[f"{b['low']:.1f}-{b['high']:.1f}", str(b["count"]), _num(b["confidence"]),
           _num(b["accuracy"])] for b in cal.get("reliability", [])]),
        ("Gate decision", f"{gate_text}. Gated metric {gate['metric']}, floor "
         f"{_num(gate['floor'])}, allowed regression {_num(gate['max_regression'])}.",
         ["reason"], [[r] for r in gate["reasons"]]),
        ("Champion on the same test rows", "" if champ else
         "There was no champion to compare with.", ["metric", "champion"] if champ else [],
         [[k, _num(v)] for k, v in sorted(champ.items())]),
        ("Hand-crafted baseline on the same rows",
         "Colour, texture and shape features with a logistic regression, fitted on this "
         "version's train rows and scored on its test rows: what the model must beat "
         "(gate.must_beat_baseline)." if base else
         "No hand-crafted baseline was measured on these rows.",
         ["metric", "baseline", "this model"] if base else [],
         [[k, _num(v), _num(own.get(k))] for k, v in sorted(base.items())]),
        ("Known limitations (measured)", "", ["limitation"],
         [[x] for x in card["limitations"]]),
        ("Lineage", "", ["tag", "value"], [[k, str(v)] for k, v in card["lineage"].items()]),
    ]
    return out


def _metrics_text(card: dict[str, Any]) -> str:
    """Where the figures come from and how many patients they rest on."""
    text = f"Logged metrics of run {card['run_id']}; 95% bootstrap CIs as logged"
    units = next((r["value"] for r in card["metrics"]["overall"] if r["metric"] == "ci_units"),
                 None)
    if units is not None:
        text += (f", resampling the {int(units)} test subjects (cells of one patient are not "
                 "independent); the cell-level CIs beside them are shown for comparison only")
    text += "."
    if card.get("patients"):
        text += f" These figures rest on {card['patients']} in the test split."
    return text


def render_markdown(card: dict[str, Any]) -> str:
    parts = [f"# Model card: {card['model']} v{card['version']}", ""]
    for title, text, header, rows in _sections(card):
        parts += [f"## {title}", ""]
        if text:
            parts += [text, ""]
        if title == "Calibration" and card["calibration"].get("reliability"):
            parts += ["![reliability diagram](reliability.svg)", ""]
        if header and rows:
            parts += [_md_table(header, [[c.replace("|", "\\|") for c in r] for r in rows]), ""]
    return "\n".join(parts)


_CARD_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;
color:#222;max-width:60em}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em;
border-bottom:1px solid #ddd}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
"""


def render_html(card: dict[str, Any]) -> str:
    """A self-contained page: inline CSS and SVG, no scripts, no external files."""
    esc = html.escape
    body = [f"<h1>Model card: {esc(card['model'])} v{esc(card['version'])}</h1>"]
    for title, text, header, rows in _sections(card):
        slug = re.sub(r"[^a-z]+", "-", title.lower()).strip("-")
        body.append(f'<section id="{slug}"><h2>{esc(title)}</h2>')
        if text:
            body.append(f"<p>{esc(text)}</p>")
        if title == "Calibration" and card["calibration"].get("reliability"):
            body.append(reliability_svg(card["calibration"]["reliability"]))
        if header and rows:
            body.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</table>")
        body.append("</section>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Model card '
            f"{esc(card['model'])} v{esc(card['version'])}</title><style>{_CARD_CSS}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def log_card(cfg: Config, name: str, version: str) -> dict[str, Any]:
    """Build, render and log the card on the version's run; tag the version. Returns the card."""
    from mlflow import MlflowClient

    card = build_card(cfg, name, version)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="leukoflow-card-") as tmp:
        out = Path(tmp) / CARD_DIR
        out.mkdir()
        (out / "model_card.md").write_text(render_markdown(card))
        (out / "model_card.html").write_text(render_html(card))
        (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
        if card["calibration"].get("reliability"):
            (out / "reliability.svg").write_text(reliability_svg(
                card["calibration"]["reliability"]))
        client.log_artifacts(card["run_id"], str(out), CARD_DIR)
    client.set_model_version_tag(name, str(version), "model_card",
                                 f"{CARD_DIR}/model_card.html")
    log.info("model card of %s v%s logged to run %s under %s/", name, version, card["run_id"],
             CARD_DIR)
    return card
