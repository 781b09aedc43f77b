"""The batch expectation suite (Great Expectations 1.x): the single source of truth on files.

The suite runs on the per-image metadata frame (one row per file, see ``METADATA_COLUMNS``) plus
a few columns :func:`prepare_frame` derives from the batch and the curated store (duplicates,
already curated, near-duplicates of the frozen test set, class shares). Every expectation
carries ``meta`` that says what its failure means:

* ``severity="error"``, ``level="row"``: each unexpected row is quarantined with ``reason``
  (``{value}`` in a reason is the offending value, e.g. ``not_decodable:decompression_bomb``);
* ``severity="warning"`` (blur, exposure; with ``mostly``): soft image-quality bounds. Failing
  rows are listed as warnings in the steward's report, never quarantined, and the expectation as
  a whole failing (fewer than ``mostly`` pass) is a warning on the batch, not a rejection: blur
  and exposure vary legitimately between scanners, and a steward should judge them;
* ``level="table"`` (batch size, class shares): if one fails the batch is rejected whole.

Per-file reasons are read back from the GX results themselves (``COMPLETE`` result format,
indexed by ``path``), so the suite, the Data Docs and the quarantine always agree.

Reason codes: ``not_decodable`` / ``not_decodable:<error>`` (empty, truncated, not_an_image,
decompression_bomb, missing_file, bad_label_file, unreadable), ``bad_format``, ``too_small``,
``too_large``, ``file_too_large``, ``wrong_mode``, ``label_not_in_set`` (a cell label outside
``cfg.data.classes``; a field box class outside ``cfg.data.detector_classes`` plus the class
names the batch itself declares in its ``data.yaml``), ``bad_kind``, ``duplicate`` (byte-identical
to an earlier file of the batch, by path order), ``already_curated``, ``test_leak`` (perceptual
hash within ``LEAK_HAMMING`` bits of an image in the current frozen test split, confirmed by
pixels where they are at hand, see :func:`same_picture`), ``no_subject``.
Warnings: ``blurry``, ``bad_exposure``; on the batch (``level="batch"``): ``drift`` (the batch's
image statistics are farther from the champion's training rows than the batch's
``drift_threshold``, :mod:`training.data.drift`).
Table-level: ``batch_too_small``, ``class_imbalance``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from training.config import Config
from training.contract import CONTRACT_CODES, InputContract, violations
from training.errors import DataValidationError

__all__ = [
    "LEAK_CORRELATION", "LEAK_HAMMING", "METADATA_COLUMNS", "SUITE_NAME", "SuiteOutcome",
    "build_suite", "data_docs_index", "hamming_matches", "hamming_neighbours", "prepare_frame",
    "run_suite", "same_picture",
]

log = logging.getLogger("leukoflow.validation")

SUITE_NAME = "leukoflow_batch"
DATASOURCE = "leukoflow"
ASSET = "batch_metadata"
BATCH_DEFINITION = "whole_batch"
LEAK_HAMMING = 4  # pHash bits: at most this many differ = a near-duplicate candidate
LEAK_CORRELATION = 0.98  # ... confirmed when grey thumbnails correlate at least this much
SIGNATURE_SIDE = 64

METADATA_COLUMNS = [
    "batch_id", "path", "kind", "label", "subject_id", "yolo_labels", "box_counts", "decodable",
    "error", "format", "width", "height", "mode", "channels", "bytes", "sha256", "phash", "blur",
    "exposure", "contrast", "background_fraction",
]
_TEXT = ["batch_id", "path", "kind", "label", "subject_id", "yolo_labels", "box_counts", "error",
         "format", "mode", "sha256", "phash"]
_NUMBERS = ["width", "height", "channels", "bytes", "blur", "exposure", "contrast",
            "background_fraction"]
_GENERIC_REASON = "not_decodable"  # superseded by a more specific ``not_decodable:<error>``


# ------------------------------------------------------------------------------ the frame
def hamming_neighbours(hashes: Iterable[str], reference: Sequence[str],
                       max_distance: int = LEAK_HAMMING) -> list[list[int]]:
    """For each hex hash, the indices of the reference hashes within ``max_distance`` bits."""
    hashes = list(hashes)
    out: list[list[int]] = [[] for _ in hashes]
    ref_idx = [j for j, h in enumerate(reference) if h]
    idx = [i for i, h in enumerate(hashes) if h]
    if not ref_idx or not idx:
        return out
    ref = np.array([int(reference[j], 16) for j in ref_idx], dtype=np.uint64)
    vals = np.array([int(hashes[i], 16) for i in idx], dtype=np.uint64)
    for start in range(0, len(vals), 512):
        close = np.bitwise_count(vals[start:start + 512, None] ^ ref[None, :]) <= max_distance
        for k, row in enumerate(close):
            out[idx[start + k]] = [ref_idx[j] for j in np.flatnonzero(row)]
    return out


def hamming_matches(hashes: Iterable[str], reference: Iterable[str],
                    max_distance: int = LEAK_HAMMING) -> np.ndarray:
    """For each hex hash, whether some reference hash lies within ``max_distance`` bits."""
    near = hamming_neighbours(hashes, list(reference), max_distance)
    return np.array([bool(n) for n in near], dtype=bool)


def _signature(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("L", (SIGNATURE_SIDE * 4, SIGNATURE_SIDE * 4))
            grey = im.convert("L") if im.mode != "L" else im
            small = grey.resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
            return np.asarray(small, dtype=np.float64).ravel()
    except Exception:  # noqa: BLE001 - an unreadable file is simply no match
        return None


def same_picture(a: Path, b: Path, min_correlation: float = LEAK_CORRELATION) -> bool:
    """Whether two images show the same picture: grey 64x64 thumbnails correlate >= the bound.

    Confirms pHash candidates. On dark-background single-cell images (C-NMC) many different
    cells share a pHash within 4 bits (different cells correlate at most ~0.97 there, re-saved
    frames of one cell >= 0.98), so the hash alone would call healthy files leaks.
    """
    sa, sb = _signature(a), _signature(b)
    if sa is None or sb is None or sa.std() == 0 or sb.std() == 0:
        return bool(sa is not None and sb is not None and np.array_equal(sa, sb))
    return float(np.corrcoef(sa, sb)[0, 1]) >= min_correlation


def _unknown_classes(box_counts: str, allowed: set[str]) -> str:
    try:
        counts = json.loads(box_counts) if box_counts else {}
    except json.JSONDecodeError:
        return "<unparseable box_counts>"
    names = counts.keys() if isinstance(counts, dict) else []
    return ",".join(sorted(str(n) for n in names if str(n) not in allowed))


def prepare_frame(
    df: pd.DataFrame,
    cfg: Config,
    *,
    curated_sha256: Collection[str] = frozenset(),
    test_phashes: Mapping[str, str] | Iterable[str] = (),
    box_classes: Iterable[str] = (),
    subjects_expected: bool | None = None,
    confirm_leak: Callable[[str, list[str]], bool] | None = None,
) -> pd.DataFrame:
    """The metadata frame, normalised, sorted by path, with the columns the suite checks.

    ``curated_sha256``: content already in the curated store; ``test_phashes``: pHashes of the
    frozen test split (a mapping ``id -> pHash`` when ``confirm_leak`` is given);
    ``confirm_leak(path, ids)``: whether the file at ``path`` really shows one of the test
    images ``ids`` whose pHash is within ``LEAK_HAMMING`` bits (None: the hash decides alone);
    ``box_classes``: class names the batch declares (``data.yaml``);
    ``subjects_expected``: whether the layout names subjects (None: if any row has one).
    """
    missing = set(METADATA_COLUMNS) - set(df.columns)
    if missing:
        raise DataValidationError(f"metadata frame lacks columns {sorted(missing)}")
    frame = df.copy()
    for col in _TEXT:
        frame[col] = frame[col].fillna("").astype(str)
    for col in _NUMBERS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["decodable"] = frame["decodable"].fillna(False).astype(bool)
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)

    # Byte-identical files: keep the first by path, mark the rest with what they duplicate.
    hashed = frame["decodable"] & (frame["sha256"] != "")
    first = frame[hashed].drop_duplicates("sha256").set_index("sha256")["path"]
    original = frame["sha256"].map(first)
    dup = hashed & original.notna() & (original != frame["path"])
    frame["duplicate_of"] = pd.Series(np.where(dup, original, None), dtype=object)

    contract = InputContract.for_validation(cfg)
    broken = [violations(contract, n_bytes=int(b) if b == b else 0, fmt=f, mode=m,
                         width=int(w) if w == w else 0, height=int(h) if h == h else 0,
                         decodable=bool(d))
              for b, f, m, w, h, d in zip(frame["bytes"], frame["format"], frame["mode"],
                                          frame["width"], frame["height"], frame["decodable"],
                                          strict=True)]
    for code in CONTRACT_CODES:
        frame[f"breaks_{code}"] = pd.Series([code in b for b in broken], dtype=bool)

    curated = set(curated_sha256)
    frame["already_curated"] = hashed & frame["sha256"].isin(curated)
    if isinstance(test_phashes, Mapping):
        ref_ids, ref_hashes = list(test_phashes), list(test_phashes.values())
    else:
        ref_ids, ref_hashes = [], list(test_phashes)
    near = hamming_neighbours(frame["phash"], ref_hashes, cfg.validation.near_duplicate_hamming)
    if confirm_leak is not None and ref_ids:
        leaks = [bool(n) and ok and confirm_leak(path, [ref_ids[j] for j in n])
                 for n, ok, path in zip(near, frame["decodable"], frame["path"], strict=True)]
    else:
        leaks = [bool(n) and ok for n, ok in zip(near, frame["decodable"], strict=True)]
    frame["leaks_test"] = pd.Series(leaks, dtype=bool)

    if subjects_expected is None:
        subjects_expected = bool((frame["subject_id"] != "").any())
    frame["subject_expected"] = bool(subjects_expected)
    frame["subject"] = pd.Series(
        np.where(frame["subject_id"] != "", frame["subject_id"], None), dtype=object
    )

    allowed = set(cfg.data.detector_classes) | {str(c) for c in box_classes}
    is_field = frame["kind"] == "field"
    frame["unknown_box_classes"] = [
        _unknown_classes(bc, allowed) if f else "" for bc, f in zip(
            frame["box_counts"], is_field, strict=True)
    ]
    if "drift_score" not in frame.columns:  # set by the ingest from training.data.drift
        frame["drift_score"] = np.nan
    frame["drift_score"] = pd.to_numeric(frame["drift_score"], errors="coerce").astype(float)
    frame["drift_measured"] = frame["drift_score"].notna()
    if "drift_threshold" not in frame.columns:  # the batch's own (calibrated) threshold
        frame["drift_threshold"] = cfg.validation.drift_threshold
    frame["drift_threshold"] = pd.to_numeric(frame["drift_threshold"], errors="coerce").fillna(
        cfg.validation.drift_threshold).astype(float)
    cells = frame["kind"] == "cell"
    shares = frame.loc[cells, "label"].value_counts(normalize=True)
    frame["class_share"] = np.where(cells, frame["label"].map(shares), np.nan).astype(float)
    return frame


# ------------------------------------------------------------------------------ the suite
def build_suite(cfg: Config) -> Any:
    """The expectation suite for ``cfg`` (a pure function of the config, not of the batch)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    v = cfg.validation
    decodable = Column("decodable") == True  # noqa: E712 (a GX condition, not a comparison)
    cell = Column("kind") == "cell"

    def row(reason: str, **kw: Any) -> dict[str, Any]:
        return {"reason": reason, "severity": "error", "level": "row", **kw}

    def warn(reason: str) -> dict[str, Any]:
        return {"reason": reason, "severity": "warning", "level": "row"}

    def table(reason: str) -> dict[str, Any]:
        return {"reason": reason, "severity": "error", "level": "table"}

    lo, hi = v.class_share_range
    expectations = [
        gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True],
                                        meta=row(_GENERIC_REASON)),
        gxe.ExpectColumnValuesToBeInSet(column="error", value_set=[""],
                                        meta=row("not_decodable:{value}")),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["cell", "field"],
                                        meta=row("bad_kind")),
        # the input contract (training.contract), judged once per file in prepare_frame
        *[gxe.ExpectColumnValuesToBeInSet(column=f"breaks_{code}", value_set=[False],
                                          meta=row(code)) for code in CONTRACT_CODES],
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.data.classes),
                                        row_condition=cell, meta=row("label_not_in_set")),
        gxe.ExpectColumnValuesToBeInSet(column="unknown_box_classes", value_set=[""],
                                        row_condition=Column("kind") == "field",
                                        meta=row("label_not_in_set")),
        gxe.ExpectColumnValuesToBeNull(column="duplicate_of", meta=row("duplicate")),
        gxe.ExpectColumnValuesToBeInSet(column="already_curated", value_set=[False],
                                        meta=row("already_curated")),
        gxe.ExpectColumnValuesToBeInSet(column="leaks_test", value_set=[False],
                                        meta=row("test_leak")),
        gxe.ExpectColumnValuesToNotBeNull(column="subject",
                                          row_condition=Column("subject_expected") == True,  # noqa: E712
                                          meta=row("no_subject")),
        gxe.ExpectColumnValuesToBeBetween(column="blur", min_value=v.min_blur, mostly=v.mostly,
                                          row_condition=decodable, meta=warn("blurry")),
        gxe.ExpectColumnValuesToBeBetween(column="exposure", min_value=v.exposure_range[0],
                                          max_value=v.exposure_range[1], mostly=v.mostly,
                                          row_condition=decodable, meta=warn("bad_exposure")),
        # drift against the champion's training rows (training.data.drift): one score and
        # one threshold per batch (calibrated on the champion's own subjects, so a column, not
        # a constant of the suite), on every row (NaN = not measured, then no row is checked)
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="drift_threshold", column_B="drift_score", or_equal=True, mostly=v.mostly,
            row_condition=Column("drift_measured") == True,  # noqa: E712
            meta={"reason": "drift", "severity": "warning", "level": "batch"}),
        gxe.ExpectTableRowCountToBeBetween(min_value=v.min_batch_size,
                                           meta=table("batch_too_small")),
        gxe.ExpectColumnValuesToBeBetween(column="class_share", min_value=lo, max_value=hi,
                                          row_condition=cell, meta=table("class_imbalance")),
    ]
    suite = gx.ExpectationSuite(name=SUITE_NAME, meta={"source": "training.data.validation"})
    for exp in expectations:
        suite.add_expectation(exp)
    return suite


