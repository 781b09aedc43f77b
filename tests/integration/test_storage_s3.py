"""The S3 backend against a real S3-protocol server: the code path a MinIO deployment uses."""

from __future__ import annotations

import pytest

from training.errors import StorageError
from training.storage import S3Storage, open_storage

pytestmark = pytest.mark.integration


def test_roundtrip_over_http(s3_endpoint, s3_bucket):
    store = open_storage(f"s3://{s3_bucket}/landing", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Storage)
    store.write_bytes("b1/cells/a.png", b"\x89PNG...")
    store.write_bytes("b1/_READY", b"")
    store.write_bytes("b2/x.jpg", b"jpg")
    assert list(store.list("b1")) == ["b1/_READY", "b1/cells/a.png"]
    assert store.list_dirs() == ["b1", "b2"]
    assert store.read_bytes("b1/cells/a.png") == b"\x89PNG..."
    assert store.exists("b1/_READY") and not store.exists("b1/nope")
    # the prefix isolates stores sharing a bucket
    other = open_storage(f"s3://{s3_bucket}/curated", endpoint_url=s3_endpoint)
    assert list(other.list()) == []


def test_download_for_tools_that_need_paths(s3_endpoint, s3_bucket, tmp_path):
    store = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    store.write_bytes("a/b.txt", b"hello")
    assert store.local_path("a/b.txt") is None
    assert store.download("a/b.txt", tmp_path / "b.txt").read_bytes() == b"hello"


def test_missing_object_and_bucket_are_clear(s3_endpoint, s3_bucket):
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/nope"):
        open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint).read_bytes("nope")
    with pytest.raises(StorageError, match="no-such-bucket"):
        list(open_storage("s3://no-such-bucket", endpoint_url=s3_endpoint).list())


def test_unreachable_endpoint_names_it(monkeypatch):
    from tests.integration.conftest import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = open_storage("s3://b", endpoint_url=url)
    with pytest.raises(StorageError, match=f"at {url}"):
        store.write_bytes("k", b"v")
