"""Prometheus metrics for cnnserve, and the per-model statistics the KServe API reports.

Every series is in the default registry, labelled by model and version, with its unit in its name;
the service calls the one-line helpers below and never touches prometheus_client itself. The series
each request feeds are plain numbers turned into families at scrape time (see HOT_FAMILIES); the
rare ones (states, queue depth, load time) are prometheus_client objects. Triton's per-model
counters keep Triton's exact names (prometheus_client would append `_total` to a Counter), so
Triton dashboards work unchanged: they come from a collector over one locked table, which
`statistics()` reads too, so the ModelStatistics RPC and the metrics can never disagree.
`start_metrics_server` serves them on their own port. A leaf module: it imports nothing from the
project.
"""

from __future__ import annotations

import bisect
import itertools
import math
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple, TypedDict
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, disable_created_metrics
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The text format Triton serves; Prometheus parses it whatever its Accept header prefers.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODEL_STATES = ("loading", "ready", "failed", "unloaded")
# 0.1 ms .. 10 s, about three buckets a decade.
DURATION_BUCKETS = tuple(round(m * 10.0**e, 6) for e in range(-4, 1) for m in (1, 2.5, 5)) + (10.0,)
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(10))  # 1, 2, 4, ..., 512

_MV = ("model", "version")

# `*_created` gauges would double the series for a timestamp nothing here reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The series every request feeds (requests, durations, batches, images, in flight) are not
# prometheus_client objects: each of those takes its own lock and validates on every update
# (server CPU per call x0.96 without them, lenet5 at concurrency 32:
# bench/results/changes/2026-11-27-request-series-without-prometheus-locks.json). They are
# plain numbers in `_Series`, updated under the one lock that guards the Triton table, and
# `_HotCollector` turns them into the same families at scrape time.
HOT_FAMILIES = {
    "cnnserve_requests": "Requests answered, by gRPC status name.",
    "cnnserve_request_duration_seconds": "Server-side duration of a request, end to end.",
    "cnnserve_queue_duration_seconds": "Time a request waits to be batched.",
    "cnnserve_inference_duration_seconds": "One session run over a batch.",
    "cnnserve_batch_size": "Images per executed batch.",
    "cnnserve_inflight_requests": "Requests being served now.",
    "cnnserve_images": "Images run through the model.",
}
QUEUE_DEPTH = Gauge("cnnserve_queue_depth", "Images waiting in the batcher queue.", _MV)
MODEL_LOAD_DURATION = Gauge(
    "cnnserve_model_load_duration_seconds", "Time the last load of the model took.", _MV
)
MODEL_STATE = Gauge(
    "cnnserve_model_state", "1 for the model's current state, 0 for the others.", [*_MV, "state"]
)
MODEL_INFO = Gauge(
    "cnnserve_model_info", "Always 1: the execution provider in use.", [*_MV, "provider", "kind"]
)
AUTH_REJECTED = Counter(
    "cnnserve_auth_rejected",
    "Calls refused UNAUTHENTICATED, by gRPC method and reason (missing or invalid token).",
    ["method", "reason"],
)

TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in "
    "microseconds",
}


@dataclass
class _Totals:
    """Cumulative per-model numbers, in Triton's units, behind both nv_* and statistics()."""

    success_count: int = 0
    success_ns: int = 0
    failure_count: int = 0
    failure_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def counters(self) -> dict[str, float]:
        """Triton's semantics: duration counts successes only, compute is summed per request."""
        return {
            "nv_inference_request_success": self.success_count,
            "nv_inference_request_failure": self.failure_count,
            "nv_inference_count": self.inference_count,
            "nv_inference_exec_count": self.execution_count,
            "nv_inference_request_duration_us": self.success_ns / 1000,
            "nv_inference_queue_duration_us": self.queue_ns / 1000,
            "nv_inference_compute_infer_duration_us": self.compute_ns / 1000,
        }


class _Histogram:
    """Bucket counts and a sum; `le` bounds inclusive, as Prometheus histograms are."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = (*bounds, math.inf)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative = itertools.accumulate(self.counts)
        buckets = [(floatToGoString(b), n) for b, n in zip(self.bounds, cumulative, strict=True)]
        family.add_metric(labels, buckets, self.total)


@dataclass
class _Series:
    """One model version's request-path series (HOT_FAMILIES), guarded by `_lock`."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, code)
    durations: dict[str, _Histogram] = field(default_factory=dict)  # by method
    queue: _Histogram = field(default_factory=lambda: _Histogram(DURATION_BUCKETS))
    inference: _Histogram = field(default_factory=lambda: _Histogram(DURATION_BUCKETS))
    batch_size: _Histogram = field(default_factory=lambda: _Histogram(BATCH_SIZE_BUCKETS))
    images: int = 0
    inflight: int = 0
    batches: int = 0  # a model that never ran a batch shows no batch series, as before


