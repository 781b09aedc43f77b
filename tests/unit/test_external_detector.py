"""`leukoflow evaluate` on a detector: reading a labelled field folder into the model's classes
(no torch here; the scoring itself is in tests/integration/test_detector_train.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from PIL import Image

from training.detector.external import folder_fields
from training.errors import DataValidationError
from training.families import FAMILIES


def _img(path: Path, colour: tuple[int, int, int] = (120, 60, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10), colour).save(path, "JPEG")
    return path


def _yolo(root: Path, names: str, labels: dict[str, str]) -> Path:
    (root / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text(f"names: {names}\n")
    for i, (stem, text) in enumerate(labels.items()):
        _img(root / "images" / f"{stem}.jpg", (10 * i, 60, 200))
        (root / "labels" / f"{stem}.txt").write_text(text)
    return root


def test_every_family_names_a_scorer_that_exists() -> None:
    for family in FAMILIES.values():
        module, func = family.evaluate.split(":")
        assert callable(getattr(importlib.import_module(module), func)), family.name
        assert family.count_metric and family.headline


def test_folder_ids_become_the_models_and_unknown_classes_are_dropped(tmp_path: Path) -> None:
    root = _yolo(tmp_path / "lab", "[RBC, WBC]", {
        "a": "1 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.05 0.05\n",
        "b": "0 0.3 0.3 0.1 0.1\n",
        "c": "",  # a background field: scored, with no boxes
    })
    layout, rows, left = folder_fields(root, ["WBC"])
    assert layout == "yolo" and len(rows) == 3
    assert list(rows["sha256"]) == sorted(rows["sha256"])  # the order training scores them in
    by_file = rows.set_index("file")
    assert by_file.loc["images/a.jpg", "labels"] == "0 0.5 0.5 0.2 0.2"
    assert by_file.loc["images/b.jpg", "labels"] == ""
    assert by_file["n_boxes"].to_dict() == {"images/a.jpg": 1, "images/b.jpg": 0,
                                            "images/c.jpg": 0}
    assert left == {"skipped": {}, "boxes_dropped": {"RBC": 2}, "classes_not_in_model": ["RBC"]}


def test_voc_names_map_by_name_and_twins_are_scored_once(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for stem in ("x", "twin"):
        _img(root / "JPEGImages" / f"{stem}.jpg")  # the same bytes twice
        objects = ("<object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                   "<ymax>5</ymax></bndbox></object><object><name>WBC</name><bndbox><xmin>2"
                   "</xmin><ymin>2</ymin><xmax>12</xmax><ymax>8</ymax></bndbox></object>")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>20</width><height>10"
            f"</height></size>{objects}</annotation>")
    layout, rows, left = folder_fields(root, ["WBC", "RBC", "Platelets"])
    assert layout == "voc" and len(rows) == 1
    # VOC's first-seen order is RBC, WBC; the model's is WBC, RBC: ids follow the model
    assert rows.loc[0, "labels"].splitlines() == ["1 0.150000 0.300000 0.200000 0.400000",
                                                  "0 0.350000 0.500000 0.500000 0.600000"]
    assert (rows.loc[0, "n_boxes__WBC"], rows.loc[0, "n_boxes__RBC"],
            rows.loc[0, "n_boxes__Platelets"]) == (1, 1, 0)
    assert left["skipped"] == {"duplicate_image": 1} and left["classes_not_in_model"] == []


def test_a_folder_sharing_no_class_with_the_model_is_refused_naming_both(tmp_path: Path) -> None:
    root = _yolo(tmp_path / "rbc-only", "[RBC]", {"a": "0 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(DataValidationError, match=r"\['RBC'\].*\['WBC'\]"):
        folder_fields(root, ["WBC"])


def test_a_cell_folder_is_not_a_detection_set(tmp_path: Path) -> None:
    _img(tmp_path / "cells" / "hem" / "a.jpg")
    with pytest.raises(DataValidationError, match="no labelled smear fields"):
        folder_fields(tmp_path / "cells", ["WBC"])
