"""The validation stage for one batch: suite verdict -> curated store, quarantine, report.

    ledger? -> stage -> import -> metadata -> GX suite -> quarantine copies -> curated copies
            -> pHash index -> manifest vN+1 -> steward report -> ledger

Writes are ordered so a crash anywhere leaves a consistent store: content-addressed copies and
quarantine copies can be written twice harmlessly, the manifest (the only thing readers trust)
is written after every file it names, and the ledger (which makes the batch "processed") last.
A rerun after a crash between manifest and ledger finds this batch's rows already in the
manifest: they are neither reported as ``already_curated`` nor added twice. Nothing is deleted:
not from landing, not from the curated store, not from quarantine.

Batch policy: a file that fails a hard expectation is quarantined and the rest is curated,
unless the share of failing files exceeds ``cfg.validation.max_failure_rate`` or a table-level
expectation fails; then the batch is rejected whole (everything to quarantine, nothing curated).
Concurrent curations (the DAG's one-at-a-time limit does not bind ``leukoflow ingest`` or a
second worker) are safe: each appends its rows to the newest manifest under a lock, with a
conditional write that refuses a version already taken (see :mod:`training.data.dataset`).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config
from training.data import dataset
from training.data.batches import (
    check_batch_id,
    find_marker,
    landing_storage,
    read_ledger,
    stage_batch,
    write_ledger,
)
from training.data.drift import DriftResult, batch_drift, log_drift
from training.data.importers import given_split
from training.data.leakage import ALREADY, LeakageCheck, as_hex_or_blank, check_and_assign
from training.data.report import write_index, write_report
from training.data.validation import SuiteOutcome, prepare_frame, run_suite, same_picture
from training.errors import DataValidationError
from training.locks import file_lock
from training.records import ValidationResult
from training.storage import Storage, open_storage

__all__ = ["PHASH_INDEX", "validate_batch", "validate_path"]

log = logging.getLogger("leukoflow.curation")

PHASH_INDEX = "index/phash.csv"  # sha256 -> pHash of every curated image (for leak checks)
SUBJECT_LAYOUTS = {"cnmc"}  # layouts whose every image must name its donor
_EXT = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class _Inspection:
    """Everything the suite found about a batch folder (no side effects yet)."""

    batch_id: str
    root: Path
    layout: str
    frame: pd.DataFrame  # prepared frame + reasons/warnings columns
    outcome: SuiteOutcome | None
    rejection: str  # "" = accepted
    ignored: dict[str, str] = field(default_factory=dict)  # path -> why it is no record
    drift: DriftResult | None = None  # the batch against the champion's training rows

    @property
    def failed(self) -> pd.Series:
        return self.frame["reasons"].map(bool)


# ----------------------------------------------------------------------- curated context
@dataclass
class _CuratedContext:
    """What a new batch is checked against: content already curated, the frozen test split."""

    shas: set[str]
    test_phashes: dict[str, str]  # sha256 -> pHash of each test image
    test_keys: dict[str, str]  # sha256 -> key in the curated store


def _curated_context(cfg: Config, batch_id: str | None, cache: Path) -> _CuratedContext:
    """The curated store as the batch ``batch_id`` must see it.

    Rows of ``batch_id`` itself are left out: they are in the manifest only if an earlier run
    of this very batch crashed before its ledger entry, and must not count against it.
    """
    store = dataset.curated_storage(cfg)
    if dataset.latest_version(store) == 0:
        return _CuratedContext(set(), {}, {})
    manifest, _ = dataset.load_manifest(cfg)
    others = manifest[manifest["batch_id"] != batch_id]
    test = others[others["split"] == "test"]
    index = _read_phash_index(store)
    known = {sha: index[sha] for sha in test["sha256"] if sha in index}
    missing = test[~test["sha256"].isin(known)]
    if len(missing):
        known.update(_compute_phashes(cfg, missing, cache))
    return _CuratedContext(set(others["sha256"]), {k: v for k, v in known.items() if v},
                           dict(zip(test["sha256"], test["key"], strict=True)))


def _curated_file(store: Any, key: str, cache: Path) -> Path:
    """A curated image as a local file: in place for a local store, else downloaded once."""
    path = store.local_path(key)
    if path is None:
        path = cache / "curated" / key
        if not path.exists():
            store.download(key, path)
    return path


def _leak_confirmer(cfg: Config, ctx: _CuratedContext, root: Path,
                    cache: Path) -> Callable[[str, list[str]], bool]:
    """``confirm(path, test_shas)``: compare pixels with the pHash candidates (fetched once)."""
    store = dataset.curated_storage(cfg)

    def local(sha: str) -> Path:
        return _curated_file(store, ctx.test_keys[sha], cache)

    def confirm(path: str, shas: list[str]) -> bool:
        return any(same_picture(root / path, local(sha)) for sha in shas)

    return confirm


def _read_phash_index(store: Storage) -> dict[str, str]:
    if not store.exists(PHASH_INDEX):
        return {}
    df = pd.read_csv(io.BytesIO(store.read_bytes(PHASH_INDEX)), dtype=str,
                     keep_default_na=False)
    return dict(zip(df["sha256"], df["phash"], strict=True))


def _compute_phashes(cfg: Config, rows: pd.DataFrame, cache: Path) -> dict[str, str]:
    """pHashes of curated images missing from the index, measured exactly as new files are."""
    from training.data.importers import ImageRecord
    from training.data.metadata import extract_metadata

    local = dataset.materialize(cfg, rows, cache / "curated")
    records = [ImageRecord(path=p, kind="cell") for p in local["path"]]
    meta = extract_metadata(Path("/"), records, "curated", workers=cfg.validation.workers,
                            max_pixels=cfg.validation.max_pixels)
    return dict(zip(local["sha256"], meta["phash"], strict=True))


# ----------------------------------------------------------------------------- inspection
def _inspect(cfg: Config, root: Path, batch_id: str, cache: Path,
             own_batch: str | None) -> _Inspection:
    """Import, measure and validate a local batch folder; decide the batch's fate."""
    from training.data.importers import class_names, import_batch, unlisted_files
    from training.data.metadata import extract_metadata

    try:
        layout, records = import_batch(root, batch_id)
    except DataValidationError as exc:
        return _unrecognised(root, batch_id, str(exc))
    meta = extract_metadata(root, records, batch_id, workers=cfg.validation.workers,
                            max_pixels=cfg.validation.max_pixels)
    ctx = _curated_context(cfg, own_batch, cache)
    drift = batch_drift(cfg, root, meta)
    meta = meta.assign(drift_score=drift.score if drift.score is not None else np.nan,
                       drift_threshold=drift.threshold)
    frame = prepare_frame(
        meta, cfg, curated_sha256=ctx.shas, test_phashes=ctx.test_phashes,
        confirm_leak=_leak_confirmer(cfg, ctx, root, cache),
        box_classes=class_names(root, layout),
        subjects_expected=True if layout in SUBJECT_LAYOUTS else None,
    )
    with file_lock(cfg.state_dir / "locks" / "gx.lock"):  # one GX file context per home
        outcome = run_suite(cfg, frame, run_name=batch_id)
    frame["reasons"] = frame["path"].map(outcome.reasons)
    frame["warnings"] = frame["path"].map(outcome.warnings)
    rejection = ""
    rate = float(frame["reasons"].map(bool).mean()) if len(frame) else 1.0
    if outcome.table_failures:
        rejection = "table-level expectation failed: " + ", ".join(outcome.table_failures)
    elif rate > cfg.validation.max_failure_rate:
        rejection = (f"failure rate {rate:.1%} exceeds max_failure_rate "
                     f"{cfg.validation.max_failure_rate:.1%}")
    return _Inspection(batch_id, root, layout, frame, outcome, rejection,
                       unlisted_files(root, layout, set(frame["path"])), drift)


