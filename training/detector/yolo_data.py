"""The detector's data: curated smear fields laid out the way Ultralytics reads them."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import yaml

from training.errors import ConfigError, DataValidationError

__all__ = ["SPLITS", "write_yolo_dataset", "write_yolo_test_set"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _link(src: Path, dest: Path) -> None:
    """Symlink ``dest`` -> ``src``; copy where the filesystem refuses links."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _read_labels(path: str, n_classes: int, image: str) -> str:
    """The YOLO label text of one field, checked: ``class cx cy w h``, class in range."""
    if not path:
        return ""  # an image without objects is a valid background image
    if not Path(path).is_file():
        raise DataValidationError(f"label file {path} of field {image} is missing")
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    for i, parts in enumerate(lines, 1):
        ok = len(parts) == 5
        try:
            cls, box = int(parts[0]), [float(v) for v in parts[1:]]
        except (ValueError, IndexError):
            ok = False
        if not ok or not 0 <= cls < n_classes or not all(0.0 <= v <= 1.0 for v in box):
            raise DataValidationError(
                f"label file {path} (field {image}) line {i} = {' '.join(parts)!r}: expected "
                f"'class cx cy w h' with class in 0..{n_classes - 1} and coordinates in [0, 1]"
            )
    return "".join(" ".join(parts) + "\n" for parts in lines)


def write_yolo_dataset(df: pd.DataFrame, dest: Path, classes: list[str]) -> Path:
    """Lay out the smear fields of a materialized manifest the way Ultralytics reads them.

    ``dest/images/<split>/<sha>.<ext>`` are symlinks to the curated files (copies where links
    fail); ``dest/labels/<split>/<sha>.txt`` are checked copies of the YOLO labels. Only
    ``kind == "field"`` rows count. If the manifest has no ``val`` fields, training validates on
    ``train`` (a logged warning: early stopping and best-epoch choice then see training images);
    final metrics are always computed on ``test``, which must not be empty. Returns
    ``dest/data.yaml``.
    """
    if "path" not in df.columns:
        raise DataValidationError("the manifest has no 'path' column: run dataset.materialize()")
    if not classes:
        raise ConfigError("detector classes are empty: set data.detector_classes")
    fields = df[df["kind"] == "field"]
    counts = {s: int((fields["split"] == s).sum()) for s in SPLITS}
    if counts["train"] == 0 or counts["test"] == 0:
        raise DataValidationError(
            f"the detector needs smear fields in train and test, got {counts} "
            f"({len(fields)} fields in all)"
        )
    dest = Path(dest)
    for sub in ("images", "labels"):
        shutil.rmtree(dest / sub, ignore_errors=True)  # no stale files from an older version
    seen: set[str] = set()
    for row in fields.itertuples(index=False):
        if row.split not in SPLITS:
            raise DataValidationError(f"field {row.sha256} has split {row.split!r}, not {SPLITS}")
        if row.sha256 in seen:
            continue
        seen.add(row.sha256)
        src = Path(row.path)
        if not src.is_file():
            raise DataValidationError(f"image {src} of field {row.sha256} is missing")
        label_path = getattr(row, "label_path", "") or ""
        text = _read_labels(str(label_path), len(classes), row.sha256)
        _link(src.resolve(), dest / "images" / row.split / f"{row.sha256}{src.suffix.lower()}")
        label = dest / "labels" / row.split / f"{row.sha256}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(text)
    val = "images/val"
    if counts["val"] == 0:
        log.warning("no smear fields in the val split: validating on train during training "
                    "(best-epoch choice is then optimistic); test metrics are unaffected")
        val = "images/train"
    data = {
        "path": str(dest.resolve()),
        "train": "images/train",
        "val": val,
        "test": "images/test",
        "nc": len(classes),
        "names": dict(enumerate(classes)),
    }
    data_yaml = dest / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


def write_yolo_test_set(fields: list[tuple[Path, str, str]], dest: Path,
                        classes: list[str]) -> Path:
    """A test-only Ultralytics dataset of labelled fields ``(image, stem, YOLO label text)``,
    the label ids already those of ``classes``: what ``leukoflow evaluate`` scores a detector
    on. Images are named by ``stem`` (the caller uses the content hash, as
    :func:`write_yolo_dataset` does, so the images sort in the training run's order); every
    split points at ``images/test``. Returns ``dest/data.yaml``."""
    if not fields:
        raise DataValidationError(f"no labelled fields to score under {dest}")
    dest = Path(dest)
    for sub in ("images", "labels"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    for image, stem, text in fields:
        _link(Path(image).resolve(), dest / "images" / "test" / f"{stem}{image.suffix.lower()}")
        label = dest / "labels" / "test" / f"{stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(text + ("\n" if text and not text.endswith("\n") else ""))
    data = {"path": str(dest.resolve()), "train": "images/test", "val": "images/test",
            "test": "images/test", "nc": len(classes), "names": dict(enumerate(classes))}
    data_yaml = dest / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml
