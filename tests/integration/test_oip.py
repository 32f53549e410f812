"""The Open Inference Protocol (KServe v2) with the stock Triton client against a real server.

tritonclient.grpc is used unmodified, over the wire, exactly as a user runs it. One detail is
particular to testing in one process: the client's generated modules and our server's both
define the `inference` package, and protobuf's default descriptor pool takes each full name
once ("duplicate symbol 'inference.ServerLiveRequest'", the known clash between tritonclient and
any server of the protocol, e.g. SeldonIO/MLServer#1730). Here the server is in-process, so the
client's modules are imported into a descriptor pool of their own (`_stock_client`). The README
example runs in a separate process, as a user would.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

import service
from service.proto import cnnserve_pb2 as cnn
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import start_server
from tests.integration.test_service import reference, sample, scrape

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIERS = ["logreg", "mlp", "lenet5"]


def _stock_client() -> tuple[ModuleType, ModuleType]:
    """tritonclient.grpc and .aio, their generated messages in a descriptor pool of their own."""
    pool = descriptor_pool.DescriptorPool()
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: pool  # read once, as each _pb2 module is imported
    try:
        import tritonclient.grpc as stock
        import tritonclient.grpc.aio as stock_aio
    finally:
        descriptor_pool.Default = default
    return stock, stock_aio


grpcclient, aioclient = _stock_client()


@pytest.fixture(scope="module")
def client(server):
    client = grpcclient.InferenceServerClient(server.address)
    yield client
    client.close()


def fp32_input(pixels: np.ndarray) -> object:
    """N x 1 x 28 x 28 in [0, 1], as the model was trained."""
    batch = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    tensor = grpcclient.InferInput("image", list(batch.shape), "FP32")
    return tensor.set_data_from_numpy(batch)


def failure(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value.status(), raised.value.message()


def native_probabilities(server, model: str, pixels: np.ndarray) -> np.ndarray:
    """Our own API's Classify on the same images: what the OIP answer must equal."""
    images = [
        cnn.Image(pixels=cnn.RawPixels(height=28, width=28, data=p.tobytes())) for p in pixels
    ]
    reply = server.stub.Classify(cnn.ClassifyRequest(model=model, images=images))
    return np.array([list(r.probabilities) for r in reply.results], np.float32)


# The proto ---------------------------------------------------------------------------------


def _shapes(*files) -> dict[str, object]:
    """Every message, enum and service: names, numbers, types, labels, oneofs."""
    found: dict[str, object] = {}

    def message(descriptor) -> None:
        found[descriptor.full_name] = {
            f.name: (
                f.number,
                f.type,
                f.is_repeated,
                (f.message_type or f.enum_type).full_name if f.message_type or f.enum_type else "",
                f.containing_oneof.name if f.containing_oneof else None,
            )
            for f in descriptor.fields
        }
        for nested in descriptor.nested_types:
            message(nested)
        for enum in descriptor.enum_types:
            found[enum.full_name] = {v.name: v.number for v in enum.values}

    for file in files:
        for descriptor in file.message_types_by_name.values():
            message(descriptor)
        for enum in file.enum_types_by_name.values():
            found[enum.full_name] = {v.name: v.number for v in enum.values}
        for svc in file.services_by_name.values():
            found[svc.full_name] = {
                m.name: (
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                )
                for m in svc.methods
            }
    return found


def test_our_proto_is_wire_compatible_with_the_stock_client() -> None:
    """Every declared message, field, enum value and RPC matches tritonclient's exactly."""
    ours = _shapes(oip.DESCRIPTOR)
    stock = _shapes(grpcclient.service_pb2.DESCRIPTOR, grpcclient.model_config_pb2.DESCRIPTOR)
    assert ours["inference.GRPCInferenceService"] == stock["inference.GRPCInferenceService"]
    for name, fields in ours.items():
        assert name in stock, name
        for field, shape in fields.items():  # type: ignore[attr-defined]
            assert stock[name].get(field) == shape, (name, field)  # type: ignore[attr-defined]
    # Everything of the service's own file is declared; of the model configuration, a subset.
    service_file = _shapes(grpcclient.service_pb2.DESCRIPTOR)
    assert all(ours[name] == shape for name, shape in service_file.items())


