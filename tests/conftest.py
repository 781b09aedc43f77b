"""Shared fixtures: an isolated LEUKOFLOW_HOME per test and the real-data locator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's LEUKOFLOW_* variables must not leak into tests."""
    for key in list(os.environ):
        if key.startswith("LEUKOFLOW_"):
            monkeypatch.delenv(key)


@pytest.fixture
def cfg(tmp_path: Path):
    """A config whose every store lives under this test's tmp_path."""
    from training.config import load_config

    return load_config(home=tmp_path / "home")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
