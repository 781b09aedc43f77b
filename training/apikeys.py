"""API keys at rest: hashed, scoped, compared in constant time (the store, not the middleware).

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

The store is shared by the HTTP API's middleware (:mod:`serving.auth`), the publish step's
smoke test and the ``leukoflow keys`` command, so it lives in the light shared part of the
library: nothing here imports a web framework.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.errors import ConfigError

__all__ = [
    "ENV_VAR", "SCOPES", "KeyRecord", "KeyStore", "authenticate", "create_key", "hash_key",
    "list_keys", "parse_env_keys", "revoke_key", "verify",
]

ENV_VAR = "LEUKOFLOW_API_KEYS"
SCOPES = ("classify", "detect", "explain")
ALL = "*"
TOKEN_PREFIX = "lf_"


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
    try:
        if not path.exists():
            return []
        data = json.loads(path.read_text())
        return [
            KeyRecord(str(k["name"]), str(k["sha256"]).lower(),
                      _check_scopes(k["scopes"], f"{path} key {k['name']!r}"),
                      str(k.get("created_at", "")), "file")
            for k in data["keys"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"API key file {path} is malformed: {exc!r}") from exc
    except OSError as exc:  # a folder, no permission, a parent that is a file, ...
        raise ConfigError(f"API key file {path} cannot be read: {exc}") from exc


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
            except OSError as exc:  # e.g. a parent folder that is a file
                raise ConfigError(f"API key file {self.path} cannot be read: {exc}") from exc
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