_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: every call feeds several series, and the library's
    lookup validates and locks each time. Hot-path series are never removed, so a remembered
    child stays the registered one (MODEL_INFO, which is removed, does not come through here).
    """
    key = (id(metric), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


_lock = threading.Lock()
_totals: dict[tuple[str, str], _Totals] = {}
_series: dict[tuple[str, str], _Series] = {}
_info_labels: dict[tuple[str, str], tuple[str, str]] = {}


class _TritonCollector(Collector):
    """Yields the nv_* families typed `unknown`: prometheus_client renames any counter."""

    def collect(self) -> Iterable[Metric]:
        with _lock:
            rows = [(key, totals.counters()) for key, totals in sorted(_totals.items())]
        for name, documentation in TRITON_COUNTERS.items():
            family = Metric(name, documentation, "unknown")
            for (model, version), counters in rows:
                family.add_sample(name, {"model": model, "version": version}, counters[name])
            yield family


REGISTRY.register(_TritonCollector())


class _HotCollector(Collector):
    """The request-path series, read from `_series` at scrape time (see HOT_FAMILIES)."""

    def describe(self) -> Iterable[Metric]:
        return []  # the registry would otherwise collect at registration to learn the names

    def collect(self) -> Iterable[Metric]:
        doc = HOT_FAMILIES
        requests = CounterMetricFamily(
            "cnnserve_requests", doc["cnnserve_requests"], labels=[*_MV, "method", "code"]
        )
        durations = HistogramMetricFamily(
            "cnnserve_request_duration_seconds",
            doc["cnnserve_request_duration_seconds"],
            labels=[*_MV, "method"],
        )
        queue = HistogramMetricFamily(
            "cnnserve_queue_duration_seconds",
            doc["cnnserve_queue_duration_seconds"],
            labels=list(_MV),
        )
        inference = HistogramMetricFamily(
            "cnnserve_inference_duration_seconds",
            doc["cnnserve_inference_duration_seconds"],
            labels=list(_MV),
        )
        batch_size = HistogramMetricFamily(
            "cnnserve_batch_size", doc["cnnserve_batch_size"], labels=list(_MV)
        )
        inflight = GaugeMetricFamily(
            "cnnserve_inflight_requests", doc["cnnserve_inflight_requests"], labels=list(_MV)
        )
        images = CounterMetricFamily("cnnserve_images", doc["cnnserve_images"], labels=list(_MV))
        with _lock:
            for (model, version), series in sorted(_series.items()):
                mv = [model, version]
                for (method, code), count in series.requests.items():
                    requests.add_metric([*mv, method, code], count)
                for method, histogram in series.durations.items():
                    histogram.add_to(durations, [*mv, method])
                if series.batches:
                    series.queue.add_to(queue, mv)
                    series.inference.add_to(inference, mv)
                    series.batch_size.add_to(batch_size, mv)
                    images.add_metric(mv, series.images)
                inflight.add_metric(mv, series.inflight)
        yield from (requests, durations, queue, inference, batch_size, inflight, images)


REGISTRY.register(_HotCollector())


def _series_of(key: tuple[str, str]) -> _Series:
    """A model version's request-path series, made on first use; call under `_lock`."""
    series = _series.get(key)
    if series is None:  # not setdefault: that would build a throwaway _Series on every call
        series = _series[key] = _Series()
    return series


def _totals_of(key: tuple[str, str]) -> _Totals:
    """A model version's Triton totals, made on first use; call under `_lock`."""
    totals = _totals.get(key)
    if totals is None:
        totals = _totals[key] = _Totals()
    return totals


def request_started(model: str, version: str) -> None:
    """A call began: it counts as in flight until `request_ended`."""
    with _lock:
        _series_of((model, version)).inflight += 1


def request_ended(model: str, version: str, method: str, code: str, seconds: float) -> None:
    """A call that `request_started` ended, however: no longer in flight, and counted in the
    request, duration and Triton series."""
    key = (model, version)
    with _lock:
        series = _series_of(key)
        series.inflight -= 1
        series.requests[(method, code)] = series.requests.get((method, code), 0) + 1
        histogram = series.durations.get(method)
        if histogram is None:
            histogram = series.durations[method] = _Histogram(DURATION_BUCKETS)
        histogram.observe(seconds)
        totals = _totals_of(key)
        if code == "OK":
            totals.success_count += 1
            totals.success_ns += round(seconds * 1e9)
        else:
            totals.failure_count += 1
            totals.failure_ns += round(seconds * 1e9)


