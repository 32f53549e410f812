"""The performance goals, judged from the suite's JSON alone (a pure function of it).

Comparisons with raw ONNX Runtime use our native `Classify`; comparisons with Triton and the
naive baseline use our Open Inference Protocol endpoint, because those three are driven by the
very same `tritonclient` load. A goal whose figures were not measured in this run (a system
skipped, `--systems` narrowed) is "not run", never guessed. With `--allow-spinning both`, the
goals about our server are judged once per setting.
"""

from __future__ import annotations

from typing import Any

from bench.reliability.stats import goal
from bench.serving import ceiling
from bench.serving.systems import PAIRED

BUSY = 32  # "concurrency 32"
MEMORY_GOAL_MIB = 1024.0
STARTUP_GOAL_S = 3.0
NOT_MEASURED = "not measured in this run"


def point(data: dict[str, Any], system: str, work: str, concurrency: int) -> dict[str, Any] | None:
    """A point's summary, or None when it was not measured."""
    for p in data.get("points", []):
        if (p["system"], p["workload"], p["concurrency"]) == (system, work, concurrency):
            return p["summary"]
    return None


def best_point(data: dict[str, Any], system: str, work: str) -> dict[str, Any] | None:
    """The summary with the most images per second over a workload's concurrencies."""
    found = [
        p["summary"]
        for p in data.get("points", [])
        if (p["system"], p["workload"]) == (system, work)
    ]
    return max(found, key=lambda s: s["images_per_s"], default=None)


def limit(data: dict[str, Any], model: str) -> dict[str, Any] | None:
    return (data.get("raw") or {}).get("limit", {}).get(model)


def batch1(data: dict[str, Any], model: str) -> dict[str, Any] | None:
    return (data.get("raw") or {}).get("batch1", {}).get(model)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _missing(name: str, target: str) -> dict[str, Any]:
    return goal(name, target, NOT_MEASURED, None)


def ours(data: dict[str, Any], system: str) -> list[dict[str, Any]]:
    """The goals about one of our systems' variants (`native`, `native+spin`, ...)."""
    suffix = " (spinning on)" if system.endswith("+spin") else ""
    native, oip = system, system.replace("native", "oip")
    low = min(data.get("settings", {}).get("concurrencies", [1]))
    return [
        *resnet_busy(data, native, suffix),
        *[
            versus(data, oip, other, label, factor, suffix)
            for other, label, factor in (
                ("naive", "the naive baseline", 2.0),
                ("triton", "Triton", 3.0),
            )
        ],
        lenet_batches(data, native, suffix),
        *[idle_latency(data, native, model, low, suffix) for model in ("lenet5", "resnet")],
        *feature_goals(data, native, low, suffix),
    ]


def resnet_busy(data: dict[str, Any], native: str, suffix: str) -> list[dict[str, Any]]:
    """resnet at concurrency 32: throughput and server CPU efficiency against raw ORT's."""
    name, target = f"resnet, concurrency {BUSY}: throughput{suffix}", ">= 0.7 x raw ORT best batch"
    name2 = f"resnet, concurrency {BUSY}: images per server CPU-second{suffix}"
    target2 = ">= 0.85 x raw ORT's"
    mine, top = point(data, native, "resnet x1", BUSY), limit(data, "resnet")
    if not (mine and top):
        return [_missing(name, target), _missing(name2, target2)]
    floor = ceiling.cheapest_floor(data, "resnet x1", BUSY)
    r = ratio(mine["images_per_s"], top["images_per_s"])
    measured = f"{r:.2f} x ({mine['images_per_s']:,.0f} vs {top['images_per_s']:,.0f} img/s)"
    speed = goal(name, target, measured, r is not None and r >= 0.7)
    if floor:
        best = ceiling.throughput(data, top, floor, floor.get("client_cpu_s_per_1000"))
        bound = best / top["images_per_s"]
        speed = ceiling.attach(speed, f"{bound:.2f} x ({best:,.0f} img/s)", bound >= 0.7)
    if not (mine.get("images_per_server_cpu_s") and top.get("images_per_cpu_s")):
        return [speed, _missing(name2, target2)]
    r = ratio(mine["images_per_server_cpu_s"], top["images_per_cpu_s"])
    measured = (
        f"{r:.2f} x ({mine['images_per_server_cpu_s']:,.0f} vs {top['images_per_cpu_s']:,.0f})"
    )
    thrift = goal(name2, target2, measured, r is not None and r >= 0.85)
    if floor:
        best = ceiling.server_efficiency(top, floor)
        bound = best / top["images_per_cpu_s"]
        thrift = ceiling.attach(thrift, f"{bound:.2f} x ({best:,.0f})", bound >= 0.85)
    return [speed, thrift]


def versus(
    data: dict[str, Any], oip: str, other: str, label: str, factor: float, suffix: str
) -> dict[str, Any]:
    """lenet5 at concurrency 32 against another server driven by the same tritonclient load."""
    name = f"lenet5, concurrency {BUSY}: vs {label}{suffix}"
    target = f">= {factor:g} x its throughput, lower p99 (both via tritonclient)"
    mine, theirs = point(data, oip, "lenet5 x1", BUSY), point(data, other, "lenet5 x1", BUSY)
    if not (mine and theirs):
        return _missing(name, target)
    r = ratio(mine["images_per_s"], theirs["images_per_s"])
    lower = (mine["p99"] or 0) < (theirs["p99"] or 0)
    measured = f"{r:.2f} x; p99 {mine['p99']:.2f} vs {theirs['p99']:.2f} ms"
    verdict = goal(name, target, measured, r is not None and r >= factor and lower)
    floor, top = ceiling.cheapest_floor(data, "lenet5 x1", BUSY), limit(data, "lenet5")
    if not (floor and top):
        return verdict
    # The floor is driven by the bare gRPC client; this goal's client is tritonclient's.
    best = ceiling.throughput(data, top, floor, mine.get("client_cpu_s_per_1000"))
    bound = best / theirs["images_per_s"]
    return ceiling.attach(verdict, f"{bound:.2f} x ({best:,.0f} img/s)", bound >= factor)


