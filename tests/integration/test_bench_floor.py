"""The suite's gRPC floors, aio and synchronous, answer like a server and refuse what they can't."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.serving.floor_server import FloorServer
from service.proto import cnnserve_pb2 as pb


def _request(images: int) -> bytes:
    pixels = np.zeros((28, 28), np.uint8).tobytes()
    image = pb.Image(pixels=pb.RawPixels(height=28, width=28, data=pixels))
    return pb.ClassifyRequest(model="lenet5", images=[image] * images).SerializeToString()


@pytest.mark.parametrize("sync_workers", [0, 4])
def test_a_floor_answers_prebuilt_counts_and_refuses_others(
    tmp_path: Path, sync_workers: int
) -> None:
    server = FloorServer(
        log=tmp_path / "floor.log", models=[], images=[1, 3], sync_workers=sync_workers
    )
    server.start(timeout=60)
    try:
        with grpc.insecure_channel(server.address) as channel:
            classify = channel.unary_unary("/cnnserve.v1.Inference/Classify")
            for images in (1, 3, 1):
                reply = pb.ClassifyResponse.FromString(classify(_request(images), timeout=10))
                assert len(reply.results) == images
                assert sum(reply.results[0].probabilities) == pytest.approx(1.0)
            with pytest.raises(grpc.RpcError) as refused:
                classify(_request(2), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no reply prebuilt for 2 images" in refused.value.details()
    finally:
        server.stop()
