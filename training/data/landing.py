"""Putting batches into the landing zone the way an uploader must: files first, marker last.

The platform reads a batch only once its ``_READY`` marker exists (or a ``manifest.csv`` whose
named files are all there), so the order is: every data file, then ``manifest.csv``, then
``_READY``. An upload cut short anywhere leaves a batch that discovery does not pick up.
"""

from __future__ import annotations

from pathlib import Path

from training.config import Config
from training.data.batches import check_batch_id, landing_storage
from training.errors import DataValidationError

__all__ = ["upload_batch"]

READY = "_READY"


def upload_batch(cfg: Config, local_dir: Path, batch_id: str) -> str:
    """Copy a local folder to ``landing/<batch_id>/``, then write the completion marker."""
    check_batch_id(batch_id)
    store = landing_storage(cfg)
    if store.exists(f"{batch_id}/{READY}"):
        raise DataValidationError(f"batch {batch_id} is already complete in {store.uri}; "
                                  "batches are immutable, upload under a new id")
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.name != READY)
    if not files:
        raise DataValidationError(f"{local_dir} holds no files to upload")
    markers = [m for m in cfg.storage.ready_markers if m != READY]  # e.g. manifest.csv

    def rank(path: Path) -> int:  # data files first, then the manifest(s), _READY is not here
        rel = path.relative_to(local_dir).as_posix()
        return markers.index(rel) + 1 if rel in markers else 0

    for path in sorted(files, key=rank):  # stable: data files stay in name order
        store.copy_in(path, f"{batch_id}/{path.relative_to(local_dir).as_posix()}")
    store.write_bytes(f"{batch_id}/{READY}", b"")
    return batch_id
