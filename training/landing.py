"""Putting batches into the landing zone the way an uploader must: files first, marker last.

The platform reads a batch only once its ``_READY`` marker exists (or a ``manifest.csv`` whose
named files are all there), so the order is: every data file, then ``manifest.csv``, then
``_READY``. An upload cut short anywhere leaves a batch that discovery does not pick up.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from training.batches import check_batch_id, landing_storage
from training.config import Config
from training.errors import DataValidationError

__all__ = ["land_synthetic_batches", "upload_batch"]

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


def land_synthetic_batches(
    cfg: Config, *, seed: int | None = None, n_subjects_per_class: int = 4,
    images_per_subject: int = 20, n_fields: int = 24,
) -> list[str]:
    """Generate a cell batch and a smear-field batch and upload both (next free seed by default)."""
    from training.synth import make_cell_batch, make_smear_batch

    store = landing_storage(cfg)
    if seed is None:
        taken = {d for d in store.list_dirs() if d.startswith("synth-")}
        seed = next(s for s in range(10_000) if f"synth-cells-{seed_name(s)}" not in taken)
    ids = []
    with tempfile.TemporaryDirectory(prefix="leukoflow-synth-") as tmp:
        cells = Path(tmp) / "cells"
        make_cell_batch(cells, n_subjects_per_class=n_subjects_per_class,
                        images_per_subject=images_per_subject, seed=seed)
        ids.append(upload_batch(cfg, cells, f"synth-cells-{seed_name(seed)}"))
        if n_fields:
            fields = Path(tmp) / "fields"
            make_smear_batch(fields, n_images=n_fields, seed=seed)
            ids.append(upload_batch(cfg, fields, f"synth-fields-{seed_name(seed)}"))
    return ids


def seed_name(seed: int) -> str:
    return f"{seed:04d}"
