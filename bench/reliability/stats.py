"""Figures from call records: status counts, latency percentiles, windows over time, goals.

Everything returned is plain JSON (milliseconds rounded, status names as gRPC spells them), so
the JSON file is the single source the report is written from.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from bench.reliability.load import NO_ANSWER, Records
from bench.reliability.server import Sample

CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode} | {NO_ANSWER: "NO_ANSWER"}
# A call is lost when it ended without a status the server chose on purpose.
LOST = ("CANCELLED", "UNKNOWN", "INTERNAL", "NO_ANSWER")
QUANTILES = (50, 90, 99)


def status_counts(codes: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(codes, return_counts=True)
    return {
        CODE_NAMES.get(int(v), str(int(v))): int(c) for v, c in zip(values, counts, strict=True)
    }


def lost(counts: dict[str, int]) -> int:
    return sum(counts.get(name, 0) for name in LOST)


def latency_ms(latency: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99 and max in milliseconds (None when there are no calls)."""
    if not len(latency):
        return {f"p{q}": None for q in QUANTILES} | {"max": None}
    values = np.percentile(latency, QUANTILES) * 1000
    out: dict[str, float | None] = {
        f"p{q}": round(float(v), 2) for q, v in zip(QUANTILES, values, strict=True)
    }
    out["max"] = round(float(latency.max()) * 1000, 2)
    return out


def windows(
    records: Records, seconds: float, samples: list[Sample], images: np.ndarray
) -> list[dict[str, Any]]:
    """One row per `seconds` of the run: calls, errors, throughput, latency, server RSS and CPU."""
    rows = []
    edges = np.arange(records.began, records.ended, seconds)
    for lo in edges:
        hi = min(lo + seconds, records.ended)
        if hi - lo < seconds / 4:  # a sliver at the end says nothing
            continue
        inside = (records.start >= lo) & (records.start < hi)
        during = [s for s in samples if lo <= s.at <= hi]
        row: dict[str, Any] = {
            "from_s": round(float(lo - records.began), 1),
            "to_s": round(float(hi - records.began), 1),
            "calls": int(inside.sum()),
            "errors": int((records.code[inside] != 0).sum()),
            "calls_per_s": round(float(inside.sum()) / (hi - lo), 1),
            "images_per_s": round(float(images[records.kind[inside]].sum()) / (hi - lo), 1),
            **latency_ms(records.latency[inside]),
        }
        if len(during) >= 2:
            row["rss_mib"] = round(during[-1].rss_bytes / 2**20, 1)
            busy = during[-1].cpu_seconds - during[0].cpu_seconds
            row["server_cpu_pct"] = int(round(100 * busy / (during[-1].at - during[0].at)))
        rows.append(row)
    return rows


def goal(name: str, target: str, measured: str, met: bool | None) -> dict[str, Any]:
    """One goal: what was wanted, what was measured, and whether it was met (None: not run)."""
    return {"goal": name, "target": target, "measured": measured, "met": met}


def per_kind(records: Records, names: list[str]) -> list[dict[str, Any]]:
    """Calls, errors and latency for each kind of call in the mix."""
    rows = []
    for index, name in enumerate(names):
        mine = records.kind == index
        rows.append(
            {
                "call": name,
                "calls": int(mine.sum()),
                "errors": int((records.code[mine] != 0).sum()),
                **latency_ms(records.latency[mine]),
            }
        )
    return rows


def per_method(records: Records, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Calls and client-side latency by gRPC method name (`Classify`, `ModelInfer`, ...)."""
    names = [m.rsplit("/", 1)[1] for m in methods]
    out = {}
    for name in dict.fromkeys(names):
        mine = np.isin(records.kind, [i for i, n in enumerate(names) if n == name])
        latency = records.latency[mine]
        mean = round(float(latency.mean()) * 1000, 2) if len(latency) else None
        out[name] = {"calls": int(mine.sum()), "mean": mean, **latency_ms(latency)}
    return out