# Health, metadata, configuration -----------------------------------------------------------


def test_health_and_server_metadata(client, server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet5") and client.is_model_ready("kirsch", "1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("lenet5", "99")
    metadata = client.get_server_metadata()
    assert metadata.name == "cnnserve" and metadata.version == service.__version__
    assert set(metadata.extensions) == {
        "classification",
        "model_configuration",
        "model_repository",
        "schedule_policy",
        "statistics",
    }
    health = health_pb2_grpc.HealthStub(server.channel)
    check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    listed = list(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    )
    names = {s.name for s in listed[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "cnnserve.v1.Inference"} <= names


def test_model_metadata_has_the_batch_dimension(client, tiny_repository) -> None:
    config = json.loads((tiny_repository / "lenet5" / "1" / "model.json").read_text())
    metadata = client.get_model_metadata("lenet5")
    assert metadata.name == "lenet5" and list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    (image,) = metadata.inputs
    assert (image.name, image.datatype, list(image.shape)) == ("image", "FP32", [-1, 1, 28, 28])
    described = [*config["outputs"], *config["features"]]
    assert [o.name for o in metadata.outputs] == [o["name"] for o in described]
    assert [o.name for o in metadata.outputs][:3] == ["logits", "probabilities", "features.c1"]
    for output, spec in zip(metadata.outputs, described, strict=True):
        assert output.datatype == "FP32" and list(output.shape) == [-1, *spec["shape"]]
    kirsch = client.get_model_metadata("kirsch", as_json=True)
    assert [o["name"] for o in kirsch["outputs"]] == ["features.edges", "features.magnitude"]


def test_model_config_has_dims_without_the_batch_dimension(client, server) -> None:
    native = server.stub.GetModel(cnn.GetModelRequest(model="lenet5"))
    config = client.get_model_config("lenet5").config
    assert (config.name, config.platform, config.backend) == (
        "lenet5",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == native.max_batch_size > 0
    assert config.dynamic_batching.max_queue_delay_microseconds == round(
        native.max_queue_delay_ms * 1000
    )
    (image,) = config.input
    assert image.name == "image" and list(image.dims) == [1, 28, 28]
    assert image.data_type == grpcclient.model_config_pb2.TYPE_FP32
    dims = {o.name: list(o.dims) for o in config.output}
    assert dims["probabilities"] == [10] and dims["features.c1"] == [6, 28, 28]
    assert set(dims) == {"logits", "probabilities", *(f.name for f in native.features)}
    assert config.instance_group[0].kind == grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU
    status, message = failure(client.get_model_config, "nope")
    assert status == "StatusCode.NOT_FOUND" and "model 'nope' not found" in message


def test_repository_index_lists_every_model_version(client, tiny_repository) -> None:
    index = client.get_model_repository_index()
    expected = sorted(p.name for p in tiny_repository.iterdir() if not p.name.startswith("."))
    assert [m.name for m in index.models] == expected
    assert all(m.version == "1" and m.state == "READY" for m in index.models)


# Inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_fp32_and_uint8_give_our_own_apis_probabilities(client, server, fmnist, model) -> None:
    pixels = fmnist.test_images[:8]
    want = native_probabilities(server, model, pixels)
    requested = [grpcclient.InferRequestedOutput("probabilities")]
    result = client.infer(model, [fp32_input(pixels)], outputs=requested, request_id="r-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "r-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-6)
    for shape in ([8, 28, 28], [8, 1, 28, 28]):
        tensor = grpcclient.InferInput("image", shape, "UINT8")
        tensor.set_data_from_numpy(pixels.reshape(shape))
        got = client.infer(model, [tensor], outputs=requested).as_numpy("probabilities")
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(shape))


def test_no_outputs_asked_means_the_models_defaults(client, fmnist) -> None:
    lenet = client.infer("lenet5", [fp32_input(fmnist.test_images[:2])]).get_response()
    assert [o.name for o in lenet.outputs] == ["logits", "probabilities"]
    assert len(lenet.raw_output_contents) == 2
    kirsch = client.infer("kirsch", [fp32_input(fmnist.test_images[:2])]).get_response()
    assert [(o.name, list(o.shape)) for o in kirsch.outputs] == [
        ("features.edges", [2, 8, 28, 28]),
        ("features.magnitude", [2, 1, 28, 28]),
    ]


def test_feature_outputs_equal_onnx_runtime(client, tiny_repository, fmnist) -> None:
    pixels = fmnist.test_images[10:13]
    names = ["features.s4", "probabilities", "features.c1"]
    want = reference(tiny_repository, "lenet5", pixels, names)
    outputs = [grpcclient.InferRequestedOutput(name) for name in names]
    result = client.infer("lenet5", [fp32_input(pixels)], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == names  # the order asked for
    for name, expected in zip(names, want, strict=True):
        got = result.as_numpy(name)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


def test_classification_extension(client, server, fmnist) -> None:
    pixels = fmnist.test_images[:4]
    labels = list(server.stub.GetModel(cnn.GetModelRequest(model="lenet5")).labels)
    probabilities = native_probabilities(server, "lenet5", pixels)
    outputs = [
        grpcclient.InferRequestedOutput("probabilities", class_count=3),
        grpcclient.InferRequestedOutput("features.c5", class_count=2),
        grpcclient.InferRequestedOutput("logits", class_count=50),  # capped at the 10 classes
    ]
    result = client.infer("lenet5", [fp32_input(pixels)], outputs=outputs)
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3) and result.get_output("probabilities").datatype == "BYTES"
    for row, entries in zip(probabilities, top, strict=True):
        parsed = [entry.decode().split(":") for entry in entries]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [labels[i] for i in indices]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], row[indices], atol=1e-6)
    features = result.as_numpy("features.c5")  # no labels: score:index
    assert features.shape == (4, 2) and re.fullmatch(rb"-?\d+\.\d{6}:\d+", features[0, 0])
    assert result.as_numpy("logits").shape == (4, 10)


