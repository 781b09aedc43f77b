"""The API's front middleware and upload guard on a small ASGI app (real HTTP semantics through
httpx's ASGI transport): the in-flight queue, header limit, /readyz, OpenAPI Bearer scheme,
bounded metric labels, safe filenames and the body timeout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from serving.decode import UploadGuard, safe_filename
from serving.front import ServingFront, with_bearer_scheme
from serving.observability import OTHER, metrics, route_label


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


class _App:
    """Answers every request with JSON naming the path and the upload's filename; /classify
    waits on ``gate`` so requests can be held in flight."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.filenames: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.requests import Request

        request = Request(scope, receive)
        body: dict[str, Any] = {"path": scope["path"], "model": {"version": "7"}}
        if scope["path"] == "/docs.json":
            body = {"openapi": "3.0.2", "paths": {"/classify": {"post": {}}, "/livez": {"get": {}}}}
        if scope.get("method") == "POST":
            form = await request.form()
            upload = form.get("image")
            self.filenames.append(getattr(upload, "filename", ""))
            if scope["path"] == "/classify":
                await self.gate.wait()
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _files(name: str = "cell.png") -> dict[str, Any]:
    return {"image": (name, b"\x89PNG not really", "image/png")}


@pytest.mark.parametrize(("given", "safe"), [
    ("cell.png", "upload.png"), ("x" * 300 + ".PNG", "upload.png"),
    ("../../etc/passwd", "upload"), ("a\\b\\c.jpeg", "upload.jpeg"), ("no-ext", "upload"),
    ("evil.p\x00ng", "upload"), (None, "upload"),
])
def test_safe_filename(given: str | None, safe: str) -> None:
    assert safe_filename(given) == safe


def test_a_300_byte_filename_reaches_the_app_as_a_short_safe_name() -> None:
    app = _App()
    guard = UploadGuard(app, routes=("/detect",), max_bytes=10_000, body_timeout_s=5)

    async def go() -> httpx.Response:
        async with _client(guard) as client:
            return await client.post("/detect", files=_files("é" * 150 + ".png"))

    resp = _run(go())
    assert resp.status_code == 200, resp.text
    assert app.filenames == ["upload.png"]


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    app = _App()
    guard = UploadGuard(app, routes=("/detect",), max_bytes=10_000, body_timeout_s=0.2)
    sent: list[dict[str, Any]] = []

    async def slow_receive() -> dict[str, Any]:
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/detect",
             "headers": [(b"content-type", b"multipart/form-data; boundary=x")]}
    _run(asyncio.wait_for(guard(scope, slow_receive, send), 3))
    assert sent[0]["status"] == 408
    assert b"did not arrive within 0.2s" in sent[1]["body"]


def test_a_full_queue_answers_503_with_retry_after_and_frees_when_answered() -> None:
    app = _App()
    front = ServingFront(app, max_inflight=2, retry_after_s=3, max_header_bytes=8192)

    async def go() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with _client(front) as client:
            held = [asyncio.create_task(client.post("/classify", files=_files()))
                    for _ in range(2)]
            while front.inflight < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/classify", files=_files())
            app.gate.set()
            done = await asyncio.gather(*held)
            after = await client.post("/classify", files=_files())
            return done, refused, after

    done, refused, after = _run(go())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "3"
    assert refused.json()["reason"] == "queue_full"
    assert [r.status_code for r in done] == [200, 200]
    assert after.status_code == 200


def test_oversized_headers_are_431() -> None:
    front = ServingFront(_App(), max_inflight=4, retry_after_s=1, max_header_bytes=1024)

    async def go() -> httpx.Response:
        async with _client(front) as client:
            return await client.get("/livez", headers={"X-Big": "a" * 2000})

    assert _run(go()).status_code == 431


class _Readiness:
    def __init__(self, ready: bool) -> None:
        self.ready = ready

    async def check(self) -> tuple[bool, dict[str, str]]:
        return self.ready, {"classifier": "ready" if self.ready else "its worker pid 9 is stopped",
                            "detector": "ready"}


