"""API keys: hashed at rest, constant-time comparison, scopes, revocation, env keys, and the
ASGI middleware's 401/403 answers (driven in-process through httpx's ASGITransport)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import auth
from serving.auth import ApiKeyMiddleware
from training import apikeys
from training.apikeys import (
    KeyStore,
    authenticate,
    create_key,
    hash_key,
    list_keys,
    parse_env_keys,
    revoke_key,
    verify,
)
from training.errors import ConfigError


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "api_keys.json"


def test_only_the_hash_is_stored_in_a_private_file(keys_file: Path) -> None:
    token = create_key(keys_file, "app", ["classify"])
    text = keys_file.read_text()
    assert token not in text
    assert hashlib.sha256(token.encode()).hexdigest() in text
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    record = json.loads(text)["keys"][0]
    assert record["name"] == "app" and record["scopes"] == ["classify"] and record["created_at"]
    assert token.startswith("lf_") and len(token) > 40
    assert not list(keys_file.parent.glob(".api_keys.json.*"))  # no temp file left behind


def test_keys_are_random_and_names_unique(keys_file: Path) -> None:
    a = create_key(keys_file, "a", ["*"])
    b = create_key(keys_file, "b", ["*"])
    assert a != b
    with pytest.raises(ConfigError, match="already exists"):
        create_key(keys_file, "a", ["detect"])
    assert [r.name for r in list_keys(keys_file)] == ["a", "b"]


@pytest.mark.parametrize("scopes", [[], ["predict"], ["classify", "admin"]])
def test_unknown_scopes_are_refused(keys_file: Path, scopes: list[str]) -> None:
    with pytest.raises(ConfigError, match="classify, detect, explain"):
        create_key(keys_file, "x", scopes)


def test_verify_checks_the_scope(keys_file: Path) -> None:
    token = create_key(keys_file, "cls", ["classify"])
    star = create_key(keys_file, "ops", ["*"])
    assert verify(keys_file, token, "classify").name == "cls"
    assert verify(keys_file, token, "detect") is None
    assert verify(keys_file, star, "explain").name == "ops"
    assert verify(keys_file, "lf_wrong", "classify") is None
    assert authenticate(keys_file, token).name == "cls"  # known, whatever the scope


def test_every_stored_hash_is_compared_in_constant_time(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = create_key(keys_file, "first", ["*"])
    for i in range(4):
        create_key(keys_file, f"k{i}", ["*"])
    calls: list[tuple[str, str]] = []
    real = apikeys.hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", counting)
    assert authenticate(keys_file, first).name == "first"  # the match is the first record...
    assert len(calls) == 5  # ...and still every record was compared
    calls.clear()
    assert authenticate(keys_file, "lf_nope") is None
    assert len(calls) == 5


def test_revoke_takes_effect_without_a_restart(keys_file: Path) -> None:
    token = create_key(keys_file, "app", ["classify"])
    store = KeyStore(keys_file, env={})
    assert verify(store, token, "classify") is not None
    assert revoke_key(keys_file, "app") is True
    assert verify(store, token, "classify") is None
    assert revoke_key(keys_file, "app") is False


def test_env_keys(tmp_path: Path) -> None:
    token = "lf_container-key"
    env = {apikeys.ENV_VAR: f"svc:{hash_key(token)}:classify+detect, ops:{'0' * 64}:*"}
    store = KeyStore(tmp_path / "missing.json", env=env)
    record = verify(store, token, "detect")
    assert record is not None and record.name == "svc" and record.source == "env"
    assert verify(store, token, "explain") is None
    assert [r.name for r in store.records()] == ["svc", "ops"]


@pytest.mark.parametrize(("value", "match"), [
    ("svc:abc:classify", "64 hex digits"),
    ("svc:" + "a" * 64, "name:sha256hex:scope1"),
    ("svc:" + "a" * 64 + ":predict", "invalid"),
])
def test_malformed_env_keys_say_what_is_wrong(value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_env_keys(value)


def test_corrupt_key_file_is_a_config_error(keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        list_keys(keys_file)


def test_cli_create_list_revoke_hash(keys_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert auth.main(["--file", str(keys_file), "create", "cli", "--scopes", "detect"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify(keys_file, token, "detect") is not None
    assert auth.main(["hash", token]) == 0
    assert capsys.readouterr().out.strip() == hash_key(token)
    assert auth.main(["--file", str(keys_file), "list"]) == 0
    assert "cli\tdetect" in capsys.readouterr().out
    assert auth.main(["--file", str(keys_file), "revoke", "cli"]) == 0
    assert auth.main(["--file", str(keys_file), "revoke", "cli"]) == 1


# ----------------------------------------------------------------------------- middleware
async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps({"path": scope["path"],
                       "key": scope.get("state", {}).get("api_key")}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _request(app: Any, method: str, path: str, token: str | None = None,
             scheme: str = "Bearer") -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"Authorization": f"{scheme} {token}"} if token else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(go())


@pytest.fixture
def guarded(keys_file: Path) -> tuple[Any, dict[str, str]]:
    tokens = {"cls": create_key(keys_file, "cls", ["classify"]),
              "all": create_key(keys_file, "all", ["*"])}
    return ApiKeyMiddleware(_echo_app, keys_file=keys_file), tokens


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/healthz", "/docs.json", "/"])
def test_probes_metrics_and_docs_are_open(guarded: Any, path: str) -> None:
    app, _ = guarded
    assert _request(app, "GET", path).status_code == 200


@pytest.mark.parametrize("path", ["/classify", "/detect", "/explain", "/whoami", "/anything"])
def test_everything_else_needs_a_key(guarded: Any, path: str) -> None:
    app, _ = guarded
    resp = _request(app, "POST", path)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in resp.json()["error"]


def test_unknown_key_and_wrong_scheme_are_401(guarded: Any) -> None:
    app, tokens = guarded
    assert "unknown" in _request(app, "POST", "/classify", "lf_bogus").json()["error"]
    assert _request(app, "POST", "/classify", tokens["all"], scheme="Basic").status_code == 401


def test_missing_scope_is_403_and_names_it(guarded: Any) -> None:
    app, tokens = guarded
    resp = _request(app, "POST", "/detect", tokens["cls"])
    assert resp.status_code == 403
    assert "detect" in resp.json()["error"] and "cls" in resp.json()["error"]


def test_a_valid_key_passes_and_is_named_for_logging(guarded: Any) -> None:
    app, tokens = guarded
    resp = _request(app, "POST", "/classify", tokens["cls"])
    assert resp.status_code == 200
    assert resp.json() == {"path": "/classify", "key": "cls"}
    assert _request(app, "POST", "/whoami", tokens["cls"]).status_code == 200  # any valid key
    assert _request(app, "POST", "/explain/", tokens["all"]).status_code == 200


def test_no_keys_configured_fails_closed_with_a_hint(tmp_path: Path) -> None:
    app = ApiKeyMiddleware(_echo_app, store=KeyStore(tmp_path / "none.json", env={}))
    resp = _request(app, "POST", "/classify", "lf_anything")
    assert resp.status_code == 401
    assert "no API keys are configured" in resp.json()["error"]


@pytest.mark.parametrize("content", [
    "{not json", "[]", '{"keys": null}', '{"keys": ["app"]}', '{"keys": {"a": 1}}',
    '{"keys": [{"name": "a"}]}', '{"keys": [{"name": "a", "sha256": "x", "scopes": "read"}]}',
    '{"keys": [{"name": "a", "sha256": "x", "scopes": 5}]}', "\xff\xfe binary",
    "folder", "parent_is_a_file",
])
def test_a_malformed_key_file_is_a_401_with_a_log_line_never_a_500(
        tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys" / "api_keys.json"
    path.parent.mkdir()
    if content == "folder":
        path.mkdir()
    elif content == "parent_is_a_file":
        (tmp_path / "keys" / "blocker").write_text("")
        path = tmp_path / "keys" / "blocker" / "api_keys.json"
    else:
        path.write_bytes(content.encode("utf-8", "surrogateescape")
                         if content.isascii() else b"\xff\xfe binary")
    with caplog.at_level("ERROR", logger="leukoflow.auth"):
        app = ApiKeyMiddleware(_echo_app, keys_file=path)  # starts, and says why it will refuse
        assert "API keys cannot be read at startup" in caplog.text
        caplog.clear()
        resp = _request(app, "POST", "/classify", "lf_whatever")
    assert resp.status_code == 401
    assert "cannot be read on the server" in resp.json()["error"]
    assert str(path) in caplog.text  # the operator's log says which file and why
    assert _request(app, "GET", "/readyz").status_code == 200  # probes stay open
