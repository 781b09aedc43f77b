"""The whole validation stage on synthetic batches: quarantine, curation, idempotence, splits."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from training.config import Config, load_config
from training.data.batches import discover_batches
from training.data.curation import validate_batch, validate_path
from training.data.dataset import curated_storage, latest_version, load_manifest
from training.dev.synth import make_bad_files, make_cell_batch, make_smear_batch, write_ready

CELL = {"n_subjects_per_class": 2, "images_per_subject": 8, "size": 64}
EXPECTED_BAD = {
    "truncated": "not_decodable:truncated",
    "empty": "not_decodable:empty",
    "not_an_image": "not_decodable:not_an_image",
    "wrong_mode": "wrong_mode",
    "too_small": "too_small",
    "decompression_bomb": "not_decodable:decompression_bomb",
}


def _config(home: Path, **overrides: object) -> Config:
    return load_config(home=home, validation={"workers": 1, **overrides})


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest_csv(root: Path, extra: dict[str, tuple[str, str]]) -> None:
    """``manifest.csv`` for every image under root; C-NMC names give label and subject."""
    lines = ["path,label,subject_id"]
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel == "manifest.csv":
            continue
        if rel in extra:
            label, subject = extra[rel]
        else:
            parts = p.stem.split("_")
            label, subject = parts[-1], parts[1]
        lines.append(f"{rel},{label},{subject}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")  # the marker: written last


def _bad_batch(root: Path, seed: int = 0) -> dict[str, str]:
    """32 good cells + 9 bad files (22 %); returns {path: expected reason} of the bad ones."""
    files = make_cell_batch(root, seed=seed, **CELL)
    bad = {f"fold_0/all/{name}": EXPECTED_BAD[kind]
           for name, kind in make_bad_files(root / "fold_0" / "all", seed=seed).items()}
    Image.open(files[0]).convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    Image.open(files[1]).rotate(90).save(root / "blast.png")
    shutil.copyfile(files[2], root / "zz_copy.png")  # sorts after fold_0/: it is the duplicate
    bad |= {"cmyk.jpg": "wrong_mode", "blast.png": "label_not_in_set",
            "zz_copy.png": "duplicate"}
    _manifest_csv(root, {"cmyk.jpg": ("all", "77"), "blast.png": ("blast", "77"),
                         "zz_copy.png": ("all", "77")})
    return bad


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("bad") / "home"
    cfg = _config(home)
    root = home / "landing" / "mixed"
    expected = _bad_batch(root)
    before = _snapshot(home / "landing")
    found = [b.batch_id for b in discover_batches(cfg)]
    result = validate_batch(cfg, "mixed")
    return cfg, root, expected, before, found, result


def test_every_bad_file_is_quarantined_with_its_reason(bad_run):
    cfg, root, expected, _, found, result = bad_run
    assert found == ["mixed"]
    assert result.status == "accepted" and result.layout == "manifest"
    assert (result.images, result.quarantined, result.accepted) == (41, 9, 32)
    reasons = pd.read_csv(cfg.home / "quarantine" / "mixed" / "reasons.csv", dtype=str,
                          keep_default_na=False)
    assert dict(zip(reasons["path"], reasons["reasons"], strict=True)) == expected
    dup = reasons.set_index("path").loc["zz_copy.png", "duplicate_of"]
    assert (root / dup).read_bytes() == (root / "zz_copy.png").read_bytes()
    for path in expected:  # the bytes, unchanged, under quarantine/<batch>/<original path>
        assert (cfg.home / "quarantine" / "mixed" / path).read_bytes() == (
            root / path).read_bytes()
    assert sum(result.reasons.values()) == 9


def test_every_good_file_is_curated_by_content(bad_run):
    cfg, root, expected, *_ = bad_run
    manifest, ds = load_manifest(cfg)
    assert ds.version == 1 and ds.n_cells == 32 and ds.batch_ids == ["mixed"]
    store = curated_storage(cfg)
    good = [p for p in root.rglob("*.png") if p.relative_to(root).as_posix() not in expected]
    assert len(good) == 32
    for p in good:
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        row = manifest.set_index("sha256").loc[sha]
        assert row["key"] == f"images/{sha[:2]}/{sha}.png"
        assert store.read_bytes(row["key"]) == p.read_bytes()
        assert row["label"] == p.stem.split("_")[-1] and row["subject_id"] == p.stem.split("_")[1]
    assert set(manifest["split"]) <= {"train", "val", "test"}


def test_nothing_is_deleted_from_landing_and_rerun_changes_nothing(bad_run):
    cfg, root, _, before, _, result = bad_run
    assert _snapshot(cfg.home / "landing") == before
    stores = {area: _snapshot(cfg.home / area) for area in ("curated", "quarantine")}
    again = validate_batch(cfg, "mixed")
    assert again == result
    assert {area: _snapshot(cfg.home / area) for area in stores} == stores
    assert latest_version(curated_storage(cfg)) == 1
    assert discover_batches(cfg) == []


def test_steward_report(bad_run):
    cfg, *_, result = bad_run
    report = Path(result.report_dir)
    assert report == cfg.reports_dir / "mixed"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["status"] == "accepted" and summary["quarantined"] == 9
    assert summary["reasons"]["not_decodable:decompression_bomb"] == 1
    assert summary["dataset_version"] == 1 and summary["rejection_reason"] is None
    assert Path(summary["data_docs"]).is_file()
    page = (report / "quarantine.html").read_text()
    assert page.count("<tr>") >= 9 + 1
    assert "data:image/png;base64," in page  # e.g. the 8x8 and the CMYK file
    assert 'class="ph">decompression_bomb<' in page  # never decoded: a placeholder
    assert Path(summary["data_docs"]).as_uri() in page
    assert "zz_copy.png" in page and "<script" not in page


def test_half_uploaded_batch_is_never_touched(cfg):
    root = cfg.home / "landing" / "uploading"
    make_cell_batch(root, seed=3, **CELL)
    before = _snapshot(root)
    assert discover_batches(cfg) == []
    result = validate_batch(cfg, "uploading")
    assert result.status == "skipped" and "marker" in result.message
    assert _snapshot(root) == before
    assert not (cfg.home / "curated").exists() and not (cfg.home / "quarantine").exists()
    write_ready(root)  # the upload finishes: now it is picked up
    assert [b.batch_id for b in discover_batches(cfg)] == ["uploading"]


def test_batch_over_the_failure_threshold_is_rejected_whole(tmp_path: Path):
    cfg = _config(tmp_path / "home", max_failure_rate=0.1)
    root = cfg.home / "landing" / "junk"
    _bad_batch(root)
    result = validate_batch(cfg, "junk")
    assert result.status == "rejected"
    assert (result.accepted, result.quarantined) == (0, 41)
    assert latest_version(curated_storage(cfg)) == 0  # nothing curated
    summary = json.loads((cfg.reports_dir / "junk" / "summary.json").read_text())
    assert summary["status"] == "rejected"
    assert "failure rate 22.0% exceeds max_failure_rate 10.0%" in summary["rejection_reason"]
    reasons = pd.read_csv(cfg.home / "quarantine" / "junk" / "reasons.csv", dtype=str,
                          keep_default_na=False)
    assert len(reasons) == 41 and reasons["reasons"].str.startswith("batch_rejected").all()
    assert _snapshot(cfg.home / "quarantine" / "junk").keys() - {"reasons.csv"} == (
        _snapshot(root).keys() - {"manifest.csv"})
    assert validate_batch(cfg, "junk") == result  # in the ledger: not retried


def test_splits_are_stable_across_versions_and_subjects_never_straddle(cfg):
    for seed in (1, 2):
        root = cfg.home / "landing" / f"cells-{seed}"
        make_cell_batch(root, seed=seed, n_subjects_per_class=4, images_per_subject=3, size=48)
        write_ready(root)
    assert validate_batch(cfg, "cells-1").status == "accepted"
    v1, _ = load_manifest(cfg)
    assert validate_batch(cfg, "cells-2").status == "accepted"
    v2, ds2 = load_manifest(cfg)
    assert ds2.version == 2 and ds2.batch_ids == ["cells-1", "cells-2"]
    merged = v1.merge(v2, on="sha256", suffixes=("_v1", "_v2"))
    assert len(merged) == len(v1) == 24 and len(v2) == 48
    assert (merged["split_v1"] == merged["split_v2"]).all()
    assert "test" in set(v1["split"])
    assert (v2.groupby("subject_id")["split"].nunique() == 1).all()


def test_test_leaks_and_already_curated_files_are_caught(cfg):
    root = cfg.home / "landing" / "first"
    make_cell_batch(root, seed=1, n_subjects_per_class=4, images_per_subject=3, size=48)
    write_ready(root)
    validate_batch(cfg, "first")
    manifest, _ = load_manifest(cfg)
    store = curated_storage(cfg)
    test_key = manifest.loc[manifest["split"] == "test", "key"].iloc[0]
    train_key = manifest.loc[manifest["split"] == "train", "key"].iloc[0]

    second = cfg.home / "landing" / "second"
    make_cell_batch(second, seed=5, n_subjects_per_class=1, images_per_subject=3, size=48)
    near = Image.open(io.BytesIO(store.read_bytes(test_key))).convert("RGB")
    near.putpixel((0, 0), (9, 9, 9))  # other bytes, same picture
    near.save(second / "fold_0" / "all" / "UID_4242_1_1_all.png")
    (second / "fold_0" / "hem" / "UID_H4242_1_1_hem.png").write_bytes(store.read_bytes(train_key))
    write_ready(second)
    result = validate_batch(cfg, "second")
    reasons = pd.read_csv(cfg.home / "quarantine" / "second" / "reasons.csv", dtype=str,
                          keep_default_na=False).set_index("path")["reasons"].to_dict()
    assert reasons["fold_0/all/UID_4242_1_1_all.png"] == "test_leak"
    assert reasons["fold_0/hem/UID_H4242_1_1_hem.png"] in {"already_curated",
                                                          "already_curated;test_leak"}
    assert result.accepted == 6 and result.quarantined == 2


def test_crash_before_the_ledger_is_recovered_without_double_rows(cfg, monkeypatch):
    root = cfg.home / "landing" / "crashy"
    make_cell_batch(root, seed=4, n_subjects_per_class=2, images_per_subject=3, size=48)
    write_ready(root)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("worker died")

    monkeypatch.setattr("training.data.curation.write_ledger", boom)
    with pytest.raises(RuntimeError):
        validate_batch(cfg, "crashy")
    assert latest_version(curated_storage(cfg)) == 1
    monkeypatch.undo()
    result = validate_batch(cfg, "crashy")
    assert (result.status, result.accepted, result.quarantined) == ("accepted", 12, 0)
    assert latest_version(curated_storage(cfg)) == 1
    assert len(load_manifest(cfg)[0]) == 12


def test_smear_fields_are_curated_with_their_labels(cfg):
    root = cfg.home / "landing" / "fields"
    images = make_smear_batch(root, n_images=3, size=(160, 120))
    write_ready(root)
    result = validate_batch(cfg, "fields")
    assert (result.layout, result.accepted, result.quarantined) == ("yolo", 3, 0)
    manifest, ds = load_manifest(cfg)
    assert ds.n_fields == 3
    store = curated_storage(cfg)
    for img in images:
        sha = hashlib.sha256(img.read_bytes()).hexdigest()
        row = manifest.set_index("sha256").loc[sha]
        assert row["kind"] == "field" and row["key"].endswith(".jpg")
        label_text = (root / "labels" / f"{img.stem}.txt").read_text().strip()
        assert store.read_text(row["label_key"]).strip() == label_text


def test_validate_path_reports_without_curating(tmp_path: Path):
    cfg = _config(tmp_path / "home")
    folder = tmp_path / "somewhere" / "upload"
    expected = _bad_batch(folder)
    result = validate_path(cfg, folder, tmp_path / "report")
    assert (result.images, result.quarantined) == (41, len(expected))
    assert (tmp_path / "report" / "summary.json").is_file()
    assert (tmp_path / "report" / "quarantine.html").is_file()
    assert not (cfg.home / "curated").exists() and not (cfg.home / "quarantine").exists()


def test_s3_stores_run_the_same_stage(tmp_path: Path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    local = tmp_path / "src" / "s3batch"
    make_cell_batch(local, seed=6, n_subjects_per_class=1, images_per_subject=3, size=48)
    shutil.copyfile(next(local.rglob("*.png")), local / "fold_0" / "zz_dup.png")
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="lake")
        for p in sorted(local.rglob("*")):
            if p.is_file():
                s3.put_object(Bucket="lake", Key=f"landing/s3batch/{p.relative_to(local)}",
                              Body=p.read_bytes())
        s3.put_object(Bucket="lake", Key="landing/s3batch/_READY", Body=b"")
        cfg = load_config(home=tmp_path / "home", validation={"workers": 1}, storage={
            "landing_uri": "s3://lake/landing", "curated_uri": "s3://lake/curated",
            "quarantine_uri": "s3://lake/quarantine"})
        result = validate_batch(cfg, "s3batch")
        assert (result.accepted, result.quarantined) == (6, 1)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lake")["Contents"]}
        assert "quarantine/s3batch/fold_0/zz_dup.png" in keys
        assert "curated/manifests/v0001.csv" in keys and "curated/batches/s3batch.json" in keys
        assert sum(k.startswith("landing/") for k in keys) == 8  # landing untouched
        assert validate_batch(cfg, "s3batch") == result


def test_a_batch_no_importer_understands_is_rejected_with_the_reason(cfg):
    root = cfg.home / "landing" / "mystery"
    root.mkdir(parents=True)
    (root / "scan.dat").write_bytes(b"\x00\x01")
    write_ready(root)
    result = validate_batch(cfg, "mystery")
    assert (result.status, result.layout, result.quarantined) == ("rejected", "unknown", 1)
    assert "matches no known layout" in result.message
    assert (cfg.home / "quarantine" / "mystery" / "scan.dat").read_bytes() == b"\x00\x01"
    summary = json.loads((cfg.reports_dir / "mystery" / "summary.json").read_text())
    assert "matches no known layout" in summary["rejection_reason"]
    assert latest_version(curated_storage(cfg)) == 0