@pytest.mark.parametrize("ready", [True, False])
def test_readyz_names_the_model_that_is_not_ready(ready: bool) -> None:
    front = ServingFront(_App(), readiness=lambda: _Readiness(ready), max_inflight=1,
                         retry_after_s=1, max_header_bytes=8192)

    async def go() -> httpx.Response:
        async with _client(front) as client:
            return await client.get("/readyz")

    resp = _run(go())
    assert resp.status_code == (200 if ready else 503)
    if not ready:
        assert resp.json()["error"] == "not ready: classifier: its worker pid 9 is stopped"
        assert resp.json()["models"]["detector"] == "ready"


def test_openapi_declares_the_bearer_scheme() -> None:
    front = ServingFront(_App(), max_inflight=1, retry_after_s=1, max_header_bytes=8192)

    async def go() -> httpx.Response:
        async with _client(front) as client:
            return await client.get("/docs.json")

    spec = _run(go()).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/classify"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in spec["paths"]["/livez"]["get"]
    assert with_bearer_scheme({})["components"]["securitySchemes"]


def test_route_labels_are_a_fixed_set() -> None:
    assert route_label("/classify/") == "/classify"
    assert route_label("/app/history/42") == "/app"
    assert route_label("/wp-admin/x") == OTHER
    assert route_label("/applesauce") == OTHER


def test_unique_paths_do_not_grow_the_metrics() -> None:
    import prometheus_client

    front = ServingFront(_App(), max_inflight=1, retry_after_s=1, max_header_bytes=8192)

    async def go(n: int, start: int) -> None:
        async with _client(front) as client:
            for i in range(start, start + n):
                await client.get(f"/scan-{i}")

    _run(go(10, 0))
    before = len(prometheus_client.generate_latest())
    _run(go(1000, 10))
    text = prometheus_client.generate_latest().decode()
    assert len(text) < before + 500, "1,000 unique paths added metric series"  # digits only
    assert "scan-" not in text
    counted = metrics().requests.labels(route=OTHER, status="200", model_version="none")
    assert counted._value.get() >= 1010


def test_connection_failures_are_transient_and_model_failures_are_not() -> None:
    import aiohttp
    from bentoml.exceptions import BentoMLException

    from serving.health import is_transient

    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(aiohttp.ClientConnectionError("Connector is closed."))
    assert is_transient(httpx.RemoteProtocolError("Server disconnected"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(aiohttp.ServerTimeoutError())  # the client may have given up
    assert not is_transient(httpx.ReadTimeout("slow"))
    assert not is_transient(BentoMLException("the model failed on this input"))
    assert not is_transient(ValueError("bad pixels"))


def _held_request(body: bytes = b"x") -> tuple[Any, Any, asyncio.Event, list[dict[str, Any]]]:
    """A receive that hands over ``body``, then blocks until ``hang_up`` is set (the client
    closing its connection), as uvicorn's does; and a send that records the answer."""
    hang_up = asyncio.Event()
    sent: list[dict[str, Any]] = []
    calls = {"n": 0}

    async def receive() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send, hang_up, sent


def test_a_client_that_hangs_up_cancels_its_work_and_frees_its_slot() -> None:
    cancelled: list[bool] = []

    async def model_call(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.sleep(60)  # waiting for a batch, or computing
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    front = ServingFront(model_call, max_inflight=1, retry_after_s=1, max_header_bytes=8192)
    before = metrics().abandoned.labels(route="/classify")._value.get()

    async def go() -> None:
        receive, send, hang_up, sent = _held_request()
        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": []}
        call = asyncio.create_task(front(scope, receive, send))
        while front.inflight < 1:
            await asyncio.sleep(0.01)
        hang_up.set()
        await asyncio.wait_for(call, 5)
        assert sent == []  # nobody to answer

    _run(go())
    assert cancelled == [True]
    assert front.inflight == 0
    assert metrics().abandoned.labels(route="/classify")._value.get() == before + 1


def test_an_answered_request_is_not_counted_as_abandoned() -> None:
    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    front = ServingFront(quick, max_inflight=1, retry_after_s=1, max_header_bytes=8192)
    before = metrics().abandoned.labels(route="/classify")._value.get()

    async def go() -> list[dict[str, Any]]:
        receive, send, hang_up, sent = _held_request()
        hang_up.set()  # uvicorn answers a disconnect at once after the response is complete
        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": []}
        await asyncio.wait_for(front(scope, receive, send), 5)
        return sent

    sent = _run(go())
    assert [m.get("status") for m in sent][:1] == [200]
    assert metrics().abandoned.labels(route="/classify")._value.get() == before
