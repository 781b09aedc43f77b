"""Layout detection and import of batch folders, on tiny files made here."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from training.data.importers import LAYOUTS, ImageRecord, class_names, detect_layout, import_batch
from training.dev.synth import make_cell_batch, make_smear_batch, write_ready
from training.errors import DataValidationError


def _img(path: Path, size: tuple[int, int] = (8, 6), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 200)).save(path, fmt)
    return path


def _noise_files(root: Path) -> None:
    """Files every importer must ignore."""
    (root / ".DS_Store").write_bytes(b"\0\0")
    write_ready(root)
    (root / "README.md").write_text("notes\n")


# --------------------------------------------------------------------------- manifest
def test_manifest_wins_and_reports_missing_files(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "UID_1_1_1_all.png")  # C-NMC names, but the manifest comes first
    _img(tmp_path / "b.png")
    (tmp_path / "manifest.csv").write_text(
        "path,label,subject_id,source\n"
        "a/UID_1_1_1_all.png,all,P1,scanner-A\n"
        "b.png,hem,H2,\n"
        "gone.png,hem,H2,scanner-B\n"
    )
    layout, records = import_batch(tmp_path, "m1")
    assert layout == "manifest" == detect_layout(tmp_path)
    by_path = {r.path: r for r in records}
    assert set(by_path) == {"a/UID_1_1_1_all.png", "b.png", "gone.png"}
    assert by_path["a/UID_1_1_1_all.png"] == ImageRecord(
        path="a/UID_1_1_1_all.png", kind="cell", label="all", subject_id="P1", source="scanner-A"
    )
    assert by_path["b.png"].error == "" and by_path["b.png"].subject_id == "H2"
    assert by_path["gone.png"].error == "missing_file"


def test_manifest_without_source_column(tmp_path: Path) -> None:
    _img(tmp_path / "x.jpg", fmt="JPEG")
    (tmp_path / "manifest.csv").write_text("path,label,subject_id\nx.jpg,Pre,\n")
    _, [rec] = import_batch(tmp_path, "m2")
    assert (rec.label, rec.subject_id, rec.source, rec.error) == ("Pre", "", "", "")


@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/passwd", ""])
def test_manifest_paths_must_stay_inside_the_batch(tmp_path: Path, bad_path: str) -> None:
    (tmp_path / "manifest.csv").write_text(f"path,label,subject_id\n{bad_path},all,1\n")
    with pytest.raises(DataValidationError, match="inside the batch"):
        import_batch(tmp_path, "m3")


def test_manifest_missing_columns(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("file,label\nx.png,all\n")
    with pytest.raises(DataValidationError, match="subject_id"):
        import_batch(tmp_path, "m4")


# ------------------------------------------------------------------------------ C-NMC
def test_cnmc_synthetic_batch(tmp_path: Path) -> None:
    written = make_cell_batch(tmp_path, n_subjects_per_class=2, images_per_subject=2, size=32)
    _noise_files(tmp_path)
    layout, records = import_batch(tmp_path, "c1")
    assert layout == "cnmc"
    assert sorted(r.path for r in records) == sorted(
        p.relative_to(tmp_path).as_posix() for p in written
    )
    for r in records:
        name = r.path.rsplit("/", 1)[1]
        assert r.kind == "cell" and r.error == ""
        assert r.label == name.rsplit("_", 1)[1].split(".")[0]
        assert r.subject_id == name.split("_")[1]
        assert r.subject_id.startswith("H") == (r.label == "hem")
    assert len({r.subject_id for r in records}) == 4


def test_cnmc_challenge_folder_layout_with_bmp(tmp_path: Path) -> None:
    fold = tmp_path / "C-NMC_Leukemia" / "training_data" / "fold_1"
    _img(fold / "all" / "UID_16_11_1_all.bmp", fmt="BMP")
    _img(fold / "hem" / "UID_H10_100_2_hem.BMP", fmt="BMP")
    layout, records = import_batch(tmp_path, "c2")
    assert layout == "cnmc"
    assert [(r.label, r.subject_id) for r in records] == [("all", "16"), ("hem", "H10")]
    assert records[0].path == "C-NMC_Leukemia/training_data/fold_1/all/UID_16_11_1_all.bmp"


def test_cnmc_keeps_stray_files_as_unlabelled_records(tmp_path: Path) -> None:
    for i in range(3):
        _img(tmp_path / "all" / f"UID_5_{i}_1_all.png")
    _img(tmp_path / "all" / "scan.png")
    layout, records = import_batch(tmp_path, "c3")
    assert layout == "cnmc"
    stray = [r for r in records if r.path.endswith("scan.png")]
    assert len(stray) == 1 and stray[0].label == "" and stray[0].subject_id == ""


# ------------------------------------------------------------------------------- YOLO
def _yolo_batch(root: Path, names_yaml: str) -> None:
    for split, stem in (("train", "f1"), ("train", "f2"), ("val", "f3"), ("test", "f4")):
        _img(root / "images" / split / f"{stem}.jpg", (40, 20), "JPEG")
    labels = root / "labels"
    (labels / "train").mkdir(parents=True)
    (labels / "val").mkdir()
    (labels / "test").mkdir()
    (labels / "train" / "f1.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.05 0.05\n\n")
    (labels / "train" / "f2.txt").write_text("1 0.3 0.3 0.1 0.1\n")
    (labels / "val" / "f3.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # class 7 does not exist
    # test/f4 has no label file: a background image, as in Ultralytics
    (labels / "classes.txt").write_text("WBC\nRBC\n")  # LabelImg leftovers are not images
    (root / "data.yaml").write_text(f"train: images/train\nval: images/val\n{names_yaml}")


@pytest.mark.parametrize("names_yaml", ["names: [WBC, RBC]\n", "names:\n  0: WBC\n  1: RBC\n"])
def test_yolo_split_folders_and_names_list_or_dict(tmp_path: Path, names_yaml: str) -> None:
    _yolo_batch(tmp_path, names_yaml)
    _noise_files(tmp_path)
    layout, records = import_batch(tmp_path, "y1")
    assert layout == "yolo"
    assert class_names(tmp_path, layout) == ["WBC", "RBC"]
    by_path = {r.path: r for r in records}
    assert sorted(by_path) == [
        "images/test/f4.jpg", "images/train/f1.jpg", "images/train/f2.jpg", "images/val/f3.jpg",
    ]
    f1 = by_path["images/train/f1.jpg"]
    assert (f1.kind, f1.label, f1.error) == ("field", "", "")
    assert f1.box_counts == {"WBC": 1, "RBC": 1}
    assert f1.yolo_labels == "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.05 0.05"
    assert by_path["images/val/f3.jpg"].error == "bad_label_file"
    assert by_path["images/val/f3.jpg"].yolo_labels == ""
    bg = by_path["images/test/f4.jpg"]
    assert (bg.error, bg.yolo_labels, bg.box_counts) == ("", "", {})


@pytest.mark.parametrize("line", [
    "0 0.5 0.5 0.2", "0 1.5 0.5 0.2 0.2", "0 0.5 0.5 0 0.2", "x 0.5 0.5 0.2 0.2", "0 a b c d",
])
def test_yolo_bad_label_lines(tmp_path: Path, line: str) -> None:
    _img(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.1 0.1\n{line}\n")
    (tmp_path / "data.yaml").write_text("names: [WBC]\n")
    _, [rec] = import_batch(tmp_path, "y2")
    assert rec.error == "bad_label_file" and rec.yolo_labels == ""


def test_yolo_synthetic_smear_batch(tmp_path: Path) -> None:
    make_smear_batch(tmp_path, n_images=3, size=(160, 120))
    layout, records = import_batch(tmp_path, "y3")
    assert layout == "yolo" and len(records) == 3
    for r in records:
        lines = (tmp_path / "labels" / (Path(r.path).stem + ".txt")).read_text().split()
        assert r.box_counts == {"WBC": len(lines) // 5} and r.error == ""


def test_yolo_without_data_yaml_is_an_error(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataValidationError, match="data.yaml"):
        import_batch(tmp_path, "y4")


# -------------------------------------------------------------------------- Pascal VOC
def _voc_xml(filename: str, objects: list[tuple], size: tuple[int, int] | None = (200, 100)) -> str:
    size_xml = (f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth>"
                "</size>") if size else ""
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def test_voc_boxes_become_yolo_text(tmp_path: Path) -> None:
    jpg, ann = tmp_path / "JPEGImages", tmp_path / "Annotations"
    ann.mkdir(parents=True)
    for stem in ("img1", "img2", "img3", "img4", "img5"):
        _img(jpg / f"{stem}.jpg", (200, 100), "JPEG")
    (ann / "img1.xml").write_text(_voc_xml("img1.jpg", [("WBC", 50, 25, 150, 75),
                                                          ("RBC", 0, 0, 20, 10)]))
    (ann / "img2.xml").write_text(_voc_xml("img2.jpg", [("RBC", 10, 10, 30, 30),
                                                          ("Platelets", 190, 90, 210, 100)]))
    (ann / "img3.xml").write_text(_voc_xml("img3.jpg", [("RBC", 40, 40, 40, 40)]))  # zero area
    (ann / "img4.xml").write_text("<annotation><object>")  # not XML
    (ann / "img5.xml").write_text(_voc_xml("img5.jpg", [("WBC", 0, 0, 100, 50)], size=None))
    (ann / "lost.xml").write_text(_voc_xml("lost.jpg", [("WBC", 1, 1, 9, 9)]))
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("img1\n")

    layout, records = import_batch(tmp_path, "v1")
    assert layout == "voc"
    assert class_names(tmp_path, layout) == ["WBC", "RBC", "Platelets"]  # first appearance
    by_path = {r.path: r for r in records}
    assert sorted(by_path) == [f"JPEGImages/{s}.jpg" for s in
                               ("img1", "img2", "img3", "img4", "img5", "lost")]
    one = by_path["JPEGImages/img1.jpg"]
    assert one.kind == "field" and one.error == "" and one.box_counts == {"WBC": 1, "RBC": 1}
    assert one.yolo_labels.splitlines() == [
        "0 0.500000 0.500000 0.500000 0.500000", "1 0.050000 0.050000 0.100000 0.100000",
    ]
    # a box past the border is clipped to the image
    assert by_path["JPEGImages/img2.jpg"].yolo_labels.splitlines()[1] == (
        "2 1.000000 0.950000 0.100000 0.100000"
    )
    three = by_path["JPEGImages/img3.jpg"]
    assert three.error == "bad_label_file" and three.yolo_labels == ""
    assert three.box_counts == {"RBC": 1}  # what the annotation declared
    assert by_path["JPEGImages/img4.jpg"].error == "bad_label_file"
    five = by_path["JPEGImages/img5.jpg"]  # no <size>: read from the image header
    assert five.error == "" and five.yolo_labels == "0 0.250000 0.250000 0.500000 0.500000"
    assert by_path["JPEGImages/lost.jpg"].error == "missing_file"


# ----------------------------------------------------------------------- class folders
def test_class_folders(tmp_path: Path) -> None:
    for cls, n in (("Benign", 2), ("Early", 1), ("Pre", 1), ("Pro", 3)):
        for i in range(n):
            _img(tmp_path / cls / f"WBC-{cls}-{i:03d}.jpg", fmt="JPEG")
    _noise_files(tmp_path)
    (tmp_path / "Pro" / ".hidden.jpg").write_bytes(b"x")
    layout, records = import_batch(tmp_path, "f1")
    assert layout == "class_folders"
    assert [r.label for r in records] == ["Benign"] * 2 + ["Early", "Pre"] + ["Pro"] * 3
    assert all(r.subject_id == "" and r.kind == "cell" for r in records)
    assert records[0].path == "Benign/WBC-Benign-000.jpg"
    assert class_names(tmp_path, layout) == []


def test_images_folder_without_labels_is_not_yolo(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "a.png")
    assert detect_layout(tmp_path) == "class_folders"


# ---------------------------------------------------------------------------- no match
def test_flat_folder_matches_no_layout(tmp_path: Path) -> None:
    _img(tmp_path / "cell1.png")
    _img(tmp_path / "cell2.png")
    with pytest.raises(DataValidationError) as info:
        import_batch(tmp_path, "flat-1")
    message = str(info.value)
    assert "flat-1" in message and str(tmp_path) in message
    for looked_for in ("manifest.csv", "UID_", "images/", "JPEGImages/", "<Class>/<image>"):
        assert looked_for in message
    assert "cell1.png" in message


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    write_ready(tmp_path)
    with pytest.raises(DataValidationError, match="matches no known layout"):
        detect_layout(tmp_path)
    with pytest.raises(DataValidationError, match="does not exist"):
        detect_layout(tmp_path / "nope")


def test_layout_names_are_the_documented_ones() -> None:
    assert LAYOUTS == ("manifest", "cnmc", "yolo", "voc", "class_folders")


def test_given_split_only_where_a_yolo_layout_names_one() -> None:
    from training.data.importers import given_split

    assert given_split("yolo", "images/test/a.jpg") == "test"
    assert given_split("yolo", "images/val/sub/a.jpg") == "val"
    assert given_split("yolo", "images/a.jpg") == ""  # no split folder
    assert given_split("yolo", "images/holdout/a.jpg") == ""
    assert given_split("voc", "JPEGImages/test/a.jpg") == ""
