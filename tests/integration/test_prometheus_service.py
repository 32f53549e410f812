"""A real Prometheus scrapes the running service, and reads back what the service counted."""

from __future__ import annotations

import pytest

from service.proto import cnnserve_pb2 as pb
from tests.integration.test_service import sample, scrape
from tests.prometheus import PrometheusServer, prometheus_binary


@pytest.mark.skipif(
    prometheus_binary() is None, reason="Prometheus not installed (Debian package prometheus)"
)
def test_prometheus_reads_the_request_counter(server, fmnist) -> None:
    image = pb.Image(pixels=pb.RawPixels(height=28, width=28, data=fmnist.test_images[3].tobytes()))
    query = 'sum(cnnserve_requests_total{model="mlp",method="FeatureMaps",code="OK"})'
    labels = dict(model="mlp", method="FeatureMaps", code="OK")
    before = sample(scrape(server.metrics_url), "cnnserve_requests_total", **labels)
    with PrometheusServer(f"127.0.0.1:{server.server.metrics_port}") as prometheus:
        for _ in range(5):
            server.stub.FeatureMaps(pb.FeatureMapsRequest(model="mlp", images=[image]))
        expected = before + 5
        result = prometheus.wait_for(
            query, lambda r: bool(r) and float(r[0]["value"][1]) >= expected, timeout=20
        )
        assert float(result[0]["value"][1]) == expected
        batch = prometheus.query('cnnserve_batch_size_count{model="mlp"}')
        assert batch and float(batch[0]["value"][1]) >= 5
