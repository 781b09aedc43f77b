"""Importers and metadata on the real public datasets in ../shared/data (see its README).

The expected numbers are the README's facts about those datasets; the code must find them on
its own. Skipped, with the reason, when the data folder is not beside the checkout.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from training.data.importers import class_names, import_batch
from training.data.metadata import extract_metadata

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent "
                       "(see ../shared/data/README.md); these tests need it beside the checkout"),
]


def _metadata(name: str) -> tuple[str, pd.DataFrame]:
    layout, records = import_batch(DATA / name, name)
    return layout, extract_metadata(DATA / name, records, name)


@pytest.fixture(scope="module")
def all_4class() -> tuple[str, pd.DataFrame]:
    return _metadata("all_4class")


@pytest.fixture(scope="module")
def cnmc_fold1() -> tuple[str, pd.DataFrame]:
    return _metadata("cnmc_fold1")


def _duplicate_pairs(df: pd.DataFrame) -> set[frozenset[str]]:
    groups = df[df["sha256"].duplicated(keep=False)].groupby("sha256")["path"]
    return {frozenset(paths) for _, paths in groups}


def test_all_4class(all_4class: tuple[str, pd.DataFrame]) -> None:
    layout, df = all_4class
    assert layout == "class_folders"
    assert len(df) == 3256
    assert df["label"].value_counts().to_dict() == {
        "Early": 985, "Pre": 963, "Pro": 804, "Benign": 504,
    }
    assert (df["subject_id"] == "").all()
    assert df["decodable"].all() and (df["error"] == "").all()
    assert set(df["format"]) == {"JPEG"} and set(df["width"]) == set(df["height"]) == {224}
    pairs = _duplicate_pairs(df)
    assert len(pairs) == 40 and all(len(p) == 2 for p in pairs)
    assert sum(len(p) for p in pairs) == 80


def test_cnmc_fold1(cnmc_fold1: tuple[str, pd.DataFrame]) -> None:
    layout, df = cnmc_fold1
    assert layout == "cnmc"
    assert len(df) == 1547
    assert df["label"].value_counts().to_dict() == {"all": 947, "hem": 600}
    subjects = df.groupby("label")["subject_id"].unique().map(set).to_dict()
    assert subjects["all"] == {"2", "16", "23", "30", "32", "33", "34", "38", "44", "46", "51"}
    assert subjects["hem"] == {"H10", "H14", "H22"}
    assert df["subject_id"].nunique() == 14
    assert df[df["label"] == "hem"]["subject_id"].value_counts().tolist() == [200, 200, 200]
    assert df["decodable"].all() and set(df["format"]) == {"PNG"}
    assert set(df["width"]) == set(df["height"]) == {450} and set(df["mode"]) == {"RGB"}
    assert df["background_fraction"].min() > 0.5  # one cell on a black background

    expected = {
        frozenset({f"hem/UID_H10_{a}_hem.png", f"hem/UID_H10_{b}_hem.png"})
        for a, b in (("176_1", "143_1"), ("135_2", "168_2"), ("152_2", "185_2"),
                     ("163_2", "130_2"), ("168_1", "135_1"))
    }
    assert _duplicate_pairs(df) == expected


def test_cnmc_challenge_layout_with_bmp() -> None:
    layout, df = _metadata("cnmc_bmp_layout")
    assert layout == "cnmc" and len(df) == 12
    assert df["label"].value_counts().to_dict() == {"all": 6, "hem": 6}
    assert set(df["subject_id"]) == {"16", "H10"}
    assert set(df["format"]) == {"BMP"} and df["decodable"].all()
    assert df["path"].str.startswith("C-NMC_Leukemia/training_data/fold_1/").all()


def test_bccd_voc_boxes() -> None:
    layout, records = import_batch(DATA / "bccd_voc", "bccd")
    assert layout == "voc" and len(records) == 364
    assert class_names(DATA / "bccd_voc", layout) == ["WBC", "RBC", "Platelets"]
    declared = Counter()
    for r in records:
        declared.update(r.box_counts)
        assert r.kind == "field" and r.label == ""
    assert dict(declared) == {"WBC": 372, "RBC": 4155, "Platelets": 361}
    # two annotations hold a zero-area RBC box: those images are flagged, not silently fixed
    bad = {r.path for r in records if r.error}
    assert bad == {"JPEGImages/BloodImage_00338.jpg", "JPEGImages/BloodImage_00343.jpg"}
    for r in records:
        if not r.error:
            lines = r.yolo_labels.splitlines()
            assert len(lines) == sum(r.box_counts.values())
            assert all(0.0 <= float(v) <= 1.0 for line in lines for v in line.split()[1:])


def test_txlpbc_yolo_splits_and_boxes() -> None:
    root = DATA / "txlpbc_yolo"
    layout, records = import_batch(root, "txl")
    assert layout == "yolo"
    names = class_names(root, layout)
    assert names == ["WBC", "RBC", "Platelets"]
    splits = Counter(r.path.split("/")[1] for r in records)
    assert splits == {"train": 1008, "val": 288, "test": 144}
    assert not any(r.error for r in records)

    # the same totals counted straight from the label files, independently
    from_files = Counter()
    for r in records:
        label_file = root / "labels" / Path(r.path).relative_to("images").with_suffix(".txt")
        for line in label_file.read_text().splitlines() if label_file.exists() else []:
            if line.strip():
                from_files[names[int(line.split()[0])]] += 1
    totals = Counter()
    for r in records:
        totals.update(r.box_counts)
    assert totals == from_files
    assert all(totals[n] > 0 for n in names)
    assert sum(len(r.yolo_labels.splitlines()) for r in records) == sum(totals.values())


def test_bccd_metadata_box_counts_survive_as_json() -> None:
    layout, records = import_batch(DATA / "bccd_voc", "bccd")
    df = extract_metadata(DATA / "bccd_voc", records, "bccd")
    totals = Counter()
    for s in df["box_counts"]:
        totals.update(json.loads(s))
    assert dict(totals) == {"WBC": 372, "RBC": 4155, "Platelets": 361}
    assert df["decodable"].all()
    assert set(df["error"]) == {"", "bad_label_file"}
    assert (set(df["width"]), set(df["height"])) == ({640}, {480})
