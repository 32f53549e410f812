"""bench.serving's `--device`: its options, the checks that stop a GPU run that would measure
the CPU (before any server starts), and what reaches each system. No load is run."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bench.serving import device, runner, workload
from bench.serving.naive_server import NaiveServer

NO_CUDA = device.CUDA not in ort.get_available_providers()


def test_defaults_are_the_cpu_run_and_its_files() -> None:
    args = runner.parse_args([])
    assert args.device == "cpu"
    assert args.out == Path("bench/results/serving.json")
    assert args.docs == Path("docs/BENCHMARKS.md")
    assert args.gpu_data == Path("bench/results/serving-cuda.json")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_run_writes_its_own_json_and_no_docs(name: str) -> None:
    args = runner.parse_args(["--device", name, "--quick", "--no-family"])
    assert args.device == name and args.quick and args.family is False
    assert args.out == Path("bench/results/serving-cuda.json") and args.docs is None
    assert runner.parse_args(["--device", name, "--out", "x.json"]).out == Path("x.json")


@pytest.mark.parametrize("bad", ["gpu", "auto", "cuda:x", "cpu:0", "CUDA", ""])
def test_unknown_devices_are_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        runner.parse_args(["--device", bad])
    assert stopped.value.code == 2
    assert "must be cpu, cuda or cuda:N" in capsys.readouterr().err


def test_a_gpu_run_refuses_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        runner.parse_args(["--device", "cuda", "--docs", "x.md"])
    assert stopped.value.code == 2
    assert "python -m bench.serving.report" in capsys.readouterr().err


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has the CUDA provider")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_the_provider_stops_before_anything_starts(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def started(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("exported models before the device was checked")

    monkeypatch.setattr(workload, "export", started)
    out = tmp_path / "serving-cuda.json"
    assert runner.main(["--device", name, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--device {name}:" in err and "has no CUDAExecutionProvider" in err
    assert not out.exists()


def tiny_model(path: Path) -> Path:
    """images (N x 1 x 28 x 28) to probabilities: a softmax over the first ten pixels."""
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"]),
    ]
    ints = [
        helper.make_tensor(name, TensorProto.INT64, [1], [value])
        for name, value in (("starts", 0), ("ends", 10), ("axes", 1))
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=ints,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_the_probe_runs_a_batch_and_reads_the_provider_back(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model.onnx")
    assert device.probe("cpu", model) == device.CPU
    if NO_CUDA:
        with pytest.raises(device.DeviceError, match="--device cuda: .*could not start"):
            device.probe("cuda", model)


def test_a_server_not_on_the_device_stops_the_run() -> None:
    device.check_served("cpu", {"lenet5": device.CPU, "resnet": device.CPU})
    device.check_served("cuda:1", {"lenet5": device.CUDA})
    with pytest.raises(device.DeviceError, match="resnet: CPUExecutionProvider"):
        device.check_served("cuda", {"lenet5": device.CUDA, "resnet": device.CPU})
    with pytest.raises(device.DeviceError, match="no models"):
        device.check_served("cuda", {})


def fake_nvidia_smi(folder: Path, lines: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_the_gpu_name_comes_from_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert device.gpu("cuda") is None  # no nvidia-smi
    fake_nvidia_smi(tmp_path, "NVIDIA H100 80GB HBM3, 580.159.04\\nNVIDIA A10, 550.1\\n")
    assert device.gpu("cuda") == {"name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04"}
    assert device.gpu("cuda:1") == {"name": "NVIDIA A10", "driver": "550.1"}
    assert device.gpu("cuda:2") is None
    assert os.environ["PATH"] == str(tmp_path)


def test_the_device_reaches_every_system_that_runs_inference(tmp_path: Path) -> None:
    resnet = {"path": "/m/resnet.onnx", "features": [["features.layer1", [16, 28, 28]]]}
    models = {"lenet5": {"path": "/m/lenet5.onnx"}, "resnet": resnet}
    works = workload.workloads((1, 32), quick=True)
    ours = runner.server_for("cnnserve", False, models, tmp_path, tmp_path, works, "cuda:1")
    assert ours.command()[-3:] == ["--no-allow-spinning", "--device", "cuda:1"]
    naive = runner.server_for("naive", False, models, tmp_path, tmp_path, works, "cuda")
    assert isinstance(naive, NaiveServer)
    assert naive.command()[-4:] == [
        "--device",
        "cuda",
        "lenet5=/m/lenet5.onnx",
        "resnet=/m/resnet.onnx",
    ]
    cpu = runner.server_for("naive", False, models, tmp_path, tmp_path, works)
    assert "--device" not in cpu.command()  # the CPU run's command, as it always was
    floor = runner.server_for("floor", False, models, tmp_path, tmp_path, works, "cuda")
    assert "--device" not in floor.command()  # the floor runs no inference
    assert floor.command()[-1] == "--feature=features.layer1=16x28x28"  # the paired workload's


def test_a_gpu_run_skips_triton_and_says_why(tmp_path: Path) -> None:
    args = argparse.Namespace(device="cuda", model_repository=tmp_path)
    settings = {"systems": ["triton"], "allow_spinning": [False], "repeats": 1}
    skipped: dict[str, str] = {}
    measured, servers = runner.measure_servers(args, settings, {}, [], None, tmp_path, skipped)
    assert (measured, servers) == ([], {})
    assert skipped == {"triton": device.TRITON_CPU_ONLY}
    assert "CPUExecutionProvider" in skipped["triton"]


def test_the_probe_runs_in_a_fresh_process_and_says_why_it_failed(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model.onnx")
    assert device.probe_all("cpu", {"tiny": model, "again": model}) == {
        "tiny": device.CPU,
        "again": device.CPU,
    }
    if NO_CUDA:
        with pytest.raises(device.DeviceError, match="^--device cuda:2: this onnxruntime"):
            device.probe_all("cuda:2", {"tiny": model})