def test_async_infer_under_concurrency_is_batched(client, server, fmnist) -> None:
    before = scrape(server.metrics_url)
    pixels = fmnist.test_images[20:22]
    want = native_probabilities(server, "resnet", pixels)
    done = threading.Semaphore(0)
    results: list[object] = []

    def callback(result, error) -> None:
        results.append(error or result.as_numpy("probabilities"))
        done.release()

    requested = [grpcclient.InferRequestedOutput("probabilities")]
    for i in range(48):
        client.async_infer(
            "resnet", [fp32_input(pixels)], callback, outputs=requested, priority=1 + i % 2
        )
    for _ in range(48):
        assert done.acquire(timeout=60)
    for got in results:
        assert isinstance(got, np.ndarray), got
        np.testing.assert_allclose(got, want, atol=1e-6)

    async def aio_clients() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(server.address) as stock:
            assert await stock.is_model_ready("resnet")
            replies = await asyncio.gather(
                *[stock.infer("resnet", [fp32_input(pixels)], outputs=requested) for _ in range(16)]
            )
        return [r.as_numpy("probabilities") for r in replies]

    for got in asyncio.run(aio_clients()):
        np.testing.assert_allclose(got, want, atol=1e-6)
    after = scrape(server.metrics_url)
    labels = dict(model="resnet", version="1")

    def delta(name: str, **extra: str) -> float:
        return sample(after, name, **labels, **extra) - sample(before, name, **labels, **extra)

    assert delta("cnnserve_requests_total", method="ModelInfer", code="OK") == 64
    assert delta("cnnserve_batch_size_sum") == 2 * (64 + 1)  # and one native Classify
    batches = delta("cnnserve_batch_size_count")
    assert batches < 65  # some batch held more than one request
    assert delta("cnnserve_batch_size_bucket", le="2.0") < batches


