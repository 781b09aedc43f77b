"""The outermost middleware of the API: honest ``/readyz``, limits, and the service's metrics.

* ``/readyz`` is answered here, before authentication and before any queue, by
  :class:`serving.health.ReadinessCheck` (200, or 503 naming the model and what is wrong, within
  about a second), so inference traffic never starves it.
* Headers larger than ``serving.max_header_bytes`` are a 431.
* At most ``serving.max_inflight`` image requests are in the process at once (being read,
  decoded, queued for a model or computed); one more is answered 503 with ``Retry-After`` at
  once, instead of waiting in a queue its client may have given up on.
* ``/docs.json`` (BentoML's OpenAPI) gets the Bearer scheme, so the docs page can send the key.
* Every answer is counted in :mod:`serving.observability` (route, status, model version,
  latency; 401/403 also as auth refusals).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from serving.observability import metrics, route_label

__all__ = ["IMAGE_ROUTES", "ServingFront", "with_bearer_scheme"]

IMAGE_ROUTES = frozenset({"/classify", "/detect", "/explain"})
_VERSION_BODY_LIMIT = 64 * 1024  # answers this small are parsed for their model version

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServingFront:
    """Pure ASGI middleware; ``readiness`` is a callable returning a ``ReadinessCheck`` (made
    lazily: the dependencies' addresses are known only inside the running worker)."""

    def __init__(
        self,
        app: ASGIApp,
        readiness: Callable[[], Any] | None = None,
        max_inflight: int | None = None,
        retry_after_s: int | None = None,
        max_header_bytes: int | None = None,
        limited_routes: Iterable[str] = IMAGE_ROUTES,
    ) -> None:
        self.app = app
        if None in (max_inflight, retry_after_s, max_header_bytes):
            from training.config import load_config

            serving = load_config().serving
            max_inflight = serving.max_inflight if max_inflight is None else max_inflight
            retry_after_s = serving.retry_after_s if retry_after_s is None else retry_after_s
            max_header_bytes = (serving.max_header_bytes if max_header_bytes is None
                                else max_header_bytes)
        self.max_inflight = int(max_inflight)  # type: ignore[arg-type]
        self.retry_after_s = int(retry_after_s)  # type: ignore[arg-type]
        self.max_header_bytes = int(max_header_bytes)  # type: ignore[arg-type]
        self.limited = frozenset(limited_routes)
        self.inflight = 0
        self._readiness_factory = readiness
        self._readiness: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope.get("path", "/"))
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": 500, "version": "", "body": b"", "json": False}

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = int(message["status"])
                for key, value in message.get("headers", []):
                    name = key.decode("latin-1").lower()
                    if name == "x-leukoflow-model":  # /explain: name:version
                        seen["version"] = value.decode("latin-1").rpartition(":")[2]
                    elif name == "content-type":
                        seen["json"] = value.startswith(b"application/json")
            elif (message["type"] == "http.response.body" and seen["json"]
                  and route in self.limited and seen["status"] == 200
                  and len(seen["body"]) < _VERSION_BODY_LIMIT):
                seen["body"] += message.get("body", b"")
            await send(message)

        try:
            if route == "/readyz":
                await self._readyz(observed)
            elif sum(len(k) + len(v) for k, v in scope.get("headers", [])) > self.max_header_bytes:
                await _reply(observed, 431, {"error": "request headers are larger than "
                                             f"{self.max_header_bytes} bytes"})
            elif route == "/docs.json":
                await self._openapi(scope, receive, observed)
            elif route in self.limited:
                await self._limited(route, scope, receive, observed)
            else:
                await self.app(scope, receive, observed)
        finally:
            self._count(route, seen, time.perf_counter() - started)

    async def _limited(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.inflight >= self.max_inflight:
            metrics().queue_rejections.labels(route=route).inc()
            await _reply(send, 503, {
                "error": f"the server is at its limit of {self.max_inflight} requests in "
                         f"flight; retry after {self.retry_after_s}s",
                "reason": "queue_full"},
                headers=[(b"retry-after", str(self.retry_after_s).encode())])
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """BentoML's spec plus the Bearer scheme, so the docs page can send the API key."""
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                body = json.dumps(with_bearer_scheme(json.loads(body))).encode("utf-8")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _readyz(self, send: Send) -> None:
        if self._readiness is None:
            self._readiness = self._readiness_factory() if self._readiness_factory else None
        if self._readiness is None:
            await _reply(send, 200, {"ready": True, "models": {}})
            return
        ready, detail = await self._readiness.check()
        if ready:
            await _reply(send, 200, {"ready": True, "models": detail})
            return
        wrong = "; ".join(f"{name}: {why}" for name, why in detail.items() if why != "ready")
        await _reply(send, 503, {"ready": False, "error": f"not ready: {wrong}",
                                 "models": detail}, headers=[(b"retry-after", b"5")])

    def _count(self, route: str, seen: dict[str, Any], seconds: float) -> None:
        status = str(seen["status"])
        version = seen["version"]
        if not version and seen["body"]:
            try:
                version = str(json.loads(seen["body"])["model"]["version"])
            except (ValueError, KeyError, TypeError):
                version = ""
        m = metrics()
        m.requests.labels(route=route, status=status, model_version=version or "none").inc()
        m.latency.labels(route=route, status=status).observe(seconds)
        if status in ("401", "403"):
            m.auth_refusals.labels(route=route, status=status).inc()


def with_bearer_scheme(spec: dict[str, Any],
                       protected: Iterable[str] = ("/classify", "/detect", "/explain",
                                                   "/whoami")) -> dict[str, Any]:
    """The OpenAPI ``spec`` with an HTTP Bearer scheme required on the protected routes."""
    schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearerAuth"] = {"type": "http", "scheme": "bearer",
                             "description": "an API key: python -m serving.auth create NAME"}
    for path, operations in spec.get("paths", {}).items():
        if path.rstrip("/") in protected:
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation["security"] = [{"bearerAuth": []}]
    return spec


async def _reply(send: Send, status: int, body: dict[str, Any],
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
