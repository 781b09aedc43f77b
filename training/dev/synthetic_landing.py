"""Synthetic batches landed the way an uploader lands them (``leukoflow synth``, the demo, e2e)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from training.config import Config
from training.data.batches import landing_storage
from training.data.landing import upload_batch

__all__ = ["land_synthetic_batches", "seed_name"]


def land_synthetic_batches(
    cfg: Config, *, seed: int | None = None, n_subjects_per_class: int = 4,
    images_per_subject: int = 20, n_fields: int = 24,
) -> list[str]:
    """Generate a cell batch and a smear-field batch and upload both (next free seed by default)."""
    from training.dev.synth import make_cell_batch, make_smear_batch

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
