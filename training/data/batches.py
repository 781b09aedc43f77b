"""Batch discovery in the landing zone, and the ledger that makes validation idempotent.

A batch is a top-level prefix ``<batch_id>/`` of the landing store. It is *complete* once one of
``cfg.storage.ready_markers`` (``_READY`` or ``manifest.csv``) exists under it; uploaders write
the marker last, so a batch without one may still be growing and is never read. ``manifest.csv``
alone is a marker only when it is consistent: whole (every row has the header's fields) and every
file it names is already there; a manifest that lands before its images (an uploader that sends
files in name order) leaves the batch waiting, not half-read. ``_READY`` is the uploader's word
that everything arrived (:func:`training.data.landing.upload_batch` writes it after the manifest).

A batch is *processed* once its verdict sits in the curated store's ledger,
``batches/<batch_id>.json`` (written last by :func:`training.data.curation.validate_batch`);
discovery skips it from then on and a rerun of the stage returns the stored verdict. Nothing here
deletes anything from landing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path, PurePosixPath

from training.config import Config
from training.data.dataset import curated_storage
from training.errors import DataValidationError
from training.records import Batch, ValidationResult
from training.storage import Storage, open_storage

__all__ = [
    "LEDGER_PREFIX", "check_batch_id", "discover_batches", "find_marker", "landing_storage",
    "ledger_key", "manifest_waiting_for", "processed_batches", "read_ledger", "stage_batch",
    "write_ledger",
]

log = logging.getLogger("leukoflow.batches")
LEDGER_PREFIX = "batches"
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,199}$")
MANIFEST_MARKER = "manifest.csv"  # the steward's manifest; a marker only once consistent


def landing_storage(cfg: Config) -> Storage:
    return open_storage(cfg.uri("landing"), cfg.storage.s3_endpoint_url, cfg.storage.s3_region)


def check_batch_id(batch_id: str) -> str:
    """A batch id becomes a key prefix and a folder name: refuse anything that could escape."""
    if not _BATCH_ID.match(batch_id) or ".." in batch_id:
        raise DataValidationError(
            f"batch id {batch_id!r} is not a plain folder name (letters, digits, . _ - @ + =)"
        )
    return batch_id


def ledger_key(batch_id: str) -> str:
    return f"{LEDGER_PREFIX}/{check_batch_id(batch_id)}.json"


def read_ledger(cfg: Config, batch_id: str) -> ValidationResult | None:
    """The stored verdict on ``batch_id``, or None if it was never processed."""
    store = curated_storage(cfg)
    key = ledger_key(batch_id)
    if not store.exists(key):
        return None
    return ValidationResult.from_dict(json.loads(store.read_text(key)))


def write_ledger(cfg: Config, result: ValidationResult) -> None:
    curated_storage(cfg).write_text(
        ledger_key(result.batch_id), json.dumps(result.to_dict(), indent=2, sort_keys=True)
    )


def find_marker(cfg: Config, batch_id: str, store: Storage | None = None) -> str | None:
    """The first completion marker present in the batch, or None while it is incomplete.

    ``manifest.csv`` counts only once :func:`manifest_waiting_for` finds nothing missing.
    """
    store = store or landing_storage(cfg)
    for marker in cfg.storage.ready_markers:
        if store.exists(f"{batch_id}/{marker}"):
            if marker == MANIFEST_MARKER:
                missing = manifest_waiting_for(store, batch_id)
                if missing:
                    log.info("batch %s: %s is there but %d file(s) it names are not (e.g. %s): "
                             "left alone until they arrive or _READY is written", batch_id,
                             marker, len(missing), missing[:3])
                    continue
            return marker
    return None


def manifest_waiting_for(store: Storage, batch_id: str) -> list[str]:
    """What the batch's ``manifest.csv`` still waits for: files it names that are not there.

    A manifest whose text is cut short (no ``path`` column, a row with fewer fields than the
    header, bytes that are not UTF-8) waits for itself. Paths the importer will refuse
    (absolute, escaping the batch) are its business, not a reason to wait.
    """
    try:
        text = store.read_bytes(f"{batch_id}/{MANIFEST_MARKER}").decode("utf-8-sig")
    except UnicodeDecodeError:
        return [MANIFEST_MARKER]
    rows = list(csv.reader(io.StringIO(text)))
    header = [c.strip() for c in rows[0]] if rows else []
    if "path" not in header or any(len(r) != len(header) for r in rows[1:] if r):
        return [MANIFEST_MARKER]
    present = {key[len(batch_id) + 1:] for key in store.list(f"{batch_id}/")}
    missing = []
    for row in rows[1:]:
        rel = row[header.index("path")].strip().replace("\\", "/") if row else ""
        if not rel or rel.startswith("/") or ".." in PurePosixPath(rel).parts:
            continue
        rel = PurePosixPath(rel).as_posix()
        if rel not in present:
            missing.append(rel)
    return missing


def processed_batches(cfg: Config) -> set[str]:
    """Batch ids with a verdict in the ledger: one listing of ``batches/``, no per-batch call."""
    prefix = f"{LEDGER_PREFIX}/"
    return {key[len(prefix):-len(".json")] for key in curated_storage(cfg).list(prefix)
            if key.endswith(".json") and "/" not in key[len(prefix):]}


def discover_batches(cfg: Config) -> list[Batch]:
    """Complete, not yet processed batches in the landing zone, sorted by id.

    Two listings, not a walk of the landing zone: the batch ids are the landing store's
    top-level folders (:meth:`Storage.list_dirs`: S3 ``Delimiter="/"``, one page per 1,000
    batches however many files each holds), the processed ones the ledger's keys; only the
    rest is probed for a completion marker. ``bench/discovery.py`` measures both ways.
    """
    store = landing_storage(cfg)
    done = processed_batches(cfg)
    found: list[Batch] = []
    for batch_id in store.list_dirs(""):
        if batch_id in done:
            continue
        if not _BATCH_ID.match(batch_id):
            log.warning("ignoring landing folder %r: not a valid batch id", batch_id)
            continue
        marker = find_marker(cfg, batch_id, store)
        if marker is None:
            log.info("batch %s has no completion marker %s yet: left alone", batch_id,
                     cfg.storage.ready_markers)
            continue
        found.append(Batch(batch_id=batch_id, landing_uri=store.uri, marker=marker))
    return found


def stage_batch(cfg: Config, batch_id: str, dest: Path) -> Path:
    """A local folder holding the batch: the landing folder itself, or a copy of an S3 batch.

    Importers and image decoders need paths. A local landing store is read in place (read only);
    an S3 batch is downloaded to ``dest/<batch_id>``, skipping zero-byte "folder" objects
    (keys ending in ``/``). Landing is never modified. Raises ``DataValidationError`` when the
    keys cannot be laid out as files (one escapes the folder, a file and a folder share a name).
    """
    store = landing_storage(cfg)
    check_batch_id(batch_id)
    local = store.local_path(batch_id)
    if local is not None:
        if not local.is_dir():
            raise DataValidationError(f"batch {batch_id!r} does not exist in {store.uri}")
        return local
    root = Path(dest) / batch_id
    keys = list(store.list(f"{batch_id}/"))
    if not keys:
        raise DataValidationError(f"batch {batch_id!r} does not exist in {store.uri}")
    for key in keys:
        if key.endswith("/"):  # a "folder" object, as the MinIO and AWS consoles create them
            log.debug("batch %s: skipping folder marker object %r", batch_id, key)
            continue
        rel = key[len(batch_id) + 1:]
        target = (root / rel).resolve()
        if root.resolve() not in target.parents:
            raise DataValidationError(f"landing key {key!r} escapes the batch folder")
        try:
            store.download(key, target)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise DataValidationError(
                f"landing key {key!r} cannot be staged: a file and a folder of the batch "
                f"share a name ({exc.strerror})") from exc
    return root
