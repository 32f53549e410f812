"""Every RPC of cnnserve.v1 against a real server, with real Fashion-MNIST images."""

from __future__ import annotations

import io
import json
import re
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service.proto import cnnserve_pb2 as pb

CLASSIFIERS = ["logreg", "mlp", "lenet5"]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tensor(pixels: np.ndarray) -> pb.Image:
    data = (pixels.astype(np.float32) / 255.0).reshape(1, 28, 28)
    return pb.Image(
        tensor=pb.Tensor(shape=[1, 28, 28], dtype=pb.DATA_TYPE_FLOAT32, data=data.tobytes())
    )


def reference(
    repository: Path, model: str, pixels: np.ndarray, outputs: list[str]
) -> list[np.ndarray]:
    """ONNX Runtime called directly on the newest version: what the service must return."""
    folder = max((repository / model).iterdir(), key=lambda p: int(p.name))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = pixels.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    return session.run(outputs, {"image": batch})


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value.code(), raised.value.details()


# Model information -------------------------------------------------------------------------


def test_list_models_reports_every_model_ready_on_the_cpu(server, tiny_repository) -> None:
    models = server.stub.ListModels(pb.ListModelsRequest()).models
    expected = sorted(p.name for p in tiny_repository.iterdir() if not p.name.startswith("."))
    assert [m.name for m in models] == expected
    for model in models:
        assert model.state == pb.MODEL_STATE_READY, model.name
        assert model.execution_provider == "CPUExecutionProvider"
        assert model.max_batch_size > 0
        assert model.versions[-1].state == pb.MODEL_STATE_READY


def test_get_model_describes_inputs_features_and_figures(server, tiny_repository) -> None:
    info = server.stub.GetModel(pb.GetModelRequest(model="lenet5"))
    config = json.loads((tiny_repository / "lenet5" / "1" / "model.json").read_text())
    assert info.kind == "classifier" and len(info.labels) == 10 and info.labels[0] == "T-shirt/top"
    assert list(info.input.shape) == [1, 28, 28]
    assert [f.name for f in info.features] == [f["name"] for f in config["features"]]
    assert [list(f.shape) for f in info.features] == [f["shape"] for f in config["features"]]
    assert info.params == config["params"] and info.mflops == pytest.approx(config["mflops"])
    assert info.accuracy == pytest.approx(config["accuracy"]["onnxruntime"])
    kirsch = server.stub.GetModel(pb.GetModelRequest(model="kirsch"))
    assert kirsch.kind == "feature_extractor" and not kirsch.HasField("accuracy")


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [("nope", "", "model 'nope' not found; available: "), ("lenet5", "99", "has no version '99'")],
)
def test_get_model_unknown_is_not_found(server, model, version, expected) -> None:
    code, details = code_of(server.stub.GetModel, pb.GetModelRequest(model=model, version=version))
    assert code == grpc.StatusCode.NOT_FOUND and expected in details


# Classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_classify_matches_onnx_runtime_for_every_input_form(
    server, fmnist, tiny_repository, model
) -> None:
    pixels = fmnist.test_images[:6]
    (want,) = reference(tiny_repository, model, pixels, ["probabilities"])
    forms = {
        "encoded": [pb.Image(encoded=png(p)) for p in pixels],
        "pixels": [
            pb.Image(pixels=pb.RawPixels(height=28, width=28, data=p.tobytes())) for p in pixels
        ],
        "tensor": [tensor(p) for p in pixels],
    }
    for form, images in forms.items():
        reply = server.stub.Classify(pb.ClassifyRequest(model=model, images=images, top_k=3))
        assert reply.model == model and reply.version == "1"
        got = np.array([list(r.probabilities) for r in reply.results])
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=form)
        for result, row in zip(reply.results, want, strict=True):
            assert [s.index for s in result.top_k] == list(np.argsort(-row, kind="stable")[:3])
            assert all(result.top_k[0].probability >= s.probability for s in result.top_k)
            assert result.top_k[0].label == pb.ClassScore().label or result.top_k[0].label
            assert not result.features


