"""The device a serving run measures on: checked before anything is measured, and recorded.

`--device cpu` (the default) is what the CPU figures and the goals are about; `cuda` or
`cuda:N` runs every system that runs inference (raw ONNX Runtime, cnnserve, the naive server)
on ONNX Runtime's CUDA execution provider. ONNX Runtime falls back to the CPU quietly when
the CUDA provider cannot start, and loads cuDNN only at the first convolution, so a GPU run
first asks onnxruntime whether it has the provider at all (before any export or server), then
runs one batch of each model on a session made as cnnserve makes it and reads the provider
back, in a fresh process as the servers' sessions are (`python -m bench.serving.device`: the
runner's own imports, torch for the machine's description, could otherwise lend it CUDA
libraries the servers lack), and checks what each cnnserve server reports once it is up. A
GPU run that would measure the CPU stops with exit status 2 (`DeviceError`) instead. Triton
runs on the CPU only here (triton_app.py asks for CPUExecutionProvider), so a GPU run skips
it and says why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRITON_CPU_ONLY = (
    "not measured on a GPU: triton_app.py runs its ONNX Runtime sessions on "
    "CPUExecutionProvider, so its figures would not be the GPU's"
)


class DeviceError(Exception):
    """The device asked for is not what ONNX Runtime would run on: the run stops."""


def parse(text: str) -> str:
    """`--device`: cpu | cuda | cuda:N (no `auto`: a run says where it measures)."""
    kind, colon, index = text.partition(":")
    if (kind == "cpu" and not colon) or (kind == "cuda" and (not colon or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, not {text!r}")


def is_gpu(device: str) -> bool:
    return device != "cpu"


def expected_provider(device: str) -> str:
    return CUDA if is_gpu(device) else CPU


def check_available(device: str) -> None:
    """Fail at once, before anything starts, when onnxruntime has no CUDA provider at all."""
    if not is_gpu(device):
        return
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        raise DeviceError(
            f"--device {device}: this onnxruntime ({ort.__version__}, "
            f"{Path(ort.__file__).parent}) has no {CUDA} (available: {', '.join(available)}); "
            "install onnxruntime-gpu, or run with --device cpu"
        )


def probe(device: str, path: Path) -> str:
    """The provider one batch of the model really ran on, in a session made as cnnserve
    makes it; a DeviceError when that is not the device's."""
    from service.runtime import LoadError, ModelRuntime, RuntimeOptions

    try:
        runtime = ModelRuntime(path, RuntimeOptions(device=device, small_batch_session=False))
        shape = [1, *(d if isinstance(d, int) else 1 for d in runtime.input_shape())]
        runtime.run(np.zeros(shape, np.float32), runtime.output_names[:1])
    except Exception as error:  # LoadError, or the first run failing (cuDNN loads here)
        kind = "could not start" if isinstance(error, LoadError) else "could not run"
        raise DeviceError(f"--device {device}: {path} {kind}: {error}") from error
    if runtime.provider != expected_provider(device):
        raise DeviceError(f"--device {device}: {path} ran on {runtime.provider}")
    return runtime.provider


def probe_all(device: str, paths: dict[str, Path], timeout: float = 300) -> dict[str, str]:
    """`probe` for every model, in a fresh process: the provider each ran on."""
    command = [sys.executable, "-m", "bench.serving.device", device]
    command += [f"{name}={path}" for name, path in paths.items()]
    try:
        reply = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise DeviceError(f"--device {device}: the probe did not end in {timeout:g} s") from error
    if reply.returncode:
        tail = (reply.stderr.strip().splitlines() or ["no message"])[-1]
        raise DeviceError(tail.removeprefix("bench.serving.device: "))
    return json.loads(reply.stdout.strip().splitlines()[-1])


def gpu(device: str) -> dict[str, str] | None:
    """The name and driver of the GPU a run uses, from nvidia-smi (cuda:N: its N-th line);
    None without nvidia-smi or an answer."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    query = [binary, "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        reply = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in reply.stdout.splitlines() if line.strip()]
    index = int(device.partition(":")[2] or 0)
    if reply.returncode or index >= len(lines):
        return None
    name, _, driver = lines[index].rpartition(",")
    return {"name": name.strip(), "driver": driver.strip()}


def record(device: str, providers: dict[str, str]) -> dict[str, Any]:
    """What goes into the JSON: the device asked for, the provider each model's probe ran on,
    the onnxruntime really imported (a GPU build may sit beside a CPU one) and the GPU."""
    import onnxruntime as ort

    packages = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    provider = sorted(set(providers.values()))
    return {
        "device": device,
        "provider": provider[0] if len(provider) == 1 else ", ".join(provider),
        "providers": providers,
        "onnxruntime": ort.__version__,
        "onnxruntime_path": str(Path(ort.__file__).parent),
        "packages": packages,
        "available_providers": ort.get_available_providers(),
        "gpu": gpu(device) if is_gpu(device) else None,
    }


def served(address: str) -> dict[str, str]:
    """The provider each model of a running cnnserve reports (its state when not ready)."""
    from service.proto import cnnserve_pb2 as pb
    from service.proto import cnnserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return {
        m.name: m.execution_provider or pb.ModelState.Name(m.state) + " " + m.state_reason
        for m in reply.models
    }


def check_served(device: str, providers: dict[str, str]) -> None:
    """Every model of a server on the device's provider, or a DeviceError."""
    wrong = {m: p for m, p in providers.items() if p != expected_provider(device)}
    if wrong or not providers:
        shown = ", ".join(f"{m}: {p}" for m, p in wrong.items()) or "no models"
        raise DeviceError(f"--device {device}: cnnserve serve reports {shown}")


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.serving.device DEVICE NAME=MODEL.onnx ...`: each model's provider, as
    JSON on the last line; exit status 2 and the reason when one is not on the device."""
    parser = argparse.ArgumentParser(prog="python -m bench.serving.device")
    parser.add_argument("device", type=parse)
    parser.add_argument("models", nargs="+", help="NAME=PATH of an ONNX file")
    args = parser.parse_args(argv)
    try:
        check_available(args.device)
        found = {}
        for spec in args.models:
            name, _, path = spec.partition("=")
            found[name] = probe(args.device, Path(path))
    except DeviceError as error:
        print(f"bench.serving.device: {error}", file=sys.stderr)
        return 2
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