def test_stream_answers_in_order_and_reports_errors_inline(client, fmnist) -> None:
    replies: list[tuple[object, object]] = []
    client.start_stream(callback=lambda result, error: replies.append((result, error)))
    try:
        for i in range(12):
            name = "probabilities" if i != 5 else "no-such-output"
            client.async_stream_infer(
                "mlp",
                [fp32_input(fmnist.test_images[i : i + 1])],
                outputs=[grpcclient.InferRequestedOutput(name)],
                request_id=f"item-{i}",
            )
    finally:
        client.stop_stream()  # waits for every response
    assert len(replies) == 12
    for i, (result, error) in enumerate(replies):
        if i == 5:
            assert result is None and "unexpected inference output 'no-such-output'" in str(error)
            continue
        assert error is None
        assert result.get_response().id == f"item-{i}"
        assert result.as_numpy("probabilities").shape == (1, 10)


def test_statistics_count_what_was_sent_as_the_metrics_do(client, server, fmnist) -> None:
    def stats():
        (entry,) = client.get_inference_statistics("logreg").model_stats
        return entry

    before, scraped_before = stats(), scrape(server.metrics_url)
    for _ in range(5):
        client.infer("logreg", [fp32_input(fmnist.test_images[:3])])
    bad = grpcclient.InferInput("image", [1, 3, 28, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    failure(client.infer, "logreg", [bad])
    after, scraped_after = stats(), scrape(server.metrics_url)
    assert (after.name, after.version) == ("logreg", "1")
    assert after.inference_count - before.inference_count == 15
    assert after.execution_count - before.execution_count == 5  # sequential calls: a batch each
    success = after.inference_stats.success
    assert success.count - before.inference_stats.success.count == 5
    assert success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 5
    assert after.last_inference > 0 and after.last_inference >= before.last_inference
    labels = dict(model="logreg", version="1")
    for name, value in [
        ("nv_inference_request_success", success.count),
        ("nv_inference_request_failure", after.inference_stats.fail.count),
        ("nv_inference_count", after.inference_count),
        ("nv_inference_exec_count", after.execution_count),
    ]:
        assert sample(scraped_after, name, **labels) == value, name
    assert (
        sample(scraped_after, "nv_inference_count", **labels)
        - sample(scraped_before, "nv_inference_count", **labels)
        == 15
    )
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} >= {"logreg", "lenet5", "kirsch"}


def test_typed_contents_are_accepted_like_raw_bytes(server, fmnist) -> None:
    """Clients that fill `contents` instead of raw bytes (our stub: the stock one never does)."""
    stub = oip_grpc.GRPCInferenceServiceStub(server.channel)
    pixels = fmnist.test_images[:2]
    want = native_probabilities(server, "mlp", pixels)

    def infer(**tensor) -> oip.ModelInferResponse:
        request = oip.ModelInferRequest(
            model_name="mlp",
            inputs=[oip.ModelInferRequest.InferInputTensor(name="image", **tensor)],
            outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        )
        return stub.ModelInfer(request)

    fp32 = infer(
        datatype="FP32",
        shape=[2, 1, 28, 28],
        contents=oip.InferTensorContents(fp32_contents=(pixels / 255.0).ravel().tolist()),
    )
    uint8 = infer(
        datatype="UINT8",
        shape=[2, 28, 28],
        contents=oip.InferTensorContents(uint_contents=pixels.ravel().tolist()),
    )
    for reply in (fp32, uint8):
        got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 10)
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(grpc.RpcError) as raised:
        infer(
            datatype="UINT8",
            shape=[1, 28, 28],
            contents=oip.InferTensorContents(uint_contents=[256] * 784),
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'image': contents.uint_contents has values over 255" in raised.value.details()


def test_timeout_and_priority_parameters_are_honoured(client, fmnist) -> None:
    inputs = [fp32_input(fmnist.test_images[:1])]
    status, message = failure(client.infer, "mlp", inputs, timeout=1)  # one microsecond
    assert status == "StatusCode.DEADLINE_EXCEEDED" and "deadline passed" in message
    ok = client.infer("mlp", inputs, timeout=30_000_000, priority=1)
    assert ok.as_numpy("probabilities").shape == (1, 10)
    status, message = failure(client.infer, "mlp", inputs, timeout=-5)
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameters['timeout']" in message


def test_bad_requests_get_triton_statuses_and_clear_messages(client, fmnist) -> None:
    good = fp32_input(fmnist.test_images[:2])
    wide = grpcclient.InferInput("image", [1, 3, 28, 28], "FP32")
    wide.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    fp64 = grpcclient.InferInput("image", [1, 1, 28, 28], "FP64")
    fp64.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float64))
    renamed = grpcclient.InferInput("pixels", [1, 1, 28, 28], "FP32")
    renamed.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    nan = np.zeros((2, 1, 28, 28), np.float32)
    nan[1, 0, 3, 3] = np.nan
    with_nan = grpcclient.InferInput("image", [2, 1, 28, 28], "FP32").set_data_from_numpy(nan)
    scaled = grpcclient.InferInput("image", [1, 1, 28, 28], "FP32")
    scaled.set_data_from_numpy(np.full((1, 1, 28, 28), 255.0, np.float32))
    cases = [
        (dict(model_name="nope", inputs=[good]), "NOT_FOUND", "model 'nope' not found; available:"),
        (
            dict(model_name="lenet5", inputs=[good], model_version="7"),
            "NOT_FOUND",
            "model lenet5 has no version '7'",
        ),
        (
            dict(
                model_name="lenet5",
                inputs=[good],
                outputs=[grpcclient.InferRequestedOutput("features.nope")],
            ),
            "INVALID_ARGUMENT",
            "unexpected inference output 'features.nope' for model 'lenet5'; valid: logits, "
            "probabilities, features.c1",
        ),
        (
            dict(model_name="lenet5", inputs=[fp64]),
            "INVALID_ARGUMENT",
            "input 'image': datatype 'FP64' is not accepted: use FP32",
        ),
        (
            dict(model_name="lenet5", inputs=[wide]),
            "INVALID_ARGUMENT",
            "input 'image': shape [1, 3, 28, 28] is not accepted: use [N, 1, 28, 28] or "
            "[N, 28, 28]",
        ),
        (
            dict(model_name="lenet5", inputs=[renamed]),
            "INVALID_ARGUMENT",
            "unexpected inference input 'pixels' for model 'lenet5'; expected 'image'",
        ),
        (
            dict(model_name="lenet5", inputs=[with_nan]),
            "INVALID_ARGUMENT",
            "input 'image': image 1 contains NaN or infinity",
        ),
        (
            dict(model_name="lenet5", inputs=[scaled]),
            "INVALID_ARGUMENT",
            "input 'image': values must lie in [0, 1]",
        ),
        (
            dict(
                model_name="lenet5",
                inputs=[good],
                outputs=[grpcclient.InferRequestedOutput("logits", class_count=-2)],
            ),
            "INVALID_ARGUMENT",
            "parameter 'classification': must be >= 0",
        ),
    ]
    for kwargs, code, text in cases:
        status, message = failure(client.infer, **kwargs)
        assert status == f"StatusCode.{code}" and text in message, (kwargs, status, message)
    for call in (client.get_system_shared_memory_status, client.get_trace_settings):
        status, message = failure(call)
        assert status == "StatusCode.UNIMPLEMENTED" and "not supported by cnnserve" in message
    assert client.infer("lenet5", [good]).as_numpy("logits").shape == (2, 10)


