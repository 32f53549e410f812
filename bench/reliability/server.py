"""A real `cnnserve serve` subprocess on loopback, and what the runner samples of it.

The server runs as the user would run it (`python -m service.cli serve`), on free loopback
ports, logging JSON to a file (a pipe nobody reads could fill and stall it). A `Sampler` thread
reads its resident memory and CPU time once a second (psutil where installed, /proc otherwise)
and, when asked, the queue depth from the metrics endpoint, so memory growth and the queue
bound are measured from outside, as an operator would see them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
QUEUE_DEPTH = re.compile(r'^cnnserve_queue_depth\{[^}]*model="([^"]+)"[^}]*\}\s+(\S+)$', re.M)
SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)$", re.M)
CODE = re.compile(r'code="([^"]+)"')
METHOD = re.compile(r'method="([^"]+)"')
HANDLER = "cnnserve_request_duration_seconds"
# Histograms whose mean per phase says where a call's time went inside the server.
INSIDE = {
    "handler_ms": "cnnserve_request_duration_seconds",
    "queue_wait_ms": "cnnserve_queue_duration_seconds",
    "inference_ms": "cnnserve_inference_duration_seconds",
}


def free_port() -> int:
    """A loopback port nothing listens on now (another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resident_and_cpu(pid: int) -> tuple[int, float]:
    """Resident bytes and CPU seconds (user + system) of a live process."""
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return rss_kb * 1024, (int(fields[11]) + int(fields[12])) / ticks
    process = psutil.Process(pid)
    times = process.cpu_times()
    return int(process.memory_info().rss), float(times.user + times.system)


@dataclass
class Server:
    """One `cnnserve serve` process; `start()` returns once health says SERVING."""

    repository: Path
    models: tuple[str, ...]
    log: Path
    extra: tuple[str, ...] = ()
    # Run from another source tree (bench.serving.compare's before/after): its folder and an
    # environment whose PYTHONPATH puts its packages first. None: this process's own.
    cwd: Path | None = None
    env: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model-repository",
            str(self.repository),
            "--models",
            ",".join(self.models),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(self.port),
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--log-json",
            *self.extra,
        ]

    def launch(self) -> float:
        """Start the process without waiting; returns the monotonic time of the launch."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as sink:
            launched = time.monotonic()
            self.process = subprocess.Popen(
                self.command(), stdout=sink, stderr=sink, cwd=self.cwd, env=self.env
            )
        return launched

    def start(self, timeout: float = 120) -> float:
        """Launch and wait for SERVING; returns the seconds that took."""
        launched = self.launch()
        wait_serving(self.address, self, timeout)
        return time.monotonic() - launched

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.process is not None
        self.process.wait(30)

    def stop(self, grace: float = 30) -> int | None:
        """SIGTERM, as an orchestrator sends; the exit code, or None if it had to be killed."""
        if not self.alive():
            return self.process.returncode if self.process else None
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            return None

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode()

    def totals(self) -> dict[str, float]:
        """Every series summed over its labels, and `cnnserve_requests_total` by status too."""
        totals: dict[str, float] = {}
        for name, labels, value in SERIES.findall(self.scrape()):
            totals[name] = totals.get(name, 0.0) + float(value)
            code = CODE.search(labels or "")
            if name == "cnnserve_requests_total" and code:
                key = f"answered:{code.group(1)}"
                totals[key] = totals.get(key, 0.0) + float(value)
            method = METHOD.search(labels or "")
            if name in (f"{HANDLER}_sum", f"{HANDLER}_count") and method:
                key = f"{name.rsplit('_', 1)[1]}:{method.group(1)}"
                totals[key] = totals.get(key, 0.0) + float(value)
        return totals

    def logged_errors(self) -> list[str]:
        """Messages the server logged at error level or above (tracebacks included)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                if "Traceback" in line:
                    found.append(line[:200])
                continue
            record = json.loads(line)
            if record.get("level") in ("error", "critical"):
                found.append(str(record.get("message", ""))[:200])
        return found


def inside(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server saw between two `totals()`: answers by status and mean times inside."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    seen: dict[str, Any] = {
        "answered": {
            k.split(":", 1)[1]: int(v)
            for k, v in sorted(delta.items())
            if k.startswith("answered:") and v
        }
    }
    for key, name in INSIDE.items():
        count = delta.get(f"{name}_count", 0.0)
        seen[key] = round(1000 * delta[f"{name}_sum"] / count, 2) if count else None
    seen["handler_ms_by_method"] = {
        k.split(":", 1)[1]: round(1000 * delta[f"sum:{k.split(':', 1)[1]}"] / v, 2)
        for k, v in sorted(delta.items())
        if k.startswith("count:") and v
    }
    batches = delta.get("cnnserve_batch_size_count", 0.0)
    seen["batch_images"] = round(delta["cnnserve_batch_size_sum"] / batches, 1) if batches else None
    return seen


def wait_serving(address: str, server: Server, timeout: float, poll: float = 0.05) -> None:
    """Poll grpc health until SERVING; fail at once if the process exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not server.alive():
                tail = server.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"cnnserve serve exited early; its log ends:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(poll)
    raise RuntimeError(f"cnnserve serve was not SERVING within {timeout:g} s")


@dataclass
class Sample:
    at: float  # monotonic seconds
    rss_bytes: int
    cpu_seconds: float
    queue_depth: int | None = None  # the largest cnnserve_queue_depth over models, if scraped


class Sampler(threading.Thread):
    """Samples a server every `interval` seconds until stopped; queue depth too with `queue`."""

    def __init__(self, server: Server, interval: float = 1.0, queue: bool = False) -> None:
        super().__init__(daemon=True, name="sampler")
        self.server, self.interval, self.queue = server, interval, queue
        self.samples: list[Sample] = []
        self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                rss, cpu = resident_and_cpu(self.server.pid)
                depth = None
                if self.queue:
                    depths = [float(v) for _, v in QUEUE_DEPTH.findall(self.server.scrape())]
                    depth = int(max(depths, default=0))
                self.samples.append(Sample(time.monotonic(), rss, cpu, depth))
            except (OSError, AttributeError, ValueError):
                self.errors += 1  # the process went away, or one scrape failed
            self._done.wait(self.interval)

    def stop(self) -> list[Sample]:
        self._done.set()
        self.join(10)
        return self.samples