def test_classify_returns_requested_feature_maps(server, fmnist, tiny_repository) -> None:
    pixels = fmnist.test_images[:3]
    want_c1, want_s4 = reference(tiny_repository, "lenet5", pixels, ["features.c1", "features.s4"])
    request = pb.ClassifyRequest(
        model="lenet5",
        images=[pb.Image(encoded=png(p)) for p in pixels],
        features=["c1", "features.s4"],
    )
    reply = server.stub.Classify(request)
    for i, result in enumerate(reply.results):
        names = [f.name for f in result.features]
        assert names == ["features.c1", "features.s4"]
        c1 = result.features[0]
        assert list(c1.shape) == list(want_c1.shape[1:]) and c1.dtype == pb.DATA_TYPE_FLOAT32
        got = np.frombuffer(c1.data, "<f4").reshape(c1.shape)
        np.testing.assert_allclose(got, want_c1[i], atol=1e-6)
        s4 = np.frombuffer(result.features[1].data, "<f4").reshape(result.features[1].shape)
        np.testing.assert_allclose(s4, want_s4[i], atol=1e-6)
    half = server.stub.Classify(
        pb.ClassifyRequest(
            model="lenet5",
            images=request.images[:1],
            features=["c1"],
            feature_dtype=pb.DATA_TYPE_FLOAT16,
        )
    )
    feature = half.results[0].features[0]
    assert feature.dtype == pb.DATA_TYPE_FLOAT16
    got16 = np.frombuffer(feature.data, "<f2").reshape(feature.shape).astype(np.float32)
    np.testing.assert_allclose(got16, want_c1[0], rtol=2e-3, atol=2e-3)


def test_feature_maps_for_kirsch_and_for_a_classifier(server, fmnist, tiny_repository) -> None:
    pixels = fmnist.test_images[:2]
    want_edges, want_magnitude = reference(
        tiny_repository, "kirsch", pixels, ["features.edges", "features.magnitude"]
    )
    reply = server.stub.FeatureMaps(
        pb.FeatureMapsRequest(model="kirsch", images=[pb.Image(encoded=png(p)) for p in pixels])
    )
    for i, result in enumerate(reply.results):
        edges, magnitude = result.features
        assert edges.name == "features.edges" and list(edges.shape) == [8, 28, 28]
        np.testing.assert_allclose(
            np.frombuffer(edges.data, "<f4").reshape(8, 28, 28), want_edges[i], atol=1e-5
        )
        got_m = np.frombuffer(magnitude.data, "<f4").reshape(1, 28, 28)
        np.testing.assert_allclose(got_m, want_magnitude[i], atol=1e-5)
    mlp = server.stub.FeatureMaps(
        pb.FeatureMapsRequest(model="mlp", images=[pb.Image(encoded=png(pixels[0]))])
    )
    assert [f.name for f in mlp.results[0].features] == ["features.hidden"]


def _bad(server, **fields) -> tuple[grpc.StatusCode, str]:
    request = pb.ClassifyRequest(model=fields.pop("model", "lenet5"), **fields)
    return code_of(server.stub.Classify, request)