def _unrecognised(root: Path, batch_id: str, message: str) -> _Inspection:
    """A batch no importer understands: every file goes to quarantine, with the why."""
    from training.data.importers import READY_MARKER, unlisted_files

    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.name != READY_MARKER)
    frame = pd.DataFrame({
        "path": paths, "kind": "", "label": "", "decodable": False, "error": "",
        "duplicate_of": None, "reasons": [["unrecognised_layout"] for _ in paths],
        "warnings": [[] for _ in paths],
    })
    return _Inspection(batch_id, root, "unknown", frame, None, message,
                       unlisted_files(root, "unknown", set(paths)))


# -------------------------------------------------------------------------------- results
def _result(cfg: Config, insp: _Inspection, report_dir: Path, message: str = "",
            dataset_version: int | None = None,
            leakage: dict[str, Any] | None = None) -> ValidationResult:
    """Write the steward's report and say what happened."""
    frame = insp.frame
    rejected = bool(insp.rejection)
    lost = frame if rejected else frame[insp.failed]
    reasons = Counter(r for rs in lost["reasons"] for r in rs)
    if rejected:
        reasons["batch_rejected"] = len(frame)
    warnings = Counter(w for ws in frame["warnings"] for w in ws)
    outcome = insp.outcome
    docs = str(outcome.data_docs) if outcome and outcome.data_docs else None
    result = ValidationResult(
        batch_id=insp.batch_id, status="rejected" if rejected else "accepted",
        layout=insp.layout, images=len(frame), accepted=len(frame) - len(lost),
        quarantined=len(lost), reasons=dict(sorted(reasons.items())),
        report_dir=str(report_dir), data_docs=docs,
        message=message or insp.rejection, leakage=leakage,
    )
    summary: dict[str, Any] = {
        **result.to_dict(),
        "rejection_reason": insp.rejection or None,
        "warnings": dict(sorted(warnings.items())),
        "soft_failures": outcome.soft_failures if outcome else [],
        "table_failures": outcome.table_failures if outcome else [],
        "dataset_version": dataset_version,
        "subjects": sorted(set(frame.get("subject_id", pd.Series(dtype=str))) - {""}),
        "ignored": dict(sorted(insp.ignored.items())),
        "files": _file_counts(insp, lost),
        "drift": _drift_summary(cfg, insp),
    }
    shown = lost.assign(reasons=[
        (["batch_rejected"] if rejected else []) + list(rs) for rs in lost["reasons"]
    ])
    write_report(report_dir, summary, shown, insp.root,
                 outcome.expectations if outcome else [])
    return result


