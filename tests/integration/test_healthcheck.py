"""The container's health check script and command, run for real against real servers.

`deploy/healthcheck.py` is what Docker's HEALTHCHECK (and Compose's) runs: it is run here as a
subprocess, exactly as the image runs it, against an in-process server, a draining one and a
closed port. The image's ENTRYPOINT and CMD, read from the Dockerfile, are run directly with the
model repository swapped for the test one, and checked with the script's defaults, which take
the port from CNNSERVE_GRPC_PORT as they do inside the container.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import start_server
from tests.integration.test_cli import wait_serving
from tests.prometheus import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "healthcheck.py"


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the Dockerfile's runtime stage (the last stage), as exec form."""
    text = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)[-1])
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)[-1])
    program = Path(sys.executable).with_name(entrypoint[0])
    launcher = [str(program)] if program.exists() else [sys.executable, "-m", "service.cli"]
    return [*launcher, *entrypoint[1:], *cmd]


def test_healthcheck_follows_the_server_health(tiny_repository: Path) -> None:
    running = start_server(tiny_repository, models=("lenet5",))
    try:
        serving = healthcheck("--address", running.address)
        assert serving.returncode == 0, serving.stderr
        assert "SERVING" in serving.stdout
        assert healthcheck("--address", running.address, "--service", "lenet5").returncode == 0
        unknown = healthcheck("--address", running.address, "--service", "no-such-model")
        assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr
        # Shutdown starts: health turns NOT_SERVING before the port closes.
        running.call(running.server.health.enter_graceful_shutdown())
        draining = healthcheck("--address", running.address)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout
    finally:
        running.stop()


def test_healthcheck_fails_fast_on_a_closed_port() -> None:
    started = time.monotonic()
    result = healthcheck("--address", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert result.returncode == 2
    assert "UNAVAILABLE" in result.stderr
    assert time.monotonic() - started < 10


def test_the_image_command_serves_and_its_healthcheck_passes(tiny_repository: Path) -> None:
    command = [str(tiny_repository) if arg == "/models" else arg for arg in image_command()]
    assert str(tiny_repository) in command, "the CMD names the image's /models repository"
    port = free_port()
    env = {
        **os.environ,
        "CNNSERVE_GRPC_PORT": str(port),
        "CNNSERVE_GRPC_ADDRESS": "127.0.0.1",
        "CNNSERVE_METRICS_PORT": "0",
        "CNNSERVE_MODELS": "lenet5",
        "CNNSERVE_GRACE_SECONDS": "1",
    }
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        # No flags: the script finds the port in CNNSERVE_GRPC_PORT, as in the container.
        result = healthcheck(env={**os.environ, "CNNSERVE_GRPC_PORT": str(port)})
        assert result.returncode == 0, result.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        after = healthcheck(env={**os.environ, "CNNSERVE_GRPC_PORT": str(port)})
        assert after.returncode == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
