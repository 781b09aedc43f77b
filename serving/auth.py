"""API keys for the HTTP API: hashed at rest, compared in constant time, scoped per route.

A key is ``lf_`` + 43 url-safe characters (32 random bytes). Only its SHA-256 is stored. A slow
password hash (PBKDF2, scrypt) protects low-entropy secrets against guessing; these keys carry
256 random bits, so no one can search for a preimage of the digest, and a slow hash would only add
~100 ms to every request. Keys come from two places, merged:

* the key file (``cfg.api_keys_file``, JSON, mode 0600, rewritten atomically)::

    {"version": 1, "keys": [{"name": "app", "sha256": "<hex>", "scopes": ["classify"],
                             "created_at": "2025-01-01T00:00:00+00:00"}]}

* the environment, for containers where a mounted file is awkward::

    LEUKOFLOW_API_KEYS="app:<sha256 hex>:classify+detect,ops:<sha256 hex>:*"

Scopes: ``classify``, ``detect``, ``explain`` or ``*`` (all). Manage keys with
``python -m serving.auth create NAME --scopes classify,detect`` (prints the key once),
``revoke NAME``, ``list``, ``hash KEY`` (the digest to put in ``LEUKOFLOW_API_KEYS``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.errors import ConfigError

__all__ = [
    "ENV_VAR",
    "OPEN_PATHS",
    "ROUTE_SCOPES",
    "SCOPES",
    "ApiKeyMiddleware",
    "KeyRecord",
    "KeyStore",
    "authenticate",
    "create_key",
    "hash_key",
    "list_keys",
    "revoke_key",
    "verify",
]

ENV_VAR = "LEUKOFLOW_API_KEYS"
SCOPES = ("classify", "detect", "explain")
ALL = "*"
TOKEN_PREFIX = "lf_"
# Probes, metrics and the OpenAPI page (BentoML serves Swagger UI at "/" and the spec at
# /docs.json): they reveal the API's shape, never data, and orchestrators cannot send keys.
OPEN_PATHS = frozenset({
    "/livez", "/readyz", "/healthz", "/metrics", "/", "/docs", "/docs.json", "/schema.json",
})
OPEN_PREFIXES = ("/static_content/", "/assets/")
ROUTE_SCOPES = {"/classify": "classify", "/detect": "detect", "/explain": "explain"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored: never the key itself, only its SHA-256."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created_at: str = ""
    source: str = "file"  # "file" or "env"

    def allows(self, scope: str | None) -> bool:
        """Whether this key may call a route needing ``scope`` (None: any valid key)."""
        return scope is None or ALL in self.scopes or scope in self.scopes

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "scopes": list(self.scopes),
                "created_at": self.created_at}


def hash_key(token: str) -> str:
    """The hex SHA-256 of a key, as stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_scopes(scopes: Iterable[str], where: str) -> tuple[str, ...]:
    out = tuple(s.strip() for s in scopes if s.strip())
    bad = [s for s in out if s != ALL and s not in SCOPES]
    if bad or not out:
        raise ConfigError(
            f"{where}: scopes {list(out)} are invalid; use one or more of "
            f"{', '.join(SCOPES)} or '{ALL}'"
        )
    return out


# ---------------------------------------------------------------- the key file