def _drift_summary(cfg: Config, insp: _Inspection) -> dict[str, Any] | None:
    """The drift verdict for the report, with the MLflow run it was logged to."""
    if insp.drift is None:
        return None
    return {**insp.drift.to_dict(), "mlflow_run_id": log_drift(cfg, insp.batch_id, insp.drift)}


def _file_counts(insp: _Inspection, lost: pd.DataFrame) -> dict[str, int]:
    """Every file of the batch folder, once: ``present = curated + quarantined + ignored``.

    ``named_but_missing`` counts records of files a manifest or annotation names that never
    arrived (quarantined as ``missing_file``): they are rows of the report, not files.
    """
    present = {p.relative_to(insp.root).as_posix() for p in insp.root.rglob("*") if p.is_file()}
    quarantined = sum(1 for p in lost["path"] if p in present)
    return {"present": len(present), "curated": len(insp.frame) - len(lost),
            "quarantined": quarantined, "ignored": len(insp.ignored),
            "named_but_missing": len(lost) - quarantined}


def _failed(cfg: Config, batch_id: str, report_dir: Path, message: str) -> ValidationResult:
    """A batch that could not be staged: nothing curated or quarantined; the report says why."""
    result = ValidationResult(batch_id=batch_id, status="failed", layout="", images=0,
                              accepted=0, quarantined=0, reasons={}, report_dir=str(report_dir),
                              data_docs=None, message=message)
    empty = pd.DataFrame(columns=["path", "kind", "label", "decodable", "error", "reasons",
                                  "duplicate_of"])
    write_report(report_dir, {**result.to_dict(), "rejection_reason": message}, empty,
                 report_dir)
    return result


def _skipped(cfg: Config, batch_id: str, message: str) -> ValidationResult:
    return ValidationResult(batch_id=batch_id, status="skipped", layout="", images=0, accepted=0,
                            quarantined=0, reasons={}, report_dir="", data_docs=None,
                            message=message)


# ------------------------------------------------------------------------------- writing
def _quarantine(cfg: Config, insp: _Inspection, rows: pd.DataFrame, batch_reason: str) -> None:
    """Copy failed files to ``<batch_id>/<path>`` in the quarantine store + ``reasons.csv``."""
    store = open_storage(cfg.uri("quarantine"), cfg.storage.s3_endpoint_url,
                         cfg.storage.s3_region)
    for path in rows["path"]:
        src = insp.root / path
        if src.is_file():
            store.copy_in(src, f"{insp.batch_id}/{path}")
    table = pd.DataFrame({
        "path": rows["path"],
        "reasons": [";".join(([batch_reason] if batch_reason else []) + list(rs))
                    for rs in rows["reasons"]],
        "duplicate_of": rows["duplicate_of"].fillna(""),
    })
    store.write_bytes(f"{insp.batch_id}/reasons.csv", table.to_csv(index=False).encode())


