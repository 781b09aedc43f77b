"""API keys for the HTTP API: the ASGI middleware and the key CLI.

How keys are made, stored (SHA-256 only, key file or ``LEUKOFLOW_API_KEYS``) and scoped is
:mod:`training.apikeys`, the store this middleware reads. Manage keys with
``python -m serving.auth create NAME --scopes classify,detect`` (prints the key once),
``revoke NAME``, ``list``, ``hash KEY`` (the digest to put in ``LEUKOFLOW_API_KEYS``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from training.apikeys import (
    ENV_VAR,
    SCOPES,
    KeyRecord,
    KeyStore,
    authenticate,
    create_key,
    hash_key,
    list_keys,
    revoke_key,
    verify,
)
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

log = logging.getLogger("leukoflow.auth")

# Probes, metrics and the OpenAPI page (BentoML serves Swagger UI at "/" and the spec at
# /docs.json): they reveal the API's shape, never data, and orchestrators cannot send keys.
OPEN_PATHS = frozenset({
    "/livez", "/readyz", "/healthz", "/metrics", "/", "/docs", "/docs.json", "/schema.json",
})
OPEN_PREFIXES = ("/static_content/", "/assets/")
# The web app (serving.webapp, mounted at /app) authenticates its pages with its own sessions.
WEBAPP_PREFIX = "/app"
OPEN_PREFIXES += (WEBAPP_PREFIX + "/",)
ROUTE_SCOPES = {"/classify": "classify", "/detect": "detect", "/explain": "explain"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
        try:  # say so at startup; requests are answered 401 (with a log line) until fixed
            store.records()
        except ConfigError as exc:
            log.error("API keys cannot be read at startup, every protected request will be "
                      "refused with 401 until this is fixed: %s", exc)
        self.open_paths = frozenset(open_paths)
        self.route_scopes = dict(ROUTE_SCOPES if route_scopes is None else route_scopes)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path == WEBAPP_PREFIX or path.startswith(OPEN_PREFIXES)

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
            log.error("refusing %s %s with 401: %s", scope.get("method", ""), path, exc)
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