def _read_file(path: Path) -> list[KeyRecord]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [
            KeyRecord(str(k["name"]), str(k["sha256"]).lower(),
                      _check_scopes(k["scopes"], f"{path} key {k['name']!r}"),
                      str(k.get("created_at", "")), "file")
            for k in data["keys"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"API key file {path} is malformed: {exc!r}") from exc


def _write_file(path: Path, records: list[KeyRecord]) -> None:
    """Write next to the target with mode 0600, fsync, then rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"version": 1, "keys": [r.to_json() for r in records]}, indent=2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(payload + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of the key file between processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_key(path: str | Path, name: str, scopes: Iterable[str]) -> str:
    """Create a key named ``name``; returns the plaintext key, which is not stored anywhere."""
    path = Path(path)
    if not name or any(c in name for c in ":,\n") or name != name.strip():
        raise ConfigError(f"key name {name!r} is invalid: use a non-empty name without : or ,")
    checked = _check_scopes(scopes, f"key {name!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _locked(path):
        records = _read_file(path)
        if any(r.name == name for r in records):
            raise ConfigError(f"a key named {name!r} already exists in {path}; revoke it first")
        created = datetime.now(UTC).isoformat(timespec="seconds")
        _write_file(path, [*records, KeyRecord(name, hash_key(token), checked, created)])
    return token


def revoke_key(path: str | Path, name: str) -> bool:
    """Delete the key named ``name`` from the file; False when there was none."""
    path = Path(path)
    with _locked(path):
        records = _read_file(path)
        kept = [r for r in records if r.name != name]
        if len(kept) == len(records):
            return False
        _write_file(path, kept)
    return True


def list_keys(path: str | Path) -> list[KeyRecord]:
    """The keys in the file (hashes, names, scopes; never plaintext)."""
    return _read_file(Path(path))


def parse_env_keys(value: str) -> list[KeyRecord]:
    """Parse ``name:sha256hex:scope1+scope2,...`` (the ``LEUKOFLOW_API_KEYS`` format)."""
    out = []
    for i, entry in enumerate(e.strip() for e in value.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        where = f"{ENV_VAR} entry {i + 1} ({parts[0]!r})"
        if len(parts) != 3:
            raise ConfigError(f"{where} must look like name:sha256hex:scope1+scope2")
        name, digest, scopes = parts
        digest = digest.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}: the hash must be 64 hex digits (sha256 of the key)")
        out.append(KeyRecord(name.strip(), digest, _check_scopes(scopes.split("+"), where),
                             "", "env"))
    return out


class KeyStore:
    """Keys from the file and the environment; re-reads the file when it changes, so a revoked
    key stops working without a restart."""

    def __init__(self, path: str | Path | None, env: Mapping[str, str] | None = None) -> None:
        self.path = Path(path) if path else None
        env = os.environ if env is None else env
        self._env_records = parse_env_keys(env.get(ENV_VAR, ""))
        self._stamp: tuple[int, int, int] | None = None
        self._file_records: list[KeyRecord] = []

    def records(self) -> list[KeyRecord]:
        if self.path is not None:
            try:
                st = self.path.stat()
                stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                self._file_records = _read_file(self.path) if stamp else []
                self._stamp = stamp
        return [*self._file_records, *self._env_records]


def authenticate(store: KeyStore | str | Path, token: str) -> KeyRecord | None:
    """The record whose hash matches ``token``, comparing against every stored hash.

    ``hmac.compare_digest`` runs once per record, with no early exit, so the time taken does not
    depend on which key (if any) matched.
    """
    if not isinstance(store, KeyStore):
        store = KeyStore(store, env={})
    digest = hash_key(token)
    found = None
    for record in store.records():
        if hmac.compare_digest(digest, record.sha256) and found is None:
            found = record
    return found


def verify(store: KeyStore | str | Path, token: str, scope: str | None) -> KeyRecord | None:
    """The key's record if ``token`` is a known key allowed ``scope``, else None."""
    record = authenticate(store, token)
    return record if record is not None and record.allows(scope) else None


# ---------------------------------------------------------------- ASGI middleware


class ApiKeyMiddleware:
    """Pure ASGI middleware: Bearer keys on every route except health, metrics and docs.

    401 (with ``WWW-Authenticate: Bearer``) when the key is missing or unknown, 403 when it lacks
    the route's scope (``ROUTE_SCOPES``; other protected routes accept any valid key). The key's
    name goes to ``scope["state"]["api_key"]`` for logging.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys_file: str | Path | None = None,
        store: KeyStore | None = None,
        open_paths: Iterable[str] = OPEN_PATHS,
        route_scopes: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        if store is None:
            if keys_file is None:
                from training.config import load_config

                keys_file = load_config().api_keys_file
            store = KeyStore(keys_file)
        self.store = store
        self.open_paths = frozenset(open_paths)
        self.route_scopes = dict(ROUTE_SCOPES if route_scopes is None else route_scopes)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "/")
        path = path.rstrip("/") or "/"
        if self._is_open(path):
            await self.app(scope, receive, send)
            return
        status, message = self._check(scope, path)
        if status == 200:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message})
        else:
            await _json(send, status, {"error": message})

    def _check(self, scope: Scope, path: str) -> tuple[int, str]:
        token = _bearer(scope)
        if token is None:
            return 401, "missing API key: send the header 'Authorization: Bearer <key>'"
        try:
            record = authenticate(self.store, token)
        except ConfigError as exc:  # a corrupt key file: refuse, and say why in the log
            print(f"leukoflow auth: {exc}", file=sys.stderr)
            return 401, "API keys cannot be read on the server; ask the operator"
        if record is None:
            if not self.store.records():
                return 401, ("no API keys are configured on this server; create one with "
                             "'python -m serving.auth create NAME --scopes ...'")
            return 401, "unknown or revoked API key"
        needed = self.route_scopes.get(path)
        if not record.allows(needed):
            return 403, (f"API key '{record.name}' lacks scope '{needed}' "
                         f"(it has: {', '.join(record.scopes)})")
        scope.setdefault("state", {})["api_key"] = record.name
        return 200, ""


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"authorization":
            kind, _, token = value.decode("latin-1").strip().partition(" ")
            if kind.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="leukoflow"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.auth {create,revoke,list,hash}``; the file defaults to the config."""
    parser = argparse.ArgumentParser(prog="python -m serving.auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="key file (default: the config's serving.api_keys_file)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument("--scopes", default="classify,detect,explain",
                        help="comma-separated: classify,detect,explain or *")
    sub.add_parser("list", help="list key names and scopes")
    revoke = sub.add_parser("revoke", help="delete a key")
    revoke.add_argument("name")
    hashp = sub.add_parser("hash", help=f"print a key's sha256 (for {ENV_VAR})")
    hashp.add_argument("key")
    args = parser.parse_args(argv)

    if args.cmd == "hash":
        print(hash_key(args.key))
        return 0
    if args.file:
        path = Path(args.file)
    else:
        from training.config import load_config

        path = load_config().api_keys_file
    try:
        if args.cmd == "create":
            print(create_key(path, args.name, args.scopes.split(",")))
        elif args.cmd == "revoke":
            if not revoke_key(path, args.name):
                print(f"no key named {args.name!r} in {path}", file=sys.stderr)
                return 1
        else:
            for r in list_keys(path):
                print(f"{r.name}\t{'+'.join(r.scopes)}\t{r.created_at}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
