"""Limits hold before any work is done: a reply over the send limit is refused by field.

The other limits (message size, images per request, decoded pixels) are exercised by
test_fuzz.py; this one needs feature maps, whose size the server computes from the model's
declared shapes before running anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.proto import cnnserve_pb2 as pb
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import RunningServer, start_server

SEND_LIMIT_MB = 1
MODEL = "cnn"  # features.conv1 is 32 x 28 x 28 floats: about 100 kB per image


@pytest.fixture(scope="module")
def small_replies(tiny_repository: Path) -> Iterator[RunningServer]:
    running = start_server(tiny_repository, models=(MODEL,), max_send_message_mb=SEND_LIMIT_MB)
    yield running
    running.stop()


def tensors(fmnist, count: int) -> list[pb.Image]:
    pixels = fmnist.test_images[:count]
    return [pb.Image(pixels=pb.RawPixels(height=28, width=28, data=p.tobytes())) for p in pixels]


def test_feature_maps_over_the_send_limit_are_refused_before_inference(
    small_replies: RunningServer, fmnist
) -> None:
    stub = small_replies.stub
    big = pb.FeatureMapsRequest(model=MODEL, images=tensors(fmnist, 16), features=["conv1"])
    with pytest.raises(grpc.RpcError) as refused:
        stub.FeatureMaps(big, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(
        "features: the reply would be about 1.5 MiB (16 images"
    )
    assert "--max-send-message-mb" in refused.value.details()
    # The same through Classify, and what the message suggests works: fewer images, or float16.
    with pytest.raises(grpc.RpcError) as classify:
        stub.Classify(
            pb.ClassifyRequest(model=MODEL, images=big.images, features=["conv1"]), timeout=30
        )
    assert classify.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fewer = stub.FeatureMaps(
        pb.FeatureMapsRequest(model=MODEL, images=tensors(fmnist, 8), features=["conv1"]),
        timeout=30,
    )
    assert fewer.ByteSize() <= SEND_LIMIT_MB * 1024 * 1024 and len(fewer.results) == 8
    half = stub.FeatureMaps(
        pb.FeatureMapsRequest(
            model=MODEL, images=big.images, features=["conv1"], dtype=pb.DATA_TYPE_FLOAT16
        ),
        timeout=30,
    )
    assert len(half.results) == 16


def test_kserve_outputs_over_the_send_limit_are_refused(
    small_replies: RunningServer, fmnist
) -> None:
    images = (fmnist.test_images[:16, None] / 255.0).astype(np.float32)
    request = oip.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="image", datatype="FP32", shape=images.shape
            )
        ],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="features.conv1")],
        raw_input_contents=[images.tobytes()],
    )
    stub = oip_grpc.GRPCInferenceServiceStub(small_replies.channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("outputs: the reply would be about")
