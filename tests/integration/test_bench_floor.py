"""The suite's gRPC floors, aio and synchronous, answer like a server and refuse what they can't;
a paired load through one times each kind of call apart."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.serving import measure
from bench.serving.floor_server import FloorServer
from bench.serving.load import Load
from service.proto import cnnserve_pb2 as pb


def _request(images: int, features: tuple[str, ...] = ()) -> bytes:
    pixels = np.zeros((28, 28), np.uint8).tobytes()
    image = pb.Image(pixels=pb.RawPixels(height=28, width=28, data=pixels))
    return pb.ClassifyRequest(
        model="lenet5", images=[image] * images, features=features
    ).SerializeToString()


@pytest.mark.parametrize("sync_workers", [0, 4])
def test_a_floor_answers_prebuilt_counts_and_refuses_others(
    tmp_path: Path, sync_workers: int
) -> None:
    server = FloorServer(
        log=tmp_path / "floor.log",
        models=[],
        images=[1, 3],
        sync_workers=sync_workers,
        features={"features.c1": (6, 28, 28)},
    )
    server.start(timeout=60)
    try:
        with grpc.insecure_channel(server.address) as channel:
            classify = channel.unary_unary("/cnnserve.v1.Inference/Classify")
            for images in (1, 3, 1):
                reply = pb.ClassifyResponse.FromString(classify(_request(images), timeout=10))
                assert len(reply.results) == images
                assert sum(reply.results[0].probabilities) == pytest.approx(1.0)
                assert not reply.results[0].features
            # A call asking for the map gets its bytes for every image, and the plain reply
            # stays the plain one (the two are told apart by their requests' lengths).
            for images in (3, 1):
                asked = classify(_request(images, ("features.c1",)), timeout=10)
                reply = pb.ClassifyResponse.FromString(asked)
                assert [len(r.features[0].data) for r in reply.results] == [
                    6 * 28 * 28 * 4
                ] * images
                assert list(reply.results[-1].features[0].shape) == [6, 28, 28]
            assert not pb.ClassifyResponse.FromString(classify(_request(1))).results[0].features
            for features in (("features.other",), ("features.c1", "features.c1")):
                with pytest.raises(grpc.RpcError) as refused:
                    classify(_request(1, features), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as refused:
                classify(_request(2), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no reply prebuilt for 2 images" in refused.value.details()
    finally:
        server.stop()


def test_a_paired_load_times_each_kind_of_call_in_the_same_run(tmp_path: Path) -> None:
    server = FloorServer(
        log=tmp_path / "floor.log", models=[], images=[1], features={"features.c1": (6, 28, 28)}
    )
    server.start(timeout=60)
    try:
        plain, featured = _request(1), _request(1, ("features.c1",))
        load = Load(
            address=server.address,
            client="grpc",
            concurrency=2,
            seconds=1.0,
            timeout=10.0,
            images=1,
            method="/cnnserve.v1.Inference/Classify",
            payloads=(plain, featured),
            kinds=2,
            check_every=1,  # every reply parsed: a featured reply must still pass the check
        )
        figures = measure.once(server.pid, load, tmp_path / "load")
    finally:
        server.stop()
    assert figures["errors"] == 0 and figures["replies_wrong"] == 0 and figures["calls"] > 20
    without, with_ = figures["p50_without"], figures["p50_with"]
    assert without > 0 and with_ > 0
    assert figures["paired_overhead_ms"] == pytest.approx(with_ - without, abs=1e-3)
    # The floor is one process: its CPU comes split by thread, the parts adding up to the whole
    # (to the clock tick) and its event loop busy for part of the run, never more than all of it.
    parts = [figures[f"{kind}_ms_per_call"] for kind in ("main", "grpc", "other")]
    answered = figures["calls"] - figures["errors"]
    whole_ms = 1000 * figures["server_cpu_s"] / answered
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK") / answered
    assert parts[0] > 0 and min(parts) >= 0
    assert sum(parts) == pytest.approx(whole_ms, abs=3 * tick_ms + 1e-3)
    assert 0 < figures["main_busy_pct"] <= 105  # a 10 ms clock tick is 1% of a 1 s run


def test_paired_figures_are_each_kinds_median_and_their_difference() -> None:
    latency = np.array([0.001, 0.003, 0.002, 0.004, 0.009, 0.5])
    kind = np.array([0, 1, 0, 1, 0, 1])
    ok = np.array([True, True, True, True, True, False])  # a failed call is not timed
    figures = measure.paired(latency, kind, ok)
    assert figures == {"p50_without": 2.0, "p50_with": 3.5, "paired_overhead_ms": 1.5}
    assert measure.paired(latency, kind, kind == 0)["paired_overhead_ms"] is None
