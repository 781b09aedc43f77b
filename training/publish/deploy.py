"""Deploy = publish: one stable port, and a blue/green swap to every newly published Bento.

``leukoflow serve`` runs :func:`run_supervisor`:

* a small reverse proxy on ``serving.host:serving.port`` (the port apps and ``make up`` use),
* one live backend behind it: ``bentoml serve <bento>`` on a free loopback port,
* a watcher of ``$LEUKOFLOW_HOME/serving/deployed.json``, which the publish step writes only
  after its smoke test passed (:func:`record_deployment`).

When that file names another Bento the supervisor starts it (green) on a new port, waits for
``/readyz`` and an authenticated request that names the published versions, points the proxy
at it, lets the old backend (blue) finish the requests it holds, and stops it. No request ever
reaches a half-started backend; if the green one never gets ready it is stopped, blue keeps
serving and the log says why. In the compose stack the API container runs the same command
on the shared home volume, so a publish by an Airflow worker deploys there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.config import Config
from training.errors import PublishError
from training.records import Publication

__all__ = ["deployment_file", "read_deployment", "record_deployment", "run_supervisor"]

log = logging.getLogger("leukoflow.deploy")

POLL_S = 2.0  # how often the supervisor looks for a new deployment
DRAIN_S = 120.0  # how long the old backend may take to answer the requests it holds
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy recomputes.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length",
        "content-encoding"}


def deployment_file(cfg: Config) -> Path:
    return cfg.home / "serving" / "deployed.json"


def record_deployment(cfg: Config, publication: Publication) -> Path:
    """Name the Bento the service must serve now (atomic: the supervisor never reads half)."""
    path = deployment_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"bento_tag": publication.bento_tag, "models": publication.models,
              "published_at": datetime.now(UTC).isoformat(timespec="seconds")}
    fd, tmp = tempfile.mkstemp(prefix=".deployed.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)
    return path


def read_deployment(cfg: Config) -> dict[str, Any] | None:
    try:
        return json.loads(deployment_file(cfg).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _Backend:
    tag: str
    url: str
    stack: contextlib.ExitStack
    inflight: int = 0
    served: int = 0


@dataclass
class _State:
    active: _Backend | None = None
    failed: set[str] = field(default_factory=set)  # tags whose start failed: not retried
    stopping: bool = False


# Backends are started from this one thread, which lives as long as the supervisor: the
# parent-death signal of ``bentoml serve`` (PR_SET_PDEATHSIG) follows the thread that forked it.
_STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukoflow-backend-starter")
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Orphaned descendants (circus workers whose arbiter died) are re-parented to this process
    instead of init, so :func:`_stop_descendants` still finds them (Linux only)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    except (OSError, AttributeError):
        return False


def _stop_descendants(grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace``, to every process still below this one."""
    import psutil

    try:
        left = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in left]


def _start_backend(cfg: Config, tag: str, versions: dict[str, str] | None) -> _Backend:
    """Start ``bentoml serve tag`` on a free port; ready and smoke-tested, or PublishError."""
    from training.families import family_of_model
    from training.publish.bento import _smoke_key, serve, smoke_image, smoke_test

    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(serve(cfg, target=tag, die_with_parent=True))
        if versions:
            with _smoke_key(cfg) as key:
                smoke_test(url, key, smoke_image(), expected_versions=versions,
                           families=[family_of_model(cfg, n).name for n in versions])
    except BaseException:
        stack.close()
        raise
    return _Backend(tag=tag, url=url, stack=stack)


