"""The metrics endpoint against its real consumers: an HTTP client, and a real Prometheus.

The endpoint is started on port 0 on loopback; Prometheus (the system package) scrapes it every
second and the series are read back through Prometheus's own query API, so names, labels, values
and the `counter` type of Triton's series are checked as Prometheus parsed them. Each test uses
its own model label, so nothing else in the process-wide registry can satisfy its queries.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service import metrics
from tests.prometheus import PrometheusServer, prometheus_binary
from tests.unit.test_metrics import finished_call

VERSION = "1"


@pytest.fixture
def metrics_server() -> Iterator[metrics.MetricsServer]:
    server = metrics.start_metrics_server(0, "127.0.0.1")
    yield server
    server.stop()


@pytest.fixture
def model() -> str:
    return f"scrape-{uuid.uuid4().hex[:10]}"


def only_value(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_metrics_server_serves_the_text_format_on_a_free_port(
    metrics_server: metrics.MetricsServer, model: str
) -> None:
    assert metrics_server.port > 0
    finished_call(model, VERSION, "Classify", "OK", 0.001)
    url = f"http://127.0.0.1:{metrics_server.port}/metrics"
    request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=5) as response:
        content_type = response.headers["Content-Type"]
        body = response.read().decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "# TYPE nv_inference_request_success counter\n" in body
    assert f'nv_inference_request_success{{model="{model}",version="1"}} 1.0\n' in body

    metrics_server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.timeout(30)
@pytest.mark.skipif(
    prometheus_binary() is None, reason="Prometheus is not installed (apt-get install prometheus)"
)
def test_real_prometheus_scrapes_the_series(
    metrics_server: metrics.MetricsServer, model: str
) -> None:
    started = time.monotonic()
    metrics.set_model_state(model, VERSION, "ready", provider="CPUExecutionProvider", kind="cnn")
    for _ in range(3):
        finished_call(model, VERSION, "Classify", "OK", 0.002)
    finished_call(model, VERSION, "Classify", "INVALID_ARGUMENT", 0.001)
    metrics.observe_batch(model, VERSION, 5, [0.001, 0.001, 0.002], 0.004)

    labels = f'model="{model}",version="{VERSION}"'
    with PrometheusServer(f"127.0.0.1:{metrics_server.port}") as prometheus:
        success = prometheus.wait_for(f"nv_inference_request_success{{{labels}}}", timeout=15)
        assert only_value(success) == 3
        assert success[0]["metric"]["job"] == "cnnserve"
        ok = prometheus.query(f'cnnserve_requests_total{{{labels},method="Classify",code="OK"}}')
        assert only_value(ok) == 3
        assert only_value(prometheus.query(f"nv_inference_request_failure{{{labels}}}")) == 1
        assert only_value(prometheus.query(f"nv_inference_count{{{labels}}}")) == 5
        assert only_value(prometheus.query(f"cnnserve_images_total{{{labels}}}")) == 5
        ready = prometheus.query(f'cnnserve_model_state{{{labels},state="ready"}}')
        assert only_value(ready) == 1
        info = prometheus.query(f"cnnserve_model_info{{{labels}}}")
        assert info[0]["metric"]["provider"] == "CPUExecutionProvider"
        assert prometheus.query(f"nv_inference_count_total{{{labels}}}") == []
        for name in metrics.TRITON_COUNTERS:
            assert {m["type"] for m in prometheus.metadata(name)} == {"counter"}, name

        # Later scrapes pick up new increments: the series is live, not a one-off.
        finished_call(model, VERSION, "Classify", "OK", 0.002)
        more = prometheus.wait_for(
            f"nv_inference_request_success{{{labels}}}",
            lambda result: bool(result) and only_value(result) == 4,
            timeout=10,
        )
        assert only_value(more) == 4
    assert time.monotonic() - started < 30
