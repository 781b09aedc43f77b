"""``/readyz`` of the API: every model service it depends on is loaded and its worker alive.

BentoML's own ``/readyz`` asks each dependency through the same HTTP client pool that carries
inference, with a 5 s timeout, and raises (a 500 after a hang) when a worker's socket does not
answer: under load it times out, with a stopped worker it hangs. This check has a client of its
own per model service (never queued behind inference), a short timeout, and looks at the
worker processes themselves (siblings of this worker under BentoML's process manager), so the
503 names the model and what is wrong: not started, exited, stopped (SIGSTOP), not loaded
(its ``__is_ready__`` is false) or not answering in time.

It is generic over the dependencies the API service declares (``bentoml.depends``): a topology
with other model services is checked the same way.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["ModelProbe", "ReadinessCheck", "is_transient", "probes_for"]


@dataclass
class ModelProbe:
    """How to ask one model service whether it is ready."""

    name: str  # the dependency's attribute on the API service (classifier, detector, ...)
    service_name: str  # the BentoML service name (its workers' ``--service-name``)
    url: str | None  # the runner URL under ``bentoml serve`` (file:// socket or tcp://)
    client: Any = None

    def _client(self, timeout: float) -> Any:
        import httpx

        if self.client is None:
            parsed = urlparse(self.url or "")
            if parsed.scheme == "file":
                transport = httpx.AsyncHTTPTransport(uds=unquote(parsed.path))
                base = "http://127.0.0.1"
            else:
                transport, base = None, f"http://{parsed.netloc}" if parsed.netloc else self.url
            self.client = httpx.AsyncClient(base_url=base, transport=transport,
                                            timeout=timeout)
        return self.client


_TRANSIENT_WORDS = ("disconnect", "connection reset", "connection refused", "broken pipe",
                    "connector is closed", "remoteprotocolerror", "readerror", "connecterror")


def is_transient(exc: BaseException) -> bool:
    """A failure of the connection to a model service, not of the model on this input: worth
    one retry (BentoML 1.4's client wraps some of them in a BentoMLException)."""
    import httpx

    connection_errors: tuple[type[BaseException], ...] = (httpx.TransportError, ConnectionError)
    try:  # BentoML 1.4's inter-service client is aiohttp: "Server disconnected", "Connector
        import aiohttp  # is closed" are ClientConnectionErrors

        connection_errors += (aiohttp.ClientConnectionError,)
    except ImportError:  # pragma: no cover - bentoml depends on aiohttp
        pass
    if isinstance(exc, connection_errors):
        return not isinstance(exc, httpx.TimeoutException | TimeoutError)
    text = f"{type(exc).__name__} {exc}".lower()
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, connection_errors) and not isinstance(
                cause, httpx.TimeoutException | TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    return any(word in text for word in _TRANSIENT_WORDS)


def probes_for(service: Any) -> list[ModelProbe]:
    """One probe per remote model service the BentoML ``service`` depends on."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    mapping = BentoMLContainer.remote_runner_mapping.get()
    probes = []
    for attr, dep in getattr(service, "dependencies", {}).items():
        on = getattr(dep, "on", None)
        if on is None:
            continue
        probes.append(ModelProbe(attr, on.name, mapping.get(on.name)))
    return probes


def _workers(service_name: str) -> list[Any]:
    """The worker processes of ``service_name``: siblings of this API worker."""
    import psutil

    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return []
    found = []
    for proc in siblings:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--service-name" in cmd and service_name in cmd[cmd.index("--service-name") + 1:][:1]:
            found.append(proc)
    return found


def _process_problem(service_name: str) -> str | None:
    import psutil

    workers = _workers(service_name)
    if not workers:
        return "its worker process is not running (exited or not started yet)"
    states = []
    for proc in workers:
        try:
            states.append((proc.pid, proc.status()))
        except psutil.Error:
            states.append((proc.pid, "gone"))
    usable = [s for s in states if s[1] not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE,
                                                 psutil.STATUS_DEAD, "gone",
                                                 psutil.STATUS_TRACING_STOP)]
    if not usable:
        return "its worker " + ", ".join(f"pid {pid} is {state}" for pid, state in states)
    return None


STARTING_S = 300.0  # a worker younger than this that does not answer is said to be loading


def _youngest_worker_age(service_name: str) -> float | None:
    import time

    import psutil

    ages = []
    for proc in _workers(service_name):
        try:
            ages.append(time.time() - proc.create_time())
        except psutil.Error:
            continue
    return min(ages) if ages else None


class ReadinessCheck:
    """Ask every model service at once, each within ``timeout`` seconds."""

    def __init__(self, probes: list[ModelProbe], timeout: float = 0.8) -> None:
        self.probes = probes
        self.timeout = timeout

    async def _one(self, probe: ModelProbe) -> str | None:
        """None when ready, else what is wrong."""
        if probe.url is None:  # served in this process (tests, to_asgi): ready when built
            return None
        if os.name == "posix":  # reads /proc: fast, and no thread to wait for under load
            problem = _process_problem(probe.service_name)
            if problem:
                return problem
        import httpx

        try:
            resp = await asyncio.wait_for(probe._client(self.timeout).get("/readyz"),
                                          self.timeout)
        except (TimeoutError, httpx.TimeoutException):
            young = _youngest_worker_age(probe.service_name)
            if young is not None and young < STARTING_S:
                return (f"its worker started {young:.0f}s ago and is still loading (it did "
                        f"not answer /readyz within {self.timeout:g}s)")
            return (f"it did not answer /readyz within {self.timeout:g}s (its worker is busy "
                    "or hung)")
        except httpx.HTTPError as exc:
            return f"it cannot be reached: {type(exc).__name__}: {exc}"
        if resp.status_code != 200:
            return f"its model is not loaded (its /readyz answered {resp.status_code})"
        return None

    async def check(self) -> tuple[bool, dict[str, str]]:
        """(ready, model -> "ready" or the reason it is not)."""
        results = await asyncio.gather(*(self._one(p) for p in self.probes))
        detail = {p.name: r or "ready" for p, r in zip(self.probes, results, strict=True)}
        return all(r is None for r in results), detail