def observe_batch(
    model: str, version: str, images: int, queue_seconds: Sequence[float], inference_seconds: float
) -> None:
    """The batcher reports a batch that ran: its size, each request's wait and the run time."""
    key = (model, version)
    with _lock:
        series = _series_of(key)
        series.images += images
        series.batches += 1
        series.batch_size.observe(images)
        series.inference.observe(inference_seconds)
        for waited in queue_seconds:
            series.queue.observe(waited)
        totals = _totals_of(key)
        totals.inference_count += images
        totals.execution_count += 1
        totals.queue_count += len(queue_seconds)
        totals.queue_ns += sum(round(waited * 1e9) for waited in queue_seconds)
        # Like Triton, every request in the batch is charged the batch's compute time.
        totals.compute_count += len(queue_seconds)
        totals.compute_ns += len(queue_seconds) * round(inference_seconds * 1e9)
        totals.last_inference_ms = int(time.time() * 1000)


def observe_auth_rejected(method: str, reason: str) -> None:
    """The token check refused a call; only known methods reach here, so labels stay few."""
    AUTH_REJECTED.labels(method, reason).inc()


def set_queue_depth(model: str, version: str, images: int) -> None:
    """The batcher reports its backlog whenever it changes, so saturation shows before errors."""
    _child(QUEUE_DEPTH, model, version).set(images)


def set_model_state(
    model: str,
    version: str,
    state: str,
    provider: str | None = None,
    kind: str | None = None,
    load_seconds: float | None = None,
) -> None:
    """The repository reports each lifecycle change; exactly one state gauge reads 1.

    `provider` and `kind` describe the loaded session: pass them with "ready".
    """
    if state not in MODEL_STATES:
        raise ValueError(f"unknown model state {state!r}; expected one of {MODEL_STATES}")
    for each in MODEL_STATES:
        MODEL_STATE.labels(model, version, each).set(1 if each == state else 0)
    if load_seconds is not None:
        MODEL_LOAD_DURATION.labels(model, version).set(load_seconds)
    with _lock:
        # A loaded model shows its Triton counters, at zero until it serves.
        _totals.setdefault((model, version), _Totals())
        if provider is not None or state == "unloaded":
            # One info series per model: a reload onto another provider leaves no stale 1.
            stale = _info_labels.pop((model, version), None)
            if stale is not None:
                MODEL_INFO.remove(model, version, *stale)
        if provider is not None:
            _info_labels[(model, version)] = (provider, kind or "")
            MODEL_INFO.labels(model, version, provider, kind or "").set(1)


class Duration(TypedDict):
    """A count and cumulative nanoseconds, as KServe's StatisticDuration."""

    count: int
    ns: int


class ModelStatistics(TypedDict):
    """The fields of KServe's ModelStatistics that cnnserve measures."""

    last_inference: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_infer: Duration


def statistics(model: str, version: str) -> ModelStatistics:
    """Cumulative statistics for the ModelStatistics RPC, read from the nv_* numbers themselves."""
    with _lock:
        t = _totals.get((model, version), _Totals())
        return ModelStatistics(
            last_inference=t.last_inference_ms,
            inference_count=t.inference_count,
            execution_count=t.execution_count,
            success=Duration(count=t.success_count, ns=t.success_ns),
            fail=Duration(count=t.failure_count, ns=t.failure_ns),
            queue=Duration(count=t.queue_count, ns=t.queue_ns),
            compute_infer=Duration(count=t.compute_count, ns=t.compute_ns),
        )


def exposition() -> bytes:
    """The Prometheus text format, with the nv_* families typed `counter` exactly as Triton."""
    text = _generate_latest(REGISTRY).decode()
    for name in TRITON_COUNTERS:
        text = text.replace(f"# TYPE {name} untyped\n", f"# TYPE {name} counter\n")
    return text.encode()


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Serves exposition() on every path: always the text format, whatever Accept asks for."""
    start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
    return [exposition()]


class _QuietHandler(WSGIRequestHandler):
    """Scrapes every second would drown the service log."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A slow scraper must not hold up the next one."""

    daemon_threads = True


class MetricsServer(NamedTuple):
    """The running metrics endpoint; `port` is the bound one, useful after asking for port 0."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        """Stops serving and frees the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int = 0, addr: str = "0.0.0.0") -> MetricsServer:
    """Serves the metrics on their own port, in a daemon thread, so scrapes never touch gRPC."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_MetricsServer", (_ThreadingServer,), {"address_family": family})
    server: WSGIServer = make_server(addr, port, _app, server_class, handler_class=_QuietHandler)
    # Polling every 0.1 s rather than 0.5 s, so stop() is quick.
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread, server.server_port)


def call_totals() -> tuple[dict[str, int], int]:
    """Calls answered so far by status name, and calls in flight now (for the shutdown log)."""
    answered: dict[str, int] = {}
    with _lock:
        for series in _series.values():
            for (_, code), count in series.requests.items():
                answered[code] = answered.get(code, 0) + count
        inflight = sum(series.inflight for series in _series.values())
    return answered, inflight
