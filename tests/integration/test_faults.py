"""Faults a real `cnnserve serve` process survives: SIGTERM under load, and kill -9.

SIGTERM: health turns NOT_SERVING at once, calls already accepted are all answered (the
server's own count of answered calls equals what the clients received), later calls are
refused with UNAVAILABLE, and the process exits 0 within its grace period. kill -9: a restart
on the same port is serving again, with the same answers.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.draining import SHUTTING_DOWN
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc
from tests.integration.test_cli import wait_serving
from tests.prometheus import free_port

CNNSERVE = [sys.executable, "-m", "service.cli"]
CLIENTS = 8
IMAGES_PER_CALL = 16
GRACE_SECONDS = 10
SERVING = health_pb2.HealthCheckResponse.SERVING


def start(repository: Path, port: int, log: Path) -> subprocess.Popen:
    command = [
        *CNNSERVE,
        "serve",
        "--model-repository",
        str(repository),
        "--models",
        "lenet5",
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        "0",
        "--grace-seconds",
        str(GRACE_SECONDS),
        "--log-json",
    ]
    # The log goes to a file: a pipe nobody reads during the run could fill and stall the server.
    with log.open("a") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=sink, text=True)


def request(fmnist) -> pb.ClassifyRequest:
    images = []
    for pixels in fmnist.test_images[:IMAGES_PER_CALL]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(pb.Image(encoded=buffer.getvalue()))
    return pb.ClassifyRequest(model="lenet5", images=images, top_k=1)


class Clients:
    """Threads calling Classify back to back until the server is gone; outcomes are counted."""

    def __init__(self, address: str, call: pb.ClassifyRequest) -> None:
        self.address = address
        self.call = call
        self.outcomes: Counter[str] = Counter()
        self.details: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while not self.done.is_set():
                try:
                    stub.Classify(self.call, timeout=30)
                    outcome, detail = "OK", ""
                except grpc.RpcError as error:
                    outcome, detail = error.code().name, error.details() or ""
                with self.lock:
                    self.outcomes[outcome] += 1
                    if detail:
                        self.details[f"{outcome}: {detail[:60]}"] += 1
                if outcome != "OK":
                    return  # refused: as the message says, a client goes to another replica

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(60)


def health_status(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def log_records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_sigterm_under_load_answers_every_accepted_call(
    tiny_repository: Path, tmp_path: Path, fmnist
) -> None:
    port, log = free_port(), tmp_path / "server.log"
    address = f"127.0.0.1:{port}"
    process = start(tiny_repository, port, log)
    try:
        wait_serving(address, process)
        with Clients(address, request(fmnist)) as clients:
            while clients.outcomes["OK"] < 50:
                time.sleep(0.05)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            first = health_status(address)
            exit_code = process.wait(GRACE_SECONDS + 20)
            exited = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    assert exit_code == 0 and exited < GRACE_SECONDS + 5
    # From the moment of the signal, health says so (or the port is already closed).
    assert first in ("NOT_SERVING", "UNAVAILABLE"), first
    # Clients saw answers, then one clean refusal each: nothing else (no CANCELLED, INTERNAL...).
    assert clients.outcomes["UNAVAILABLE"] == CLIENTS, (clients.outcomes, clients.details)
    assert set(clients.details) == {f"UNAVAILABLE: {SHUTTING_DOWN[:60]}"}, clients.details
    stopped = next(r["message"] for r in log_records(log) if r["message"].startswith("stopped:"))
    answered = dict(re.findall(r"([A-Z_]+) (\d+)", stopped.split("(", 1)[1]))
    # The server answered exactly the calls the clients got answers to, and left none behind.
    assert int(answered.get("OK", 0)) == clients.outcomes["OK"], (stopped, clients.outcomes)
    assert stopped.endswith(", 0 unanswered"), stopped


def test_kill_9_then_restart_serves_the_same_answers(
    tiny_repository: Path, tmp_path: Path, fmnist
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository / "lenet5", repository / "lenet5")
    port, log = free_port(), tmp_path / "server.log"
    address = f"127.0.0.1:{port}"
    call = request(fmnist)
    answers = []
    for attempt in range(2):
        process = start(repository, port, log)
        try:
            started = time.monotonic()
            wait_serving(address, process)
            ready = time.monotonic() - started
            with grpc.insecure_channel(address) as channel:
                reply = pb_grpc.InferenceStub(channel).Classify(call, timeout=30)
            answers.append([list(r.probabilities) for r in reply.results])
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        print(f"start {attempt + 1}: serving {ready:.2f} s after launch")
    assert answers[0] == answers[1]
