"""The service's own Prometheus metrics, and a bounded label set for BentoML's.

Metrics (on ``/metrics`` beside BentoML's ``bentoml_*`` families; names ``leukoflow_*``):

* ``leukoflow_requests_total{route, status, model_version}``: every answer of the API process,
* ``leukoflow_request_duration_seconds{route, status}``: latency histogram,
* ``leukoflow_auth_refusals_total{route, status}``: 401/403 answers,
* ``leukoflow_queue_rejections_total{route}``: 503s of a full in-flight queue,
* ``leukoflow_abandoned_requests_total{route}``: requests cancelled because their client hung up,
* ``leukoflow_model_retries_total{model, outcome}``: transient model-call failures retried,
* ``leukoflow_batch_size{model}``: rows per model call, for services that batch.

Every ``route`` label is one of a fixed set (:func:`route_label`): an unknown path is ``other``,
so unauthenticated scans of unique paths cannot grow the metrics. BentoML's own middleware labels
by the raw path; :func:`bound_bentoml_labels` makes it see the bounded label too (the app
behind it still sees the real path).

The Prometheus objects are made on first use: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in the
worker after the service module is imported, and ``prometheus_client`` must see it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = [
    "KNOWN_ROUTES", "OTHER", "bound_bentoml_labels", "metrics", "observe_batch", "route_label",
    "skip_abandoned_batch_jobs",
]

OTHER = "other"  # the label of every path the service does not serve
KNOWN_ROUTES = frozenset({
    "/", "/classify", "/detect", "/explain", "/whoami", "/livez", "/readyz", "/healthz",
    "/metrics", "/docs", "/docs.json", "/schema.json",
})
# A prefix stands for every path under it (the web app's and the docs page's own files).
KNOWN_PREFIXES = {"/app": "/app", "/static_content/": "/static_content", "/assets/": "/assets"}
_ORIGINAL_PATH = "leukoflow.path"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def route_label(path: str, known: Iterable[str] = KNOWN_ROUTES) -> str:
    """The metrics label of a request path: the route itself, its prefix group, or ``other``."""
    path = path.rstrip("/") or "/"
    if path in known:
        return path
    for prefix, label in KNOWN_PREFIXES.items():
        if path == label or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return label
    return OTHER


class _Metrics:
    def __init__(self) -> None:
        import prometheus_client as pc

        self.requests = pc.Counter(
            "leukoflow_requests", "Answers of the leukoflow API by route, status and model "
            "version", ["route", "status", "model_version"])
        self.latency = pc.Histogram(
            "leukoflow_request_duration_seconds", "Time from request to the last byte of the "
            "answer", ["route", "status"], buckets=_LATENCY_BUCKETS)
        self.auth_refusals = pc.Counter(
            "leukoflow_auth_refusals", "Requests refused for a missing, unknown or "
            "insufficient API key", ["route", "status"])
        self.queue_rejections = pc.Counter(
            "leukoflow_queue_rejections", "Requests answered 503 because the in-flight queue "
            "was full", ["route"])
        self.abandoned = pc.Counter(
            "leukoflow_abandoned_requests", "Image requests whose client hung up before the "
            "answer: their work was cancelled", ["route"])
        self.retries = pc.Counter(
            "leukoflow_model_retries", "Model calls that failed transiently and were retried "
            "once", ["model", "outcome"])
        self.batch_size = pc.Histogram(
            "leukoflow_batch_size", "Rows per model call", ["model"], buckets=_BATCH_BUCKETS)


@functools.cache
def metrics() -> _Metrics:
    """The process's metric objects, made once, on first use."""
    return _Metrics()


def observe_batch(model: str, size: int) -> None:
    """Record the number of rows one model call computed (for batching services)."""
    metrics().batch_size.labels(model=model).observe(size)


ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def bound_bentoml_labels() -> None:
    """Make BentoML's request metrics label paths by :func:`route_label` (idempotent).

    ``RunnerTrafficMetricsMiddleware`` is the outermost middleware of a BentoML 1.4 service and
    uses ``scope["path"]`` as a label: 3,000 unique paths made ``/metrics`` 12 MB. It is given
    the label as the path, and the app behind it gets the real path back.
    """
    from bentoml._internal.server.http import instruments

    cls = instruments.RunnerTrafficMetricsMiddleware
    if getattr(cls, "_leukoflow_bounded", False):
        return
    original_init, original_call = cls.__init__, cls.__call__

    def __init__(self: Any, app: ASGIApp, *args: Any, **kwargs: Any) -> None:
        async def real_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
            path = scope.pop(_ORIGINAL_PATH, None)
            if path is not None:
                scope["path"] = path
            await app(scope, receive, send)

        original_init(self, real_path, *args, **kwargs)

    async def __call__(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            path = scope.get("path", "/")
            label = route_label(path)
            shown = "/" + OTHER if label == OTHER else label
            if shown != path:
                scope[_ORIGINAL_PATH] = path
                scope["path"] = shown
        await original_call(self, scope, receive, send)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__call__ = __call__  # type: ignore[method-assign]
    cls._leukoflow_bounded = True


def skip_abandoned_batch_jobs() -> None:
    """Make BentoML's adaptive batching drop the jobs of cancelled callers (idempotent).

    A request cancelled while it waits for its batch (:class:`serving.front.CancelOnDisconnect`)
    cancels its job's future, but BentoML 1.4's ``CorkDispatcher`` keeps the job queued, puts
    it in the next batch and computes it for nobody. The job now leaves the queue with its
    caller (no ``await`` lies between the dispatcher reading its queue and taking a batch).
    """
    import asyncio

    from bentoml._internal.marshal import dispatcher

    cls = dispatcher.CorkDispatcher
    if getattr(cls, "_leukoflow_skips_abandoned", False):
        return
    original = cls.inbound_call

    async def inbound_call(self: Any, data: Any) -> Any:
        try:
            return await original(self, data)
        except asyncio.CancelledError:
            for job in [j for j in self._queue if j.future.cancelled()]:
                self._queue.remove(job)
            raise

    cls.inbound_call = inbound_call
    cls._leukoflow_skips_abandoned = True
