"""The publish step's light parts: the child environment and the smoke test's verdicts
(against a fake server; the real one is in tests/integration/test_service_http.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from training.config import load_config
from training.errors import PublishError
from training.publish.bento import _child_env, smoke_image, smoke_test

VERSIONS = {"leukemia-classifier": "4", "wbc-detector": "2"}


def test_child_env_carries_the_resolved_config_not_ambient_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEUKOFLOW_SERVING__MAX_IMAGE_BYTES", "123")
    monkeypatch.setenv("LEUKOFLOW_API_KEYS", "keep-me")
    cfg = load_config(home=tmp_path / "home", serving={"max_image_bytes": 456})
    env = _child_env(cfg)
    assert "LEUKOFLOW_SERVING__MAX_IMAGE_BYTES" not in env  # would beat the file in the child
    assert env["LEUKOFLOW_API_KEYS"] == "keep-me"  # not a config field: passed through
    assert env["BENTOML_HOME"] == str(cfg.bentoml_home)
    written = yaml.safe_load(Path(env["LEUKOFLOW_CONFIG"]).read_text())
    assert written["serving"]["max_image_bytes"] == 456
    monkeypatch.setenv("LEUKOFLOW_CONFIG", env["LEUKOFLOW_CONFIG"])
    monkeypatch.delenv("LEUKOFLOW_SERVING__MAX_IMAGE_BYTES")
    assert load_config().serving.max_image_bytes == 456  # what the server will see


def _server(unauth: int = 401, cls_version: str = "4", body: Any = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if "authorization" not in request.headers:
            return httpx.Response(unauth, json={"error": "missing API key"})
        if request.url.path == "/classify":
            answer = body if body is not None else {
                "label": "all", "probabilities": {"all": 0.6, "hem": 0.4},
                "model": {"name": "leukemia-classifier", "version": cls_version}}
            return httpx.Response(200, content=json.dumps(answer).encode())
        return httpx.Response(200, json={"boxes": [], "model": {"name": "wbc-detector",
                                                                "version": "2"}})
    return httpx.MockTransport(handle)


def test_smoke_test_reports_what_it_saw() -> None:
    report = smoke_test("http://t", "lf_k", smoke_image(), VERSIONS, transport=_server())
    assert report["unauthenticated_status"] == 401
    assert report["classify"]["label"] == "all"
    assert report["detect"]["boxes"] == 0


@pytest.mark.parametrize(("server", "words"), [
    (_server(unauth=200), "without a key answered 200"),
    (_server(cls_version="3"), "expected leukemia-classifier v4"),
    (_server(body={"label": "all"}), "lacks ['probabilities', 'model']"),
    (_server(body={"label": "x", "probabilities": {"x": 0.2}, "model": {
        "name": "leukemia-classifier", "version": "4"}}), "sum to 0.2"),
    (_server(body={"label": "all", "probabilities": {"all": 1.0}, "model": "v4"}), "malformed"),
])
def test_smoke_test_fails_with_the_reason(server: httpx.MockTransport, words: str) -> None:
    with pytest.raises(PublishError) as info:
        smoke_test("http://t", "lf_k", smoke_image(), VERSIONS, transport=server)
    assert words in str(info.value)
