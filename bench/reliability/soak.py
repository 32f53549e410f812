"""Soak: closed-loop mixed load for minutes; no errors, flat memory, latency steady over time.

Both APIs, classes and feature maps, single images and small batches, at a fixed concurrency.
Memory is judged from after a warm-up (allocators, caches and gRPC buffers fill first): the
server's resident memory at the end may be at most 5% over what it was then. The server's own
count of answered calls (its metrics) is compared with what the client received, so a call the
server thinks it answered but the client never saw shows up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.reliability import stats
from bench.reliability.load import Plan, run_load
from bench.reliability.server import Sampler, Server, inside
from bench.reliability.workload import SOAK_MODELS, Builder, soak_mix

MAX_GROWTH_PCT = 5.0
WARMUP_S = 60.0  # or WARMUP_SHARE of a shorter run
WARMUP_SHARE = 0.2
CALL_TIMEOUT_S = 30.0  # far above any healthy latency: a soak call should never meet it


def warmup_seconds(seconds: float) -> float:
    return min(WARMUP_S, WARMUP_SHARE * seconds)


def run(
    repository: Path,
    logs: Path,
    builder: Builder,
    seconds: float,
    concurrency: int,
    window_s: float,
) -> dict[str, Any]:
    calls = soak_mix(builder)
    server = Server(repository, SOAK_MODELS, logs / "soak-server.log")
    ready_s = server.start()
    sampler = Sampler(server, interval=1.0)
    sampler.start()
    try:
        before = server.totals()
        plan = Plan(server.address, calls, seconds, CALL_TIMEOUT_S, concurrency=concurrency)
        records = run_load(plan, logs)
        seen = inside(before, server.totals())
    finally:
        samples = sampler.stop()
        exit_code = server.stop()
    images = np.array([c.images for c in calls])
    duration = records.ended - records.began
    counts = stats.status_counts(records.code)
    errors = len(records.code) - counts.get("OK", 0)

    warm_at = records.began + warmup_seconds(seconds)
    during = [s for s in samples if records.began <= s.at <= records.ended + 1]
    warm = next((s for s in during if s.at >= warm_at), None)
    end = during[-1] if during else None
    growth = 100 * (end.rss_bytes - warm.rss_bytes) / warm.rss_bytes if warm and end else None
    lost = stats.lost(counts)
    result: dict[str, Any] = {
        "settings": {
            "seconds": seconds,
            "concurrency": concurrency,
            "call_timeout_s": CALL_TIMEOUT_S,
            "window_s": window_s,
            "models": list(SOAK_MODELS),
            "server_command": server.command(),
        },
        "ready_s": round(ready_s, 2),
        "duration_s": round(duration, 1),
        "calls": len(records.code),
        "status": counts,
        "errors": errors,
        "lost": lost,
        "replies_checked": records.checked,
        "replies_wrong": records.wrong,
        "calls_per_s": round(len(records.code) / duration, 1),
        "images_per_s": round(float(images[records.kind].sum()) / duration, 1),
        "latency_ms": stats.latency_ms(records.latency),
        "mix": [
            {"weight": c.weight, **row}
            for c, row in zip(calls, stats.per_kind(records, [c.name for c in calls]), strict=True)
        ],
        "methods": stats.per_method(records, [c.method for c in calls]),
        "windows": stats.windows(records, window_s, samples, images),
        "memory": {
            "warmup_s": warmup_seconds(seconds),
            "rss_ready_mib": round(samples[0].rss_bytes / 2**20, 1) if samples else None,
            "rss_after_warmup_mib": round(warm.rss_bytes / 2**20, 1) if warm else None,
            "rss_end_mib": round(end.rss_bytes / 2**20, 1) if end else None,
            "rss_max_mib": round(max(s.rss_bytes for s in during) / 2**20, 1) if during else None,
            "growth_pct": None if growth is None else round(growth, 2),
        },
        "server_cpu_pct": int(
            round(100 * (during[-1].cpu_seconds - during[0].cpu_seconds) / duration)
        )
        if len(during) >= 2
        else None,
        "client_cpu_pct": int(round(100 * records.client_cpu_seconds / duration)),
        "client_loop_lag_ms": records.loop_lag_ms,
        "server_saw": seen,
        "server_exit_code_after_sigterm": exit_code,
        "server_errors_logged": server.logged_errors(),
        "server_log": str(server.log),
    }
    server_ok, client_ok = seen["answered"].get("OK", 0), counts.get("OK", 0)
    result["goals"] = [
        stats.goal("no errors", "0 failed calls", f"{errors} of {len(records.code)}", errors == 0),
        stats.goal(
            "flat memory",
            f"RSS growth after warm-up < {MAX_GROWTH_PCT:g}%",
            "no sample after the warm-up" if growth is None else f"{growth:+.2f}%",
            None if growth is None else growth < MAX_GROWTH_PCT,
        ),
        stats.goal("no requests lost", "0 lost calls", str(lost), lost == 0),
        stats.goal(
            "right answers",
            "every sampled reply holds what was asked",
            f"{records.wrong} wrong of {records.checked} checked",
            records.wrong == 0,
        ),
        stats.goal(
            "server and client agree",
            "calls the server answered OK = OK replies received",
            f"{server_ok} answered, {client_ok} received",
            server_ok == client_ok,
        ),
    ]
    return result
