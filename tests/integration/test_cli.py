"""`cnnserve serve` as a real subprocess, driven by the CLI clients, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.prometheus import free_port

CNNSERVE = [sys.executable, "-m", "service.cli"]


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 60) -> None:
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read()}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become SERVING in time")


@pytest.fixture(scope="module")
def served(tiny_repository: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {**os.environ, "CNNSERVE_GRPC_PORT": str(port), "CNNSERVE_MODELS": "lenet5,kirsch"}
    process = subprocess.Popen(
        [
            *CNNSERVE,
            "serve",
            "--model-repository",
            str(tiny_repository),
            "--grpc-address",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--log-json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process)
        yield address, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CNNSERVE, *args], capture_output=True, text=True, timeout=60)


def test_classify_prints_top5_per_file(served, fmnist, tmp_path: Path) -> None:
    address, _ = served
    files = []
    for i in range(3):
        path = tmp_path / f"item{i}.png"
        Image.fromarray(fmnist.test_images[i]).save(path)
        files.append(str(path))
    result = cli("classify", *files, "--model", "lenet5", "--server", address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * 6
    assert lines[0] == files[0] and lines[6] == files[1]
    assert all(line.startswith("  ") and "%" in line for line in lines[1:6])


def test_classify_errors_are_one_line(served, tmp_path: Path) -> None:
    address, _ = served
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a picture")
    for args, text in [
        ((str(bad), "--model", "lenet5"), f"INVALID_ARGUMENT: {bad}: images[0].encoded"),
        ((str(tmp_path / "missing.png"), "--model", "lenet5"), "missing.png"),
        ((str(bad), "--model", "nope"), "NOT_FOUND: model 'nope' not found"),
    ]:
        result = cli("classify", *args, "--server", address)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert text in result.stderr and "Traceback" not in result.stderr


def test_models_lists_the_served_models(served) -> None:
    address, _ = served
    result = cli("models", "--server", address)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0][:4] == ["name", "version", "kind", "state"]
    assert {r[0] for r in rows[1:]} == {"lenet5", "kirsch"}
    assert all(r[3] == "ready" and r[4] == "CPUExecutionProvider" for r in rows[1:])


def test_unreachable_server_is_a_one_line_error() -> None:
    result = cli("models", "--server", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_help_documents_each_setting_with_its_default() -> None:
    result = cli("serve", "--help")
    text = " ".join(result.stdout.split())
    for flag, default in [
        ("--model-repository", "models"),
        ("--grpc-port", "8001"),
        ("--metrics-port", "8002"),
        ("--device", "auto"),
    ]:
        assert flag in text and f"default: {default}" in text


def test_bad_setting_is_refused_before_start(tiny_repository: Path) -> None:
    result = cli("serve", "--model-repository", str(tiny_repository), "--grpc-port", "70000")
    assert result.returncode == 2 and "grpc_port must be 0-65535" in result.stderr


def test_sigterm_stops_the_server_cleanly(served) -> None:
    # Runs last in this module: it ends the shared server.
    _, process = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    log = process.stderr.read()
    assert '"message": "shutting down' in log and '"message": "stopped: ' in log
