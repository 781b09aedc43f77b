"""The outermost middleware of the API: honest ``/readyz``, limits, and the service's metrics.

* ``/readyz`` is answered here, before authentication and before any queue, by
  :class:`serving.health.ReadinessCheck` (200, or 503 naming the model and what is wrong, within
  about a second), so inference traffic never starves it.
* Headers larger than ``serving.max_header_bytes`` are a 431.
* At most ``serving.max_inflight`` image requests are in the process at once (being read,
  decoded, queued for a model or computed); one more is answered 503 with ``Retry-After`` at
  once, instead of waiting in a queue its client may have given up on; and a client that
  hangs up after sending its image stops the work on it (:func:`cancel_on_disconnect`): its
  decode and its wait for a model are cancelled, not computed for nobody.
* ``/docs.json`` (BentoML's OpenAPI) gets the Bearer scheme, so the docs page can send the key.
* Every answer is counted in :mod:`serving.observability` (route, status, model version,
  latency; 401/403 also as auth refusals).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from serving.observability import metrics, route_label

__all__ = [
    "IMAGE_ROUTES", "CancelOnDisconnect", "ServingFront", "cancel_on_disconnect",
    "with_bearer_scheme",
]

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
        seen: dict[str, Any] = {"status": 500, "version": "", "body": b"", "json": False,
                                "started": False}

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = int(message["status"])
                seen["started"] = True
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
                if await self._limited(route, scope, receive, observed) and not seen["started"]:
                    seen["status"] = 499  # client closed the request (nginx's code): not a 5xx
            else:
                await self.app(scope, receive, observed)
        finally:
            self._count(route, seen, time.perf_counter() - started)

    async def _limited(self, route: str, scope: Scope, receive: Receive, send: Send) -> bool:
        """The bounded queue; returns whether the client hung up and its work was cancelled."""
        if self.inflight >= self.max_inflight:
            metrics().queue_rejections.labels(route=route).inc()
            await _reply(send, 503, {
                "error": f"the server is at its limit of {self.max_inflight} requests in "
                         f"flight; retry after {self.retry_after_s}s",
                "reason": "queue_full"},
                headers=[(b"retry-after", str(self.retry_after_s).encode())])
            return False
        self.inflight += 1
        try:
            return await cancel_on_disconnect(self.app, scope, receive, send)
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


async def cancel_on_disconnect(app: ASGIApp, scope: Scope, receive: Receive,
                               send: Send) -> bool:
    """Run ``app``; if the client disconnects before the answer is sent, cancel it.

    Once the request body is read the server's ``receive`` has nothing left to give but the
    disconnect, so a watcher waits on it; the app, should it ask again, gets the disconnect the
    watcher saw. Returns whether the request was abandoned (the app was cancelled), which is
    counted in ``leukoflow_abandoned_requests_total``.
    """
    body_read, gone = asyncio.Event(), asyncio.Event()
    answered = False  # the last byte of the answer went out: a disconnect now is the normal end

    async def app_send(message: Message) -> None:
        nonlocal answered
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = True

    async def app_receive() -> Message:
        if body_read.is_set():
            await gone.wait()
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
        elif message["type"] == "http.request" and not message.get("more_body", False):
            body_read.set()
        return message

    async def watch() -> None:
        await body_read.wait()
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    task = asyncio.ensure_future(app(scope, app_receive, app_send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() or answered:
            await task  # re-raise what the app raised
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics().abandoned.labels(route=route_label(scope.get("path", "/"))).inc()
        return True
    finally:
        watcher.cancel()
        if not task.done():  # we were cancelled ourselves
            task.cancel()


class CancelOnDisconnect:
    """ASGI middleware of a model service: a caller that hangs up (the API process, its own
    client gone) cancels the request's work there too (:func:`cancel_on_disconnect`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await cancel_on_disconnect(self.app, scope, receive, send)


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
