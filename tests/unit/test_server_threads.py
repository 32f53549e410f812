"""The suite's split of a server's CPU by thread, read from a /proc laid out by the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.serving import measure
from bench.serving.processes import ThreadCpu, thread_cpu

TICKS = os.sysconf("SC_CLK_TCK")


def stat(pid: int, ppid: int, ticks: int) -> str:
    """A /proc stat line: state, ppid, nine fields, then utime and stime (split 3:1)."""
    user, system = ticks * 3 // 4, ticks - ticks * 3 // 4
    return f"{pid} (py thon) S {ppid} " + "0 " * 9 + f"{user} {system} " + "0 " * 10


def process(proc: Path, pid: int, ppid: int, total: int, threads: dict[int, tuple[str, int]]):
    (proc / str(pid) / "task").mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(stat(pid, ppid, total))
    for tid, (comm, ticks) in threads.items():
        task = proc / str(pid) / "task" / str(tid)
        task.mkdir()
        (task / "stat").write_text(stat(tid, ppid, ticks))
        (task / "comm").write_text(comm + "\n")


def test_main_grpc_and_the_rest_including_threads_that_ended(tmp_path: Path) -> None:
    threads = {
        100: ("python", 4 * TICKS),  # the main thread: the event loop
        101: ("event_engine", TICKS),
        102: ("grpc_global_tim", TICKS // 2),
        103: ("python", 2 * TICKS),  # an inference thread: same name as the process
    }
    # 9 s in all: 0.5 s more than the live threads, used by a thread that has ended
    process(tmp_path, 100, 1, 9 * TICKS, threads)
    process(tmp_path, 300, 1, TICKS, {300: ("python", TICKS)})  # an unrelated process
    assert thread_cpu(100, tmp_path) == pytest.approx(ThreadCpu(4.0, 1.5, 3.5))


def test_a_server_of_several_processes_is_not_split(tmp_path: Path) -> None:
    process(tmp_path, 100, 1, TICKS, {100: ("python", TICKS)})
    process(tmp_path, 200, 100, TICKS, {200: ("tritonserver", TICKS)})
    assert thread_cpu(100, tmp_path) is None
    assert thread_cpu(999, tmp_path) is None  # gone


def test_per_call_figures_and_how_busy_the_main_thread_was() -> None:
    before, after = ThreadCpu(1.0, 0.5, 2.0), ThreadCpu(2.8, 0.7, 4.0)
    figures = measure.by_thread(before, after, seconds=2.0, calls=1000)
    assert figures == {
        "main_busy_pct": 90.0,
        "main_ms_per_call": 1.8,
        "grpc_ms_per_call": 0.2,
        "other_ms_per_call": 2.0,
    }
    assert measure.by_thread(None, after, 2.0, 1000) == {}
    assert measure.by_thread(before, after, 2.0, 0) == {}