def lenet_batches(data: dict[str, Any], native: str, suffix: str) -> dict[str, Any]:
    """lenet5 with 32 images per request, at its best concurrency, against raw ORT's best."""
    name, target = f"lenet5, batches of 32 per request{suffix}", ">= 0.6 x raw ORT best batch"
    mine, top = best_point(data, native, "lenet5 x32"), limit(data, "lenet5")
    if not (mine and top):
        return _missing(name, target)
    r = ratio(mine["images_per_s"], top["images_per_s"])
    measured = f"{r:.2f} x ({mine['images_per_s']:,.0f} vs {top['images_per_s']:,.0f} img/s)"
    verdict = goal(name, target, measured, r is not None and r >= 0.6)
    floor = ceiling.cheapest_floor(data, "lenet5 x32")
    if not floor:
        return verdict
    best = ceiling.throughput(data, top, floor, floor.get("client_cpu_s_per_1000"))
    bound = best / top["images_per_s"]
    return ceiling.attach(verdict, f"{bound:.2f} x ({best:,.0f} img/s)", bound >= 0.6)


def idle_latency(
    data: dict[str, Any], native: str, model: str, low: int, suffix: str
) -> dict[str, Any]:
    """One call at a time: the time on top of raw ORT's batch-1 inference."""
    name = f"{model}, concurrency {low}: p50 latency{suffix}"
    target = "<= raw ORT batch-1 p50 + 0.5 ms"
    mine, one = point(data, native, f"{model} x1", low), batch1(data, model)
    if not (mine and one and mine["p50"] is not None):
        return _missing(name, target)
    extra = mine["p50"] - one["p50"]
    measured = f"{mine['p50']:.2f} ms vs {one['p50']:.2f} ms (+{extra:.2f} ms)"
    verdict = goal(name, target, measured, extra <= 0.5)
    trip = ceiling.round_trip(data, f"{model} x1", low)
    if trip is None:
        return verdict
    return ceiling.attach(verdict, f"+{trip:.2f} ms (the floor's round trip)", trip <= 0.5)


def feature_goals(data: dict[str, Any], native: str, low: int, suffix: str) -> list[dict[str, Any]]:
    """A feature map costs no more than copying it, and never a second inference.

    The overhead is the paired workload's: calls with and without the map alternate in one run,
    so it is the difference of two p50s measured side by side.
    """
    name = f"resnet: overhead of asking for the stage-1 map{suffix}"
    target = "<= the cost of copying its bytes"
    name2 = f"resnet: asking for a feature map runs no second inference{suffix}"
    target2 = "overhead < one batch-1 inference"
    paired = point(data, native, PAIRED, low) or {}
    overhead = paired.get("paired_overhead_ms")
    costs = (data.get("raw") or {}).get("feature_cost")
    one = batch1(data, "resnet")
    if overhead is None or not (costs and one):
        return [_missing(name, target), _missing(name2, target2)]
    copy = costs["copy_ms"]
    cheap = goal(name, target, f"+{overhead:.3f} ms p50 vs {copy:.3f} ms to copy", overhead <= copy)
    single = goal(
        name2,
        target2,
        f"+{overhead:.3f} ms vs {one['p50']:.2f} ms an inference",
        overhead < one["p50"],
    )
    floor = ceiling.paired_overhead(data, PAIRED, low)
    if floor is None:
        return [cheap, single]
    best = f"+{floor:.3f} ms (the floor's, sending the same bytes)"
    return [
        ceiling.attach(cheap, best, floor <= copy),
        ceiling.attach(single, best, floor < one["p50"]),
    ]


def footprint_goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    foot = data.get("footprint") or {}
    quick = foot.get("quick_set")
    name, target = "start-up to ready with the quick set", f"<= {STARTUP_GOAL_S:g} s"
    goals = []
    if quick:
        seconds = quick["startup_s_median"]
        goals.append(goal(name, target, f"{seconds:.2f} s (median)", seconds <= STARTUP_GOAL_S))
    else:
        goals.append(_missing(name, target))
    family = foot.get("family") or {}
    name, target = "resident memory with the whole family loaded", "<= 1 GB (1,024 MiB)"
    if "rss_mib" in family:
        rss = family["rss_mib"]
        models = len(family["models"])
        goals.append(
            goal(name, target, f"{rss:,.0f} MiB ({models} models)", rss <= MEMORY_GOAL_MIB)
        )
    else:
        goals.append(goal(name, target, family.get("skipped", NOT_MEASURED), None))
    return goals


def compute(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal, in the order of the issue's list."""
    variants = sorted(
        {p["system"] for p in data.get("points", []) if p["system"].startswith("native")}
    )
    goals = []
    for system in variants or ["native"]:
        goals += ours(data, system)
    return goals + footprint_goals(data)
