from __future__ import annotations

import pytest

from training.errors import StorageError
from training.storage import LocalStorage, open_storage


def test_roundtrip_list_and_dirs(tmp_path):
    store = open_storage(tmp_path.as_uri())
    assert isinstance(store, LocalStorage)
    store.write_bytes("b1/x/a.png", b"1")
    store.write_text("b1/_READY", "")
    store.write_bytes("b2/c.png", b"2")
    assert list(store.list("b1")) == ["b1/_READY", "b1/x/a.png"]
    assert store.list_dirs() == ["b1", "b2"]
    assert store.read_bytes("b1/x/a.png") == b"1"
    assert store.exists("b2/c.png") and not store.exists("b2/d.png")
    assert not [p for p in tmp_path.rglob(".*")]  # no temp files left behind


def test_missing_key_and_escape_are_clear(tmp_path):
    store = LocalStorage(tmp_path)
    with pytest.raises(StorageError, match="does not exist"):
        store.read_bytes("nope")
    with pytest.raises(StorageError, match="escapes"):
        store.write_bytes("../outside", b"")


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported"):
        open_storage("ftp://x/y")