def _gx_context(cfg: Config) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # INFO is config chatter
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    cfg.gx_dir.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(cfg.gx_dir))
    bars = ctx.variables.progress_bars
    enabled = bars.get("globally", True) if isinstance(bars, dict) else getattr(
        bars, "globally", True)
    if enabled:
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.variables.save()
    return ctx


def _checkpoint(ctx: Any, cfg: Config) -> Any:
    """Get-or-create the datasource chain; (re)write suite, validation definition, checkpoint."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    try:
        source = ctx.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        source = ctx.data_sources.add_pandas(DATASOURCE)
    try:
        asset = source.get_asset(ASSET)
    except LookupError:
        asset = source.add_dataframe_asset(ASSET)
    try:
        batch_def = asset.get_batch_definition(BATCH_DEFINITION)
    except KeyError:
        batch_def = asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)
    suite = ctx.suites.add_or_update(build_suite(cfg))
    vdef = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=SUITE_NAME, data=batch_def, suite=suite)
    )
    return ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=SUITE_NAME,
        validation_definitions=[vdef],
        actions=[UpdateDataDocsAction(name="update_data_docs")],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    ))


def data_docs_index(ctx: Any, resource_identifier: Any = None) -> Path | None:
    """The local Data Docs page of one validation run (or the site's ``index.html``).

    The run's own page is what a steward needs: it is static HTML, whereas the index lists
    runs with JavaScript from CDNs and shows nothing offline.
    """
    for site in ctx.get_docs_sites_urls(resource_identifier=resource_identifier):
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            path = Path(unquote(urlparse(url).path))
            if path.exists():
                return path
    return None


# ----------------------------------------------------------------------------- the verdict
@dataclass
class SuiteOutcome:
    """What the suite said, in the platform's terms."""

    success: bool
    reasons: dict[str, list[str]]  # path -> quarantine reasons (empty: accepted)
    warnings: dict[str, list[str]]  # path -> soft findings (never quarantine)
    table_failures: list[str]  # reasons of failed table-level expectations: reject the batch
    soft_failures: list[str]  # warning expectations that failed as a whole
    expectations: list[dict[str, Any]] = field(default_factory=list)
    data_docs: Path | None = None


def _reason(template: str, entry: dict[str, Any], column: str | None) -> str:
    if "{value}" not in template:
        return template
    value = entry.get(column) if column else None
    return template.format(value=value if value not in (None, "") else "unknown")


def run_suite(cfg: Config, frame: pd.DataFrame, run_name: str) -> SuiteOutcome:
    """Validate a :func:`prepare_frame` frame; build Data Docs; read back per-file reasons."""
    ctx = _gx_context(cfg)  # first: it quiets GX's logging before GX is imported
    from great_expectations.core.run_identifier import RunIdentifier

    checkpoint = _checkpoint(ctx, cfg)
    result = checkpoint.run(batch_parameters={"dataframe": frame},
                            run_id=RunIdentifier(run_name=run_name))
    paths = list(frame["path"])
    reasons: dict[str, list[str]] = {p: [] for p in paths}
    warnings: dict[str, list[str]] = {p: [] for p in paths}
    table_failures: list[str] = []
    soft_failures: list[str] = []
    summary: list[dict[str, Any]] = []
    for vresult in result.run_results.values():
        for res in vresult.results:
            conf = res.expectation_config
            meta = dict(conf.meta or {})
            reason, severity = meta.get("reason", conf.type), meta.get("severity", "error")
            column = conf.kwargs.get("column") or conf.kwargs.get("column_B")
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise DataValidationError(
                    f"expectation {conf.type} on {column} raised: "
                    f"{res.exception_info.get('exception_message')}"
                )
            info = res.result or {}
            summary.append({
                "expectation": conf.type, "column": column, "reason": reason,
                "severity": severity, "level": meta.get("level", "row"),
                "success": bool(res.success), "unexpected_count": info.get("unexpected_count"),
                "element_count": info.get("element_count"),
                "observed_value": _plain(info.get("observed_value")),
            })
            if meta.get("level") == "table":
                if not res.success:
                    table_failures.append(reason)
                continue
            if meta.get("level") == "batch":  # a warning on the batch, not on each of its files
                if not res.success:
                    soft_failures.append(reason)
                continue
            target = warnings if severity == "warning" else reasons
            if severity == "warning" and not res.success:
                soft_failures.append(reason)
            for entry in info.get("unexpected_index_list") or []:
                code = _reason(reason, entry, column)
                if entry["path"] in target and code not in target[entry["path"]]:
                    target[entry["path"]].append(code)
    for codes in reasons.values():
        if any(c.startswith(_GENERIC_REASON + ":") for c in codes) and _GENERIC_REASON in codes:
            codes.remove(_GENERIC_REASON)
    return SuiteOutcome(
        success=bool(result.success), reasons=reasons, warnings=warnings,
        table_failures=sorted(set(table_failures)), soft_failures=sorted(set(soft_failures)),
        expectations=summary,
        data_docs=data_docs_index(ctx, next(iter(result.run_results), None)),
    )


def _plain(value: Any) -> Any:
    """Make GX's numpy scalars JSON-able."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
