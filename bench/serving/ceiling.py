"""What any Python gRPC server could reach on this machine, from the gRPC floor's figures.

Why: several goals ask for more than the machine leaves room for. The floor (a server that
answers a prebuilt reply and parses nothing) measures the CPU that Python's gRPC stack spends
on every call; no serving code can spend less. Add raw ONNX Runtime's CPU per image at its best
batch (no server can infer cheaper) and the load client's CPU (it shares the cores), and the
cores give an upper bound on throughput. A missed goal whose bound is below its target is out
of reach for any Python gRPC server here, ours or another; one whose bound is above it is ours
to close. The bounds are optimistic on purpose: the cheapest floor measured (grpc.aio or the
synchronous server), every core busy, no queueing.
"""

from __future__ import annotations

from typing import Any

FLOORS = ("floor", "floor-sync")


def _floors(
    data: dict[str, Any], work: str, concurrency: int | None, figure: str
) -> list[dict[str, Any]]:
    """The floors' summaries of `work` (at `concurrency`, else at any) that measured `figure`."""
    return [
        p["summary"]
        for p in data.get("points", [])
        if p["system"] in FLOORS
        and p["workload"] == work
        and (concurrency is None or p["concurrency"] == concurrency)
        and p["summary"].get(figure) is not None
    ]


def cheapest_floor(
    data: dict[str, Any], work: str, concurrency: int | None = None
) -> dict[str, Any] | None:
    """The floor point with the least server CPU per image (at `concurrency`, else at any)."""
    found = _floors(data, work, concurrency, "server_cpu_s_per_1000")
    return min(found, key=lambda s: s["server_cpu_s_per_1000"], default=None)


def round_trip(data: dict[str, Any], work: str, concurrency: int) -> float | None:
    """The fastest floor's p50: a call that does no work at all already takes this long."""
    return min((s["p50"] for s in _floors(data, work, concurrency, "p50")), default=None)


def paired_overhead(data: dict[str, Any], work: str, concurrency: int) -> float | None:
    """The least a floor paid for a paired workload's extra outputs: sending their bytes alone,
    with no inference and no serving code, already costs this much."""
    found = _floors(data, work, concurrency, "paired_overhead_ms")
    return min((s["paired_overhead_ms"] for s in found), default=None)


def throughput(
    data: dict[str, Any], limit: dict[str, Any], floor: dict[str, Any], client_cpu: float | None
) -> float:
    """Images per second with every core busy on inference, the floor's calls and the client."""
    per_1000 = limit["cpu_s_per_1000"] + floor["server_cpu_s_per_1000"] + (client_cpu or 0.0)
    return data["machine"]["cores"] * 1000 / per_1000


def server_efficiency(limit: dict[str, Any], floor: dict[str, Any]) -> float:
    """Images per server CPU-second: inference at raw's cost plus the floor's cost per call."""
    return 1000 / (limit["cpu_s_per_1000"] + floor["server_cpu_s_per_1000"])


def attach(goal: dict[str, Any], best: str, reachable: bool) -> dict[str, Any]:
    """The goal with its bound: what the floor allows, and whether the target is within it."""
    return goal | {"reach": best, "reachable": reachable}
