"""The validation stage on the real public datasets in ../shared/data (see its README).

The oracles are the datasets' known facts: byte-identical pairs, subject ids, sizes. The batches
are linked (file by file, read only) into a landing folder under tmp_path with a ``_READY``
marker, so nothing is ever written beside the real data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from training.config import Config, load_config
from training.data.curation import validate_batch
from training.data.dataset import load_manifest

pytestmark = pytest.mark.realdata

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _data(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (../shared/data beside the checkout)")
    return folder


def _land(cfg: Config, source: Path, batch_id: str) -> Path:
    """A landing batch made of symlinks to ``source``'s files, then the marker."""
    dest = cfg.home / "landing" / batch_id
    for dirpath, _dirs, files in os.walk(source):
        for name in files:
            src = Path(dirpath, name)
            link = dest / src.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src)
    (dest / "_READY").write_bytes(b"")
    return dest


def _quarantine_reasons(cfg: Config, batch_id: str) -> pd.DataFrame:
    return pd.read_csv(cfg.home / "quarantine" / batch_id / "reasons.csv", dtype=str,
                       keep_default_na=False)


def test_all_4class_exactly_40_duplicates_quarantined(tmp_path: Path):
    source = _data("all_4class")
    cfg = load_config(home=tmp_path / "home", data={
        "task": "multiclass", "classes": ["Benign", "Early", "Pre", "Pro"],
        "positive_class": None})
    _land(cfg, source, "all_4class")
    result = validate_batch(cfg, "all_4class")
    assert result.status == "accepted" and result.layout == "class_folders"
    assert (result.images, result.quarantined, result.accepted) == (3256, 40, 3216)
    assert result.reasons == {"duplicate": 40}
    reasons = _quarantine_reasons(cfg, "all_4class")
    for row in reasons.itertuples():  # each one really is byte-identical to the one it names
        assert (source / row.path).read_bytes() == (source / row.duplicate_of).read_bytes()
    manifest, ds = load_manifest(cfg)
    assert ds.n_cells == 3216 and manifest["sha256"].is_unique
    assert set(manifest["label"]) == {"Benign", "Early", "Pre", "Pro"}
    summary = json.loads((Path(result.report_dir) / "summary.json").read_text())
    assert summary["reasons"] == {"duplicate": 40} and Path(summary["data_docs"]).is_file()


def test_cnmc_fold1_h10_duplicates_and_subject_split(tmp_path: Path):
    source = _data("cnmc_fold1")
    cfg = load_config(home=tmp_path / "home")
    _land(cfg, source, "cnmc_fold1")
    result = validate_batch(cfg, "cnmc_fold1")
    assert result.status == "accepted" and result.layout == "cnmc"
    assert (result.images, result.quarantined, result.accepted) == (1547, 5, 1542)
    assert result.reasons == {"duplicate": 5}
    reasons = _quarantine_reasons(cfg, "cnmc_fold1")
    assert all(p.startswith("hem/UID_H10_") for p in reasons["path"])
    pairs = {frozenset((Path(r.path).stem.split("_")[2] + "_" + Path(r.path).stem.split("_")[3],
                        Path(r.duplicate_of).stem.split("_")[2] + "_"
                        + Path(r.duplicate_of).stem.split("_")[3]))
             for r in reasons.itertuples()}
    assert pairs == {frozenset(p) for p in [("176_1", "143_1"), ("135_2", "168_2"),
                                            ("152_2", "185_2"), ("163_2", "130_2"),
                                            ("168_1", "135_1")]}
    manifest, _ = load_manifest(cfg)
    assert manifest["subject_id"].nunique() == 14
    assert (manifest.groupby("subject_id")["split"].nunique() == 1).all()
    assert {"train", "test"} <= set(manifest["split"])
    assert validate_batch(cfg, "cnmc_fold1") == result  # idempotent: the ledger answers


def test_bccd_after_txlpbc_finds_the_221_shared_images(tmp_path: Path):
    txl, bccd = _data("txlpbc_yolo"), _data("bccd_voc")
    cfg = load_config(home=tmp_path / "home")
    _land(cfg, txl, "txlpbc")
    _land(cfg, bccd, "bccd")
    first = validate_batch(cfg, "txlpbc")
    assert (first.status, first.layout, first.images) == ("accepted", "yolo", 1440)
    second = validate_batch(cfg, "bccd")
    assert second.layout == "voc" and second.images == 364
    assert second.reasons["already_curated"] == 221  # the README's oracle, found on its own
    # most of BCCD is already curated: past max_failure_rate the batch is rejected whole
    assert second.status == "rejected" and second.accepted == 0
    _, ds = load_manifest(cfg)
    assert ds.batch_ids == ["txlpbc"] and ds.n_fields == 1440


def test_txlpbc_keeps_its_published_split_when_asked(tmp_path: Path):
    txl = _data("txlpbc_yolo")
    cfg = load_config(home=tmp_path / "home", split={"keep_given": True})
    _land(cfg, txl, "txlpbc")
    assert validate_batch(cfg, "txlpbc").accepted == 1440
    manifest, _ = load_manifest(cfg)
    given = manifest["source"].str.split("/").str[2]  # txlpbc/images/<split>/<name>
    assert (given == manifest["split"]).all()
    assert manifest["split"].value_counts().to_dict() == {"train": 1008, "val": 288,
                                                          "test": 144}
