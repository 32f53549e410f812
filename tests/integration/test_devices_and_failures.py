"""Execution providers are reported, never assumed; a broken model fails alone."""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from service.proto import cnnserve_pb2 as pb
from service.repository import BatchOverrides, ModelRepository
from service.runtime import (
    CUDA,
    LoadError,
    ModelRuntime,
    RuntimeOptions,
    padded_sizes,
    parse_device,
)
from tests.integration.conftest import start_server

HAS_CUDA = CUDA in ort.get_available_providers()


def _copy(tiny_repository: Path, tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "models"
    for name in names:
        shutil.copytree(tiny_repository / name, root / name)
    return root


def test_device_names_are_checked() -> None:
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device("auto") == ("auto", 0)
    for bad in ["gpu", "cuda:x", "cpu:0", ""]:
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            parse_device(bad)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour where CUDA is missing")
def test_asking_for_cuda_without_it_fails_loudly(tiny_repository: Path) -> None:
    path = tiny_repository / "lenet5" / "1" / "model.onnx"
    with pytest.raises(LoadError, match="no CUDAExecutionProvider"):
        ModelRuntime(path, RuntimeOptions(device="cuda"))
    assert ModelRuntime(path, RuntimeOptions(device="auto")).provider == "CPUExecutionProvider"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_provider_serves_and_is_reported(
    tiny_repository: Path, tmp_path: Path, fmnist
) -> None:
    running = start_server(_copy(tiny_repository, tmp_path, "lenet5", "resnet"), device="cuda")
    try:
        for info in running.stub.ListModels(pb.ListModelsRequest()).models:
            assert info.execution_provider == CUDA, info.name
        image = pb.Image(
            pixels=pb.RawPixels(height=28, width=28, data=fmnist.test_images[0].tobytes())
        )
        reply = running.stub.Classify(
            pb.ClassifyRequest(model="resnet", images=[image] * 8, features=["layer1"])
        )
        assert len(reply.results) == 8 and reply.results[0].features[0].name == "features.layer1"
    finally:
        running.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_gives_every_model_the_cpu_answers(tiny_repository: Path, fmnist) -> None:
    # Every output, feature maps included, of every member: a kernel the CUDA provider runs
    # differently (TF32 convolutions, other reduction orders) may differ by rounding, no more.
    images = (fmnist.test_images[:64, None] / 255.0).astype(np.float32)
    for name in sorted(p.name for p in tiny_repository.iterdir() if (p / "1").is_dir()):
        path = tiny_repository / name / "1" / "model.onnx"
        cpu = ModelRuntime(path, RuntimeOptions(device="cpu"))
        gpu = ModelRuntime(path, RuntimeOptions(device="cuda"))
        assert gpu.provider == CUDA, name
        gpu.warm_up(64)  # every padded size searched once, before any request
        assert gpu.padded_sizes == padded_sizes(64), name
        want, got = cpu.run(images[:50], cpu.output_names), gpu.run(images[:50], gpu.output_names)
        for output, expected in want.items():
            scale = max(1.0, float(np.abs(expected).max()))
            difference = float(np.abs(got[output] - expected).max())
            assert difference <= 1e-2 * scale, (name, output, difference, scale)
        # the batcher calls from many threads; every call goes through the session's own
        first = gpu.output_names[0]  # probabilities, or kirsch's edge maps
        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(gpu.run, images[i : i + 3], [first]) for i in range(0, 48, 3)]
            parts = [call.result() for call in calls]
        together = np.concatenate([part[first] for part in parts])
        # batches of 4 and of 64 run on different sessions, whose cuDNN algorithms (TF32
        # among them) round differently; a call mixed up between threads would be off by far
        # more than this
        scale = max(1.0, float(np.abs(got[first]).max()))
        np.testing.assert_allclose(
            together, got[first][:48], atol=1e-3 * scale, err_msg=f"{name}: threads"
        )
        gpu.close()


def test_a_corrupt_model_is_reported_failed_and_the_others_serve(
    tiny_repository: Path, tmp_path: Path, fmnist
) -> None:
    root = _copy(tiny_repository, tmp_path, "lenet5", "mlp")
    (root / "mlp" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    running = start_server(root)
    try:
        info = running.stub.GetModel(pb.GetModelRequest(model="mlp"))
        assert info.state == pb.MODEL_STATE_FAILED
        assert "could not load model.onnx" in info.state_reason
        image = pb.Image(
            pixels=pb.RawPixels(height=28, width=28, data=fmnist.test_images[0].tobytes())
        )
        with pytest.raises(grpc.RpcError) as raised:
            running.stub.Classify(pb.ClassifyRequest(model="mlp", images=[image]))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed" in raised.value.details()
        reply = running.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image]))
        assert len(reply.results) == 1
    finally:
        running.stop()


def test_batches_run_on_the_loop_use_a_one_thread_session_with_the_same_answers(
    tiny_repository: Path, fmnist
) -> None:
    """A multi-threaded CPU session gets a one-thread twin for the batches the event loop
    runs; both give the same outputs, and the twin exists only where it can help."""
    path = tiny_repository / "lenet5" / "1" / "model.onnx"
    options = RuntimeOptions(device="cpu", intra_op_threads=2)

    async def load() -> tuple[ModelRuntime, int]:
        with ThreadPoolExecutor(1) as executor:
            repository = ModelRepository(
                tiny_repository, options, BatchOverrides(inline_ms=1000.0), executor, ["lenet5"]
            )
            repository.scan()
            await repository.load_all()
            entry = repository.ready("lenet5")
            assert entry.runtime is not None and entry.batcher is not None
            inline = entry.batcher.policy.inline_images
            await repository.close()
            return entry.runtime, inline

    runtime, inline = asyncio.run(load())
    assert runtime.single is not None
    assert runtime.single.get_session_options().intra_op_num_threads == 1
    assert set(runtime.single_seconds) == set(runtime.batch_seconds) == {1, 8}
    # an inline budget of a second covers every batch, and all of them go to the twin
    assert inline > 0 and runtime.single_images == inline
    images = (fmnist.test_images[:8, None] / 255.0).astype(np.float32)
    names = runtime.output_names
    for size in (1, 8):
        single = runtime.single.run(names, {runtime.input_name: images[:size]})
        multi = runtime.session.run(names, {runtime.input_name: images[:size]})
        served = runtime.run(images[:size], names)
        for name, a, b in zip(names, single, multi, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(served[name], b, rtol=1e-4, atol=1e-5)
    runtime.use_single_for(0)  # what a model gets whose batches never run on the loop
    assert runtime.single is None and runtime.run(images[:1], names)
    for options in (
        RuntimeOptions(device="cpu", intra_op_threads=1),
        RuntimeOptions(device="cpu", intra_op_threads=2, small_batch_session=False),
    ):
        runtime = ModelRuntime(path, options)
        runtime.warm_up(64, loop_budget_s=1.0)  # a budget that every batch fits
        assert runtime.single is None and runtime.single_seconds == {}
