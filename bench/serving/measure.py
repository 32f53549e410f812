"""One point (a system, a workload, a concurrency) measured once, and repeats summarised.

The server's CPU time and resident memory are read over its whole process tree just before
and just after the load process runs, so the CPU seconds are the server's alone; the client's
come back from the load process. Latency percentiles are over answered calls only; calls that
failed are counted by status beside them. Repeats are summarised by their median, with the
spread ((max - min) / median) of throughput, because runs on a busy machine differ.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.reliability.server import inside as server_inside
from bench.reliability.stats import latency_ms, status_counts
from bench.serving import load as load_process
from bench.serving.processes import ThreadCpu, thread_cpu, tree_usage

MiB = 2**20
SUMMED = ("images_per_s", "p50", "p90", "p99", "server_cpu_s_per_1000")
SUMMED += ("client_cpu_s_per_1000", "images_per_server_cpu_s", "rss_mib", "calls_per_s")
SUMMED += ("p50_without", "p50_with", "paired_overhead_ms")
THREADS = ("main_busy_pct", "main_ms_per_call", "grpc_ms_per_call", "other_ms_per_call")
SUMMED += THREADS
INSIDE = ("handler_ms", "queue_wait_ms", "inference_ms", "batch_images")


def once(
    pid: int,
    load: load_process.Load,
    workdir: Path,
    totals: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Drive the server at `pid` with `load` once; the figures of that run.

    `totals` reads cnnserve's own metrics: with it, what the server saw inside (images per
    batch, time in the batch queue, in inference, in the handler) comes back too.
    """
    seen_before = totals() if totals else None
    before, threads_before = tree_usage(pid), thread_cpu(pid)
    records = load_process.run(load, workdir)
    after, threads_after = tree_usage(pid), thread_cpu(pid)
    inside = server_inside(seen_before, totals()) if totals and seen_before else None
    ok = records.code == 0
    seconds = max(records.ended - records.began, 1e-9)
    images = int(ok.sum()) * load.images
    server_cpu = after.cpu_seconds - before.cpu_seconds
    per_1000 = 1000 / images if images else None
    return {
        "seconds": round(seconds, 2),
        "calls": len(records.code),
        "errors": int((~ok).sum()),
        "status": status_counts(records.code),
        "calls_per_s": round(int(ok.sum()) / seconds, 1),
        "images_per_s": round(images / seconds, 1),
        **latency_ms(records.latency[ok]),
        "server_cpu_s": round(server_cpu, 3),
        "client_cpu_s": round(records.client_cpu_seconds, 3),
        "server_cpu_s_per_1000": round(server_cpu * per_1000, 4) if per_1000 else None,
        "client_cpu_s_per_1000": (
            round(records.client_cpu_seconds * per_1000, 4) if per_1000 else None
        ),
        "images_per_server_cpu_s": round(images / server_cpu, 1) if server_cpu > 0 else None,
        "rss_mib": round(after.rss_bytes / MiB, 1),
        "processes": after.processes,
        "replies_checked": records.checked,
        "replies_wrong": records.wrong,
        **({"server_saw": inside} if inside else {}),
        **by_thread(threads_before, threads_after, seconds, int(ok.sum())),
        **(paired(records.latency, records.kind, ok) if load.kinds == 2 else {}),
    }


def by_thread(
    before: ThreadCpu | None, after: ThreadCpu | None, seconds: float, calls: int
) -> dict[str, float]:
    """How busy the main thread was over the run, and each kind of thread's CPU per answered
    call (nothing for a server of several processes)."""
    if before is None or after is None or not calls:
        return {}
    used = [a - b for a, b in zip(after, before, strict=True)]
    return {
        "main_busy_pct": round(100 * used[0] / seconds, 1),
        **{
            key: round(1000 * value / calls, 4)
            for key, value in zip(THREADS[1:], used, strict=True)
        },
    }


def paired(latency: np.ndarray, kind: np.ndarray, ok: np.ndarray) -> dict[str, float | None]:
    """A paired run's p50 of each kind of call (0: without the extra outputs, 1: with), and
    their difference: both kinds ran side by side, so the difference is the extras' cost."""
    medians = [
        float(np.median(latency[ok & (kind == k)])) * 1000 if (ok & (kind == k)).any() else None
        for k in (0, 1)
    ]
    without, with_ = medians
    if without is None or with_ is None:
        return {"p50_without": without, "p50_with": with_, "paired_overhead_ms": None}
    return {
        "p50_without": round(without, 4),
        "p50_with": round(with_, 4),
        "paired_overhead_ms": round(with_ - without, 4),
    }


def spread_pct(values: list[float]) -> float | None:
    """(max - min) / median, in percent: how far repeats of one point lie apart."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return round(100 * (max(values) - min(values)) / middle, 1) if middle else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over repeats, throughput's spread, errors summed."""
    out: dict[str, Any] = {"repeats": len(runs)}
    for key in SUMMED:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    throughput = [r["images_per_s"] for r in runs]
    out["images_per_s_min"] = min(throughput, default=None)
    out["images_per_s_max"] = max(throughput, default=None)
    out["spread_pct"] = spread_pct(throughput)
    out["calls"] = sum(r["calls"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    out["replies_wrong"] = sum(r.get("replies_wrong", 0) for r in runs)
    seen = [r["server_saw"] for r in runs if r.get("server_saw")]
    if seen:
        out["server_saw"] = {}
        for key in INSIDE:
            values = [s[key] for s in seen if s.get(key) is not None]
            out["server_saw"][key] = round(statistics.median(values), 3) if values else None
    return out