def test_bad_requests_get_clear_statuses(server, fmnist) -> None:
    good = pb.Image(encoded=png(fmnist.test_images[0]))
    nan = np.full((1, 28, 28), np.nan, np.float32)
    cases = [
        (
            dict(model="missing", images=[good]),
            grpc.StatusCode.NOT_FOUND,
            "model 'missing' not found",
        ),
        (dict(images=[good], version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
        (dict(images=[]), grpc.StatusCode.INVALID_ARGUMENT, "images: at least one image"),
        (
            dict(images=[good, pb.Image(encoded=b"not an image")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[1].encoded",
        ),
        (
            dict(images=[good, good, pb.Image()]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[2]: empty image",
        ),
        (
            dict(images=[pb.Image(encoded=png(fmnist.test_images[0])[:40])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[0].encoded",
        ),
        (
            dict(images=[pb.Image(pixels=pb.RawPixels(height=28, width=28, data=b"\0" * 10))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[0].pixels",
        ),
        (  # 28 x 28 raw pixels decode as one batch, but one a byte short is still named
            dict(
                images=[
                    pb.Image(pixels=pb.RawPixels(height=28, width=28, data=b"\0" * n))
                    for n in (784, 784, 783)
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[2].pixels: data has 783 bytes",
        ),
        (
            dict(
                images=[
                    pb.Image(
                        tensor=pb.Tensor(
                            shape=[1, 28, 28], dtype=pb.DATA_TYPE_FLOAT32, data=nan.tobytes()
                        )
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[0].tensor",
        ),
        (
            dict(
                images=[
                    pb.Image(
                        tensor=pb.Tensor(
                            shape=[3, 28, 28], dtype=pb.DATA_TYPE_FLOAT32, data=b"\0" * 9408
                        )
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[0].tensor",
        ),
        (
            dict(images=[good], features=["nope"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "valid: features.c1",
        ),
        (dict(model="kirsch", images=[good]), grpc.StatusCode.INVALID_ARGUMENT, "call FeatureMaps"),
        (dict(images=[good] * 1025), grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 1024"),
    ]
    for fields, code, text in cases:
        got_code, details = _bad(server, **fields)
        assert got_code == code and text in details, (fields.get("model"), got_code, details)
    # And the server still answers a good request correctly.
    assert len(server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[good])).results) == 1


# Streaming --------------------------------------------------------------------------------


def test_stream_keeps_ids_and_order_and_reports_bad_items_inline(server, fmnist) -> None:
    items = []
    for i in range(60):
        image = (
            pb.Image(encoded=png(fmnist.test_images[i])) if i != 17 else pb.Image(encoded=b"junk")
        )
        items.append(
            pb.ClassifyStreamRequest(
                id=f"item-{i}", request=pb.ClassifyRequest(model="mlp", images=[image])
            )
        )
    replies = list(server.stub.ClassifyStream(iter(items)))
    assert [r.id for r in replies] == [f"item-{i}" for i in range(60)]
    assert replies[17].WhichOneof("result") == "error"
    assert replies[17].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images[0].encoded" in replies[17].error.message
    ok = [r for i, r in enumerate(replies) if i != 17]
    assert all(r.WhichOneof("result") == "response" and len(r.response.results) == 1 for r in ok)


# Health, reflection, metrics, batching ----------------------------------------------------


def test_health_overall_and_per_model(server) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ["", "cnnserve.v1.Inference", "lenet5", "kirsch"]:
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
    code, _ = code_of(stub.Check, health_pb2.HealthCheckRequest(service="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"cnnserve.v1.Inference", "grpc.health.v1.Health"} <= names


def test_metrics_count_the_requests_sent(server, fmnist) -> None:
    before = scrape(server.metrics_url)
    image = pb.Image(encoded=png(fmnist.test_images[0]))
    for _ in range(7):
        server.stub.Classify(pb.ClassifyRequest(model="logreg", images=[image, image]))
    _bad(server, model="logreg", images=[pb.Image(encoded=b"x")])
    after = scrape(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    labels = dict(model="logreg", version="1")
    assert delta("cnnserve_requests_total", method="Classify", code="OK", **labels) == 7
    assert (
        delta("cnnserve_requests_total", method="Classify", code="INVALID_ARGUMENT", **labels) == 1
    )
    assert delta("cnnserve_images_total", **labels) == 14
    assert delta("cnnserve_request_duration_seconds_count", method="Classify", **labels) == 8
    assert delta("nv_inference_request_success", **labels) == 7
    assert delta("nv_inference_count", **labels) == 14
    assert sample(after, "cnnserve_model_state", state="ready", **labels) == 1


def test_concurrent_requests_are_batched(server, fmnist) -> None:
    before = scrape(server.metrics_url)
    image = pb.Image(encoded=png(fmnist.test_images[1]))
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            barrier.wait(10)
            for _ in range(10):
                server.stub.Classify(pb.ClassifyRequest(model="resnet", images=[image]))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    after = scrape(server.metrics_url)
    labels = dict(model="resnet", version="1")
    batches = sample(after, "cnnserve_batch_size_count", **labels) - sample(
        before, "cnnserve_batch_size_count", **labels
    )
    images = sample(after, "cnnserve_batch_size_sum", **labels) - sample(
        before, "cnnserve_batch_size_sum", **labels
    )
    assert images == 160
    assert batches < images  # some batch held more than one image
    single = sample(after, "cnnserve_batch_size_bucket", le="1.0", **labels) - sample(
        before, "cnnserve_batch_size_bucket", le="1.0", **labels
    )
    assert single < batches