# The model repository, on a server of its own ----------------------------------------------


def test_load_and_unload_through_the_repository(tiny_repository, tmp_path, fmnist) -> None:
    root = tmp_path / "models"
    for name in ("logreg", "mlp"):  # renamed, so their metric series are their own
        shutil.copytree(tiny_repository / name, root / f"oip-{name}")
    running = start_server(root)
    stock = grpcclient.InferenceServerClient(running.address)
    inputs = [fp32_input(fmnist.test_images[:1])]
    try:
        assert stock.is_model_ready("oip-mlp") and stock.is_server_ready()
        stock.unload_model("oip-mlp")
        assert not stock.is_model_ready("oip-mlp") and stock.is_model_ready("oip-logreg")
        assert stock.is_server_ready()  # a model unloaded on request is not missing
        index = {(m.name, m.version): m for m in stock.get_model_repository_index().models}
        assert (index["oip-mlp", "1"].state, index["oip-mlp", "1"].reason) == (
            "UNAVAILABLE",
            "unloaded",
        )
        assert [m["name"] for m in stock.get_model_repository_index(as_json=True)["models"]] == [
            "oip-logreg",
            "oip-mlp",
        ]
        status, message = failure(stock.infer, "oip-mlp", inputs)
        assert status == "StatusCode.UNAVAILABLE" and "is unloaded" in message
        stock.load_model("oip-mlp")
        assert stock.is_model_ready("oip-mlp")
        assert stock.infer("oip-mlp", inputs).get_response().model_version == "1"
        # A new version dropped into the repository is found by the next load.
        shutil.copytree(root / "oip-mlp" / "1", root / "oip-mlp" / "2")
        stock.load_model("oip-mlp")
        assert stock.infer("oip-mlp", inputs).get_response().model_version == "2"
        assert list(stock.get_model_metadata("oip-mlp").versions) == ["2"]
        states = {
            m.version: m.state
            for m in stock.get_model_repository_index().models
            if m.name == "oip-mlp"
        }
        assert states == {"1": "UNAVAILABLE", "2": "READY"}
        assert not stock.is_model_ready("oip-mlp", "1")
        # A version that fails to load leaves the one before serving.
        shutil.copytree(root / "oip-mlp" / "2", root / "oip-mlp" / "3")
        (root / "oip-mlp" / "3" / "model.onnx").write_bytes(b"not an onnx file")
        status, message = failure(stock.load_model, "oip-mlp")
        assert status == "StatusCode.UNAVAILABLE"
        assert "oip-mlp version 3 failed to load: ONNX Runtime could not load" in message
        assert stock.infer("oip-mlp", inputs).get_response().model_version == "2"
        assert stock.is_model_ready("oip-mlp") and stock.is_server_ready()
        (newest,) = [m for m in stock.get_model_repository_index().models if m.version == "3"]
        assert newest.state == "UNAVAILABLE" and "could not load" in newest.reason
        for call in (stock.load_model, stock.unload_model):
            status, message = failure(call, "nope")
            assert status == "StatusCode.INVALID_ARGUMENT"
            assert (
                "'nope' is not in the model repository; available: oip-logreg, oip-mlp" in message
            )
        status, message = failure(stock.load_model, "oip-mlp", config="{}")
        assert status == "StatusCode.UNIMPLEMENTED" and "config or file override" in message
    finally:
        stock.close()
        running.stop()


# The README --------------------------------------------------------------------------------


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Triton / KServe clients (Open Inference Protocol)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs_as_written(server, fmnist, tmp_path) -> None:
    """In a process of its own, as a user runs it; only the address differs from `make serve`."""
    code = readme_example()
    assert 'InferenceServerClient("localhost:8001")' in code
    (tmp_path / "samples").mkdir()
    Image.fromarray(fmnist.test_images[0]).save(tmp_path / "samples" / "00000-ankle-boot.png")
    script = tmp_path / "example.py"
    script.write_text(code.replace("localhost:8001", server.address))
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "(1, 6, 28, 28)" in run.stdout
    assert re.search(r"\d\.\d{6}:\d:", run.stdout), run.stdout