def _proxy_app(state: _State) -> Any:
    """The stable front: every request goes to the active backend, counted while in flight."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0))

    async def forward(request: Request) -> Response:
        backend = state.active
        if request.url.path == "/livez":  # the front itself is alive; /readyz asks the backend
            return JSONResponse({"live": True, "serving": backend.tag if backend else None})
        if backend is None:
            return JSONResponse({"error": "no model has been published yet; run the retrain "
                                 "DAG or `leukoflow publish`"}, status_code=503,
                                headers={"Retry-After": "30"})
        backend.inflight += 1
        try:
            body = await request.body()
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
            url = backend.url + request.url.path
            if request.url.query:
                url += "?" + request.url.query
            upstream = await client.request(request.method, url, content=body, headers=headers)
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            out["x-leukoflow-bento"] = backend.tag
            backend.served += 1
            return Response(upstream.content, status_code=upstream.status_code, headers=out)
        except httpx.HTTPError as exc:
            log.error("backend %s did not answer %s %s: %s", backend.tag, request.method,
                      request.url.path, exc)
            return JSONResponse({"error": "the model service did not answer; try again "
                                 "shortly"}, status_code=503, headers={"Retry-After": "5"})
        finally:
            backend.inflight -= 1

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app = Starlette(routes=[Route("/{path:path}", forward, methods=methods)])
    app.state.client = client
    return app


async def _swap(cfg: Config, state: _State, tag: str, versions: dict[str, str] | None) -> None:
    """Blue/green: start and check the new backend, switch, drain and stop the old one."""
    log.info("deploying %s (%s)", tag, versions)
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        start = loop.run_in_executor(_STARTER, _start_backend, cfg, tag, versions)
        green = await asyncio.shield(start)
    except asyncio.CancelledError:  # stopping while it starts: stop it once it has started
        start.add_done_callback(lambda f: f.exception() or f.result().stack.close())
        raise
    except Exception as exc:  # noqa: BLE001 - any failure keeps the old backend serving
        state.failed.add(tag)
        log.error("not deploying %s: it did not start or pass its smoke test; %s keeps "
                  "serving. %s", tag, state.active.tag if state.active else "nothing", exc)
        return
    blue, state.active = state.active, green
    log.info("now serving %s at %s (ready after %.1fs)", tag, green.url,
             time.monotonic() - started)
    if blue is not None:
        deadline = time.monotonic() + DRAIN_S
        while blue.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log.info("stopping %s after %d requests (%d still in flight)", blue.tag, blue.served,
                 blue.inflight)
        await asyncio.to_thread(blue.stack.close)


def _wanted(cfg: Config) -> tuple[str | None, dict[str, str] | None]:
    record = read_deployment(cfg)
    if record:
        return record["bento_tag"], record.get("models")
    return None, None


async def _follow(cfg: Config, state: _State, initial: str | None) -> None:
    tag, versions = _wanted(cfg)
    tag = tag or initial
    if tag:
        await _swap(cfg, state, tag, versions)
    while not state.stopping:
        await asyncio.sleep(POLL_S)
        tag, versions = _wanted(cfg)
        if tag and tag not in state.failed and (state.active is None or tag != state.active.tag):
            await _swap(cfg, state, tag, versions)


async def _main(cfg: Config, host: str, port: int, initial: str | None) -> None:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises the signal that stopped it once it has shut down, which would kill
        this process before its backends are stopped: the supervisor handles signals itself."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    _become_subreaper()
    state = _State()
    app = _proxy_app(state)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                    timeout_graceful_shutdown=10))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    follower = asyncio.create_task(_follow(cfg, state, initial))
    try:
        await server.serve()  # returns once a signal set should_exit
    finally:
        state.stopping = True
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await app.state.client.aclose()
        if state.active is not None:
            await asyncio.to_thread(state.active.stack.close)
        # whatever is left (a backend still starting, workers orphaned by a dying arbiter)
        stray = await asyncio.to_thread(_stop_descendants)
        if stray:
            log.warning("stopped %d process(es) left after the backends: %s", len(stray), stray)
        log.info("stopped")


def run_supervisor(cfg: Config, *, host: str | None = None, port: int | None = None,
                   initial: str | None = "leukoflow:latest") -> None:
    """Serve the published Bento on the stable port and follow every new deployment.

    ``initial``: what to serve when nothing has been recorded as deployed yet (the last Bento
    that passed its smoke test). Blocks until SIGTERM or SIGINT; every backend process it
    started is stopped before it returns (also one still starting, and any orphaned worker:
    the supervisor is their subreaper); a SIGKILLed supervisor takes its ``bentoml serve``
    processes with it (parent-death signal).
    """
    if port is not None and not 0 < port < 65536:
        raise PublishError(f"port {port} is not a TCP port")
    asyncio.run(_main(cfg, host or cfg.serving.host, port or cfg.serving.port, initial))
