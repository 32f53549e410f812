"""Server processes the suite starts, and what they cost, counted over the whole process tree.

Triton is several processes (PyTriton's Python process running the callable, `tritonserver`,
one Python-backend stub per model and the stubs' helpers), so a server's CPU time and resident
memory are summed over the process it started and every descendant, read from /proc. Summed
RSS counts shared pages once per process, so it overstates a multi-process server a little;
the report says so. `ServerProcess` is a server on loopback that speaks the Open Inference
Protocol: ready when `ServerReady` and every model's `ModelReady` say so.

A one-process server's CPU is also split by thread (`thread_cpu`): a grpc.aio server runs every
call's Python on its main thread, the event loop, under the GIL, so how busy that one thread
is tells whether serving code or the cores decide its throughput.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import grpc

from bench.reliability.server import free_port, resident_and_cpu
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc


class Usage(NamedTuple):
    rss_bytes: int
    cpu_seconds: float
    processes: int


class ThreadCpu(NamedTuple):
    """CPU seconds of one process by thread: `main` (a grpc.aio server's event loop), gRPC
    core's own threads, and the rest (inference, ONNX Runtime's pool, decoding, metrics)."""

    main: float
    grpc: float
    other: float


# gRPC core names its threads; Python's and ONNX Runtime's keep the process's name
GRPC_THREAD_NAMES = ("event_engine", "grpc_")


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every live descendant of `pid` (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def started_at(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, its identity."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def tree_usage(pid: int) -> Usage:
    """Resident bytes and CPU seconds of `pid` and its descendants, summed."""
    rss, cpu, count = 0, 0.0, 0
    for each in [pid, *children(pid)]:
        try:
            r, c = resident_and_cpu(each)
        except (OSError, AttributeError, ValueError):  # gone, or a zombie with no VmRSS
            continue
        rss, cpu, count = rss + r, cpu + c, count + 1
    return Usage(rss, cpu, count)


def _ticks_used(stat: str) -> int:
    """utime + stime of a /proc stat line, in clock ticks."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def thread_cpu(pid: int, proc: Path = Path("/proc")) -> ThreadCpu | None:
    """`pid`'s CPU seconds split by thread; None when it has children (Triton: the work is in
    other processes) or is gone. `other` is the process's total less the named threads, so a
    thread that ended in between still counts."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        if children(pid, proc):
            return None
        total = _ticks_used((proc / str(pid) / "stat").read_text())
        main, grpc_ticks = 0, 0
        for task in (proc / str(pid) / "task").iterdir():
            try:
                used = _ticks_used((task / "stat").read_text())
                label = (task / "comm").read_text().strip()
            except OSError:  # the thread ended while we read
                continue
            if task.name == str(pid):
                main = used
            elif label.startswith(GRPC_THREAD_NAMES):
                grpc_ticks += used
    except OSError:
        return None
    other = max(total - main - grpc_ticks, 0)
    return ThreadCpu(main / ticks, grpc_ticks / ticks, other / ticks)


def wait_ready(address: str, models: list[str], alive: object, log: Path, timeout: float) -> None:
    """Poll `ServerReady` and `ModelReady` until all say ready; fail at once if it exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if not alive():  # type: ignore[operator]
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited before it was ready; its log ends:\n{tail}")
            try:
                if stub.ServerReady(oip.ServerReadyRequest(), timeout=1).ready and all(
                    stub.ModelReady(oip.ModelReadyRequest(name=m), timeout=1).ready for m in models
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"the server was not ready within {timeout:g} s")


@dataclass
class ServerProcess:
    """A server subprocess on a free loopback port; subclasses say how to launch it."""

    log: Path
    models: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    env: dict[str, str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 180) -> float:
        """Launch, wait until ready; the seconds from launch to ready."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as sink:
            launched = time.monotonic()
            self.process = subprocess.Popen(
                self.command(), stdout=sink, stderr=sink, env=self.env, start_new_session=True
            )
        try:
            wait_ready(self.address, self.models, self.alive, self.log, timeout)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - launched

    def stop(self, grace: float = 60) -> int | None:
        """SIGTERM, then SIGKILL for whatever of its tree is left; the exit code if it exited."""
        if self.process is None:
            return None
        tree = {pid: started_at(pid) for pid in children(self.pid)}
        code: int | None = None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        else:
            code = self.process.returncode
        for pid, started in tree.items():  # descendants it failed to end: still the same ones?
            if started is not None and started_at(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return code


BARE_MESSAGE_BYTES = 256 * 1024 * 1024
BARE_OPTIONS = [
    ("grpc.max_receive_message_length", BARE_MESSAGE_BYTES),
    ("grpc.max_send_message_length", BARE_MESSAGE_BYTES),
]


async def serve_until_signalled(port: int, add: Callable[[grpc.aio.Server], None]) -> None:
    """A plain grpc.aio server on loopback (the baselines' servers): `add` registers its
    handlers; it runs until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=BARE_OPTIONS)
    add(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)
