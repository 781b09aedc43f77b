"""Batch discovery: only complete, unprocessed batches; staging never touches landing."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_config
from training.data.batches import (
    check_batch_id,
    discover_batches,
    read_ledger,
    stage_batch,
    write_ledger,
)
from training.errors import DataValidationError
from training.records import ValidationResult


def _put(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _result(batch_id: str) -> ValidationResult:
    return ValidationResult(batch_id=batch_id, status="accepted", layout="cnmc", images=1,
                            accepted=1, quarantined=0, reasons={}, report_dir="r",
                            data_docs=None)


def test_only_complete_unprocessed_batches_are_found(cfg):
    landing = cfg.home / "landing"
    _put(landing, "ready/all/a.png")
    _put(landing, "ready/_READY", b"")
    _put(landing, "with-manifest/manifest.csv", b"path,label,subject_id\n")
    _put(landing, "half-uploaded/all/a.png")  # no marker yet
    _put(landing, "done/all/a.png")
    _put(landing, "done/_READY", b"")
    write_ledger(cfg, _result("done"))

    found = {b.batch_id: b.marker for b in discover_batches(cfg)}
    assert found == {"ready": "_READY", "with-manifest": "manifest.csv"}
    assert all(b.landing_uri == (cfg.home / "landing").as_uri() for b in discover_batches(cfg))
    assert read_ledger(cfg, "done") == _result("done")
    assert read_ledger(cfg, "ready") is None


def test_empty_or_missing_landing_finds_nothing(cfg):
    assert discover_batches(cfg) == []


def test_local_batches_are_read_in_place(cfg, tmp_path: Path):
    _put(cfg.home / "landing", "b1/all/a.png", b"abc")
    root = stage_batch(cfg, "b1", tmp_path / "stage")
    assert root == (cfg.home / "landing" / "b1").resolve()
    assert not (tmp_path / "stage").exists()
    with pytest.raises(DataValidationError, match="does not exist"):
        stage_batch(cfg, "nope", tmp_path / "stage")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "a..b"])
def test_batch_ids_cannot_escape(bad: str):
    with pytest.raises(DataValidationError):
        check_batch_id(bad)


def test_s3_batches_are_discovered_and_copied_not_moved(tmp_path: Path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="lake")
        objects = {"landing/b1/hem/x.png": b"png-bytes", "landing/b1/_READY": b"",
                   "landing/b2/all/y.png": b"half"}
        for key, body in objects.items():
            s3.put_object(Bucket="lake", Key=key, Body=body)
        cfg = load_config(home=tmp_path / "home",
                          storage={"landing_uri": "s3://lake/landing"})
        assert [b.batch_id for b in discover_batches(cfg)] == ["b1"]
        root = stage_batch(cfg, "b1", tmp_path / "stage")
        assert root == tmp_path / "stage" / "b1"
        assert (root / "hem" / "x.png").read_bytes() == b"png-bytes"
        assert (root / "_READY").exists()
        left = {o["Key"] for o in s3.list_objects_v2(Bucket="lake")["Contents"]}
        assert left == set(objects)  # nothing removed from landing
