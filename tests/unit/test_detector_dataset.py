"""write_yolo_dataset: curated field rows -> the folder layout and data.yaml Ultralytics reads.

No torch or ultralytics here: the function under test is plain files and YAML.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from training.detector.yolo_data import write_yolo_dataset
from training.errors import DataValidationError

CLASSES = ["WBC", "RBC"]


def _manifest(tmp_path: Path, splits: list[str], labels: list[str] | None = None) -> pd.DataFrame:
    """Fake materialized rows: one field per split entry, plus a cell image that must be ignored."""
    store = tmp_path / "store"
    rows = []
    for i, split in enumerate(splits):
        sha = f"{i:02d}" + "a" * 62
        img = store / "images" / sha[:2] / f"{sha}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        img.write_bytes(b"jpeg bytes " + sha.encode())
        lab = store / "labels" / f"{sha}.txt"
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text(labels[i] if labels else f"{i % 2} 0.5 0.5 0.2 0.25\n")
        rows.append({"sha256": sha, "kind": "field", "split": split, "subject_id": "",
                     "path": str(img), "label_path": str(lab)})
    cell = store / "images" / "ce" / "cell.png"
    cell.parent.mkdir(parents=True, exist_ok=True)
    cell.write_bytes(b"png")
    rows.append({"sha256": "ce" * 32, "kind": "cell", "split": "train", "subject_id": "7",
                 "path": str(cell), "label_path": ""})
    return pd.DataFrame(rows)


def test_layout_links_labels_and_data_yaml(tmp_path: Path) -> None:
    df = _manifest(tmp_path, ["train", "train", "val", "test"])
    data_yaml = write_yolo_dataset(df, tmp_path / "yolo", CLASSES)

    dest = tmp_path / "yolo"
    assert data_yaml == dest / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text())
    assert data["path"] == str(dest.resolve()) and Path(data["path"]).is_absolute()
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val",
                                                          "images/test")
    assert data["names"] == {0: "WBC", 1: "RBC"} and data["nc"] == 2

    fields = df[df["kind"] == "field"]
    for row in fields.itertuples():
        image = dest / "images" / row.split / f"{row.sha256}.jpg"
        label = dest / "labels" / row.split / f"{row.sha256}.txt"
        assert image.read_bytes() == Path(row.path).read_bytes()
        assert image.is_symlink() and image.resolve() == Path(row.path).resolve()
        assert label.read_text() == Path(row.label_path).read_text()
    counts = {s: len(list((dest / "images" / s).iterdir())) for s in ("train", "val", "test")}
    assert counts == {"train": 2, "val": 1, "test": 1}  # the cell row is not a field
    assert "cell" not in {p.name for p in dest.rglob("*")}


def test_rewrite_drops_stale_files(tmp_path: Path) -> None:
    df = _manifest(tmp_path, ["train", "val", "test"])
    write_yolo_dataset(df, tmp_path / "yolo", CLASSES)
    write_yolo_dataset(df[df["split"] != "val"], tmp_path / "yolo", CLASSES)
    assert not (tmp_path / "yolo" / "images" / "val").exists()


def test_empty_val_falls_back_to_train_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    df = _manifest(tmp_path, ["train", "train", "test"])
    with caplog.at_level(logging.WARNING, logger="training.detector"):
        data_yaml = write_yolo_dataset(df, tmp_path / "yolo", CLASSES)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["val"] == "images/train" and data["test"] == "images/test"
    assert any("val split" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("splits", [["train", "val"], ["val", "test"]])
def test_train_and_test_must_not_be_empty(tmp_path: Path, splits: list[str]) -> None:
    with pytest.raises(DataValidationError, match="train and test"):
        write_yolo_dataset(_manifest(tmp_path, splits), tmp_path / "yolo", CLASSES)


def test_field_without_label_file_is_a_background_image(tmp_path: Path) -> None:
    df = _manifest(tmp_path, ["train", "test"])
    df.loc[0, "label_path"] = ""
    write_yolo_dataset(df, tmp_path / "yolo", CLASSES)
    label = tmp_path / "yolo" / "labels" / "train" / f"{df.loc[0, 'sha256']}.txt"
    assert label.read_text() == ""


@pytest.mark.parametrize(
    "bad", ["2 0.5 0.5 0.1 0.1", "0 0.5 0.5 1.5 0.1", "0 0.5 0.5", "x 1 1 1 1"])
def test_bad_label_lines_are_refused_with_file_and_line(tmp_path: Path, bad: str) -> None:
    df = _manifest(tmp_path, ["train", "test"], labels=["0 0.5 0.5 0.2 0.2\n", f"{bad}\n"])
    with pytest.raises(DataValidationError, match=r"line 1 .*class in 0\.\.1"):
        write_yolo_dataset(df, tmp_path / "yolo", CLASSES)


def test_unmaterialized_manifest_is_refused(tmp_path: Path) -> None:
    df = _manifest(tmp_path, ["train", "test"]).drop(columns="path")
    with pytest.raises(DataValidationError, match="materialize"):
        write_yolo_dataset(df, tmp_path / "yolo", CLASSES)


def test_copies_when_symlinks_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.detector.yolo_data as det

    def refuse(*_: object, **__: object) -> None:
        raise OSError("symlinks not permitted")

    monkeypatch.setattr(det.os, "symlink", refuse)
    df = _manifest(tmp_path, ["train", "test"])
    write_yolo_dataset(df, tmp_path / "yolo", CLASSES)
    image = tmp_path / "yolo" / "images" / "train" / f"{df.loc[0, 'sha256']}.jpg"
    assert not image.is_symlink() and image.read_bytes() == Path(df.loc[0, "path"]).read_bytes()


def test_importing_the_module_pulls_in_no_torch_ultralytics_or_mlflow() -> None:
    """Serving and the DAG import this module; heavy imports must wait until they are needed."""
    heavy = ("torch", "ultralytics", "mlflow", "tensorflow")
    code = ("import sys, training.detector.predict, training.detector.train; "
            f"print([m for m in {heavy} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("nbs", "batch", "n_train", "expected"), [
    (None, 4, 24, 4),      # demo-sized: no accumulation, one optimizer step per batch
    (None, 16, 1008, 64),  # TXL-PBC-sized: Ultralytics' default accumulation
    (32, 4, 24, 32),       # an explicit value always wins
])
def test_nominal_batch(nbs: int | None, batch: int, n_train: int, expected: int) -> None:
    from training.detector.train import _nominal_batch

    assert _nominal_batch(nbs, batch, n_train) == expected