def _content_keys(row: Any) -> tuple[str, str]:
    ext = _EXT.get(row.format) or PurePosixPath(row.path).suffix.lstrip(".").lower() or "bin"
    key = f"images/{row.sha256[:2]}/{row.sha256}.{ext}"
    return key, (f"labels/{row.sha256}.txt" if row.kind == "field" else "")


def _curate(cfg: Config, insp: _Inspection,
            cache: Path) -> tuple[int, LeakageCheck | None, bool]:
    """Copy accepted files into the curated store and write the next manifest version.

    The files go first (content-addressed, outside any lock); the rows are then appended to
    whatever manifest version is newest when this batch's turn comes, so a curation running
    at the same time (another ``leukoflow ingest``, another worker) loses no rows to this one.
    Under the manifest lock, on that newest manifest, the near-duplicate check
    (:mod:`training.data.leakage`) deals the splits; its record is written beside the version.
    Returns the version now newest, the check (None when there was nothing to check) and
    whether this call wrote that version (and its ``leakage.json``).
    """
    store = dataset.curated_storage(cfg)
    accepted = insp.frame[~insp.failed]
    rows, phashes = [], {}
    for row in accepted.itertuples(index=False):
        key, label_key = _content_keys(row)
        if not store.exists(key):
            store.copy_in(insp.root / row.path, key)
        if label_key:
            store.write_text(label_key, row.yolo_labels + ("\n" if row.yolo_labels else ""))
        phashes.setdefault(row.sha256, row.phash)
        rows.append({
            "sha256": row.sha256, "key": key, "kind": row.kind, "label": row.label,
            "subject_id": row.subject_id, "batch_id": insp.batch_id,
            "source": f"{insp.batch_id}/{row.path}", "width": int(row.width),
            "height": int(row.height), "split_group": "", "label_key": label_key,
            "split": given_split(insp.layout, row.path) if cfg.split.keep_given else "",
        })
    state: dict[str, Any] = {"check": None, "written": False}

    def extend(old: pd.DataFrame) -> pd.DataFrame | None:
        state["check"] = None
        owner = dict(zip(old["sha256"], old["batch_id"], strict=True))
        # rerun after a crash: this batch's rows are already in it; a concurrent batch that
        # got the same bytes in first: that file is quarantined here, not counted twice
        taken = {r["source"]: ALREADY for r in rows
                 if r["sha256"] in owner and owner[r["sha256"]] != insp.batch_id}
        new_rows = [r for r in rows if r["sha256"] not in owner]
        if not new_rows:
            if taken:
                state["check"] = LeakageCheck(insp.batch_id,
                                              cfg.validation.near_duplicate_hamming,
                                              quarantine=taken, quarantined=len(taken))
            return None
        index = _read_phash_index(store)  # read again: a concurrent curation may have grown it
        for sha, phash in phashes.items():
            index.setdefault(sha, phash)
        missing = old[~old["sha256"].isin(index)]
        if len(missing):  # rows curated before the index existed
            index.update(_compute_phashes(cfg, missing, cache))
        store.write_bytes(PHASH_INDEX, pd.DataFrame(
            sorted(index.items()), columns=["sha256", "phash"]).to_csv(index=False).encode())
        combined = pd.concat([old, pd.DataFrame(new_rows, columns=dataset.MANIFEST_COLUMNS)],
                             ignore_index=True)
        combined[["split", "split_group"]] = combined[["split", "split_group"]].fillna("")
        is_new = [False] * len(old) + [True] * len(new_rows)
        hashes = as_hex_or_blank([index.get(sha, "") for sha in combined["sha256"]])
        out, check = check_and_assign(combined, is_new, hashes, cfg, insp.batch_id,
                                      confirm=_twin_confirmer(cfg, insp, combined, cache))
        check.quarantine.update(taken)
        check.quarantined = len(check.quarantine)
        state["check"] = check
        return out

    def record(version: int) -> None:  # under the lock, right after the version was written
        check = state["check"]
        state["written"] = True
        if check is not None:
            store.create(dataset.leakage_key(version), json.dumps(
                {"version": version, **check.to_dict()}, indent=2, sort_keys=True).encode())

    version = dataset.append_manifest(cfg, extend, on_published=record)
    return version, state["check"], state["written"]


def _twin_confirmer(cfg: Config, insp: _Inspection, combined: pd.DataFrame,
                    cache: Path) -> Callable[[int, int], bool]:
    """``confirm(i, j)``: whether rows ``i`` and ``j`` show the same picture (pixels)."""
    store = dataset.curated_storage(cfg)
    prefix = f"{insp.batch_id}/"

    def local(k: int) -> Path:
        source, key = str(combined.at[k, "source"]), str(combined.at[k, "key"])
        if source.startswith(prefix) and combined.at[k, "batch_id"] == insp.batch_id:
            return insp.root / source[len(prefix):]
        return _curated_file(store, key, cache)

    def confirm(i: int, j: int) -> bool:
        return same_picture(local(i), local(j))

    return confirm


# ------------------------------------------------------------------------------ the stage
def validate_batch(cfg: Config, batch_id: str) -> ValidationResult:
    """Validate one landing batch and curate or quarantine its files (idempotent).

    A batch already in the ledger returns its stored verdict untouched; one without a
    completion marker returns ``skipped`` and is not read. One that cannot be staged (its keys
    cannot be laid out as files) is recorded as ``failed`` with the reason, in the ledger and
    the report index, instead of raising: a data problem of one batch must not stop the
    others' dataset event. Storage outages still raise (the task retries).
    """
    check_batch_id(batch_id)
    stored = read_ledger(cfg, batch_id)
    if stored is not None:
        log.info("batch %s was processed before (%s): nothing to do", batch_id, stored.status)
        return stored
    if find_marker(cfg, batch_id, landing_storage(cfg)) is None:
        return _skipped(cfg, batch_id, f"batch {batch_id} has no completion marker "
                        f"({' or '.join(cfg.storage.ready_markers)}) yet: left alone")
    report_dir = cfg.reports_dir / batch_id
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"stage-{batch_id}-", dir=cfg.state_dir) as tmp:
        try:
            root = stage_batch(cfg, batch_id, Path(tmp) / "batch")
        except DataValidationError as exc:  # the batch's own fault: record it, don't retry
            result = _failed(cfg, batch_id, report_dir, f"cannot stage the batch: {exc}")
        else:
            insp = _inspect(cfg, root, batch_id, Path(tmp), own_batch=batch_id)
            if insp.rejection:
                _quarantine(cfg, insp, insp.frame, "batch_rejected")
                result = _result(cfg, insp, report_dir)
            else:
                _quarantine(cfg, insp, insp.frame[insp.failed], "")
                version, check, written = _curate(cfg, insp, Path(tmp))
                if check is not None and check.quarantine:  # refused under the lock
                    _refuse_late(insp, check.quarantine)
                    _quarantine(cfg, insp, insp.frame[insp.failed], "")
                leakage = None
                if check is not None:
                    leakage = {**check.summary(), "record": (
                        f"{dataset.curated_storage(cfg).uri}/{dataset.leakage_key(version)}"
                        if written else None)}
                result = _result(cfg, insp, report_dir, dataset_version=version,
                                 message=f"curated dataset version {version}", leakage=leakage)
    write_ledger(cfg, result)
    write_index(cfg.reports_dir)
    log.info("batch %s %s: %d accepted, %d quarantined %s %s", batch_id, result.status,
             result.accepted, result.quarantined, result.reasons, result.message)
    return result


def _refuse_late(insp: _Inspection, refused: dict[str, str]) -> None:
    """Add the reasons of files the check under the manifest lock left out (``source`` keys)."""
    prefix = f"{insp.batch_id}/"
    by_path = {src[len(prefix):]: why for src, why in refused.items()}
    insp.frame["reasons"] = [list(rs) + ([by_path[p]] if p in by_path and by_path[p] not in rs
                                         else []) for p, rs in zip(
        insp.frame["path"], insp.frame["reasons"], strict=True)]


def validate_path(cfg: Config, path: Path, report_dir: Path) -> ValidationResult:
    """Run import, metadata, suite and report on any local folder; curate nothing.

    The verdict says what :func:`validate_batch` would decide (``accepted`` or ``rejected``);
    duplicates of the curated store and test-set leaks are checked against it as it stands.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise DataValidationError(f"{path} is not a folder")
    with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
        insp = _inspect(cfg, path, path.name, Path(tmp), own_batch=None)
        return _result(cfg, insp, Path(report_dir))
