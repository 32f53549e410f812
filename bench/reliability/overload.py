"""Overload: far more work than the server can do, against a small queue bound.

One server with `--max-queue-images` small, one kind of call (lenet5, a batch of PNGs), every
call with a deadline. First a baseline at the concurrency the bound can hold (capacity, no
refusals expected), then two overloads: open loop at several times that capacity (offered load
that does not slow down when the server does), and closed loop at a very high concurrency (every
refusal is retried at once: a refusal storm). What must hold in both: the queue never exceeds its
bound, refusals come fast (RESOURCE_EXHAUSTED, not a wait), calls that are accepted keep a
bounded latency, useful throughput does not collapse, and no call outlives its deadline.

"Fast" differs between the two. Offered load that does not wait for answers is refused within
FAST_REFUSAL_MS. In the storm every one of STORM_CONCURRENCY clients resends the moment it is
refused, so each call waits behind the others whatever the server does: by Little's law its
latency is the concurrency over the calls answered per second (256 / 600 is about 0.4 s on
2 cores). There the goal is that refusals come back within half the deadline, early enough to
try another replica, and the report gives Little's figure beside the measured one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.reliability import stats
from bench.reliability.load import Plan, Records, run_load
from bench.reliability.server import Sample, Sampler, Server, inside
from bench.reliability.workload import Builder

MODEL = "lenet5"
QUEUE_IMAGES = 64
BATCH = 32
DEADLINE_S = 2.0
OPEN_FACTOR = 4.0  # open loop: this many times the baseline's calls per second
STORM_CONCURRENCY = 256
# Goals.
FAST_REFUSAL_MS = 100.0  # p99 time to a RESOURCE_EXHAUSTED answer
TIMED_OUT_SHARE = 0.01  # at most this share of calls may end DEADLINE_EXCEEDED under overload
BOUNDED_SHARE = 0.5  # accepted calls' p99 under this share of the deadline
KEPT_SHARE = 0.5  # accepted images/s under overload at least this share of the baseline's
DEADLINE_MARGIN_S = 0.1  # a call may end this late past its deadline
REFUSED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
LATE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def summarize(
    name: str, records: Records, samples: list[Sample], offered: str, images: int
) -> dict[str, Any]:
    duration = records.ended - records.began
    counts = stats.status_counts(records.code)
    ok = records.code == 0
    refused = records.code == REFUSED
    late = records.code == LATE
    during = [s for s in samples if records.began <= s.at <= records.ended]
    depths = [s.queue_depth for s in during if s.queue_depth is not None]
    overrun = records.latency - DEADLINE_S
    phase: dict[str, Any] = {
        "phase": name,
        "offered": offered,
        "duration_s": round(duration, 1),
        "calls": len(records.code),
        "calls_per_s": round(len(records.code) / duration, 1),
        "not_sent": records.not_sent,
        "status": counts,
        "accepted": int(ok.sum()),
        "refused": int(refused.sum()),
        "deadline_exceeded": int(late.sum()),
        "lost": stats.lost(counts),
        "accepted_images_per_s": round(float(ok.sum()) * images / duration, 1),
        "accepted_latency_ms": stats.latency_ms(records.latency[ok]),
        "refusal_latency_ms": stats.latency_ms(records.latency[refused]),
        "deadline_exceeded_latency_ms": stats.latency_ms(records.latency[late]),
        "max_past_deadline_ms": round(float(overrun.max()) * 1000, 1) if len(overrun) else None,
        "calls_past_deadline_margin": int((overrun > DEADLINE_MARGIN_S).sum()),
        "queue_depth_max": max(depths) if depths else None,
        "queue_depth_samples": len(depths),
        "replies_checked": records.checked,
        "replies_wrong": records.wrong,
        "client_cpu_pct": int(round(100 * records.client_cpu_seconds / duration)),
        "client_loop_lag_ms": records.loop_lag_ms,
    }
    if len(during) >= 2:
        busy = during[-1].cpu_seconds - during[0].cpu_seconds
        phase["server_cpu_pct"] = int(round(100 * busy / (during[-1].at - during[0].at)))
    return phase


def goals(phase: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    name = phase["phase"]
    depth = phase["queue_depth_max"]
    refusal = phase["refusal_latency_ms"]["p99"]
    closed = phase.get("concurrency")
    refusal_ms = BOUNDED_SHARE * DEADLINE_S * 1000 if closed else FAST_REFUSAL_MS
    little = f"; Little's law: {1000 * closed / phase['calls_per_s']:.0f} ms" if closed else ""
    accepted = phase["accepted_latency_ms"]["p99"]
    kept = phase["accepted_images_per_s"] / max(baseline["accepted_images_per_s"], 1e-9)
    bound_ms = BOUNDED_SHARE * DEADLINE_S * 1000
    timed_out = phase["deadline_exceeded"] / max(phase["calls"], 1)
    return [
        stats.goal(
            f"{name}: queue bound holds",
            f"cnnserve_queue_depth <= {QUEUE_IMAGES}",
            f"max {depth} over {phase['queue_depth_samples']} scrapes",
            None if depth is None else depth <= QUEUE_IMAGES,
        ),
        stats.goal(
            f"{name}: excess is refused, not left to time out",
            f"RESOURCE_EXHAUSTED for the excess; DEADLINE_EXCEEDED <= {TIMED_OUT_SHARE:.0%}",
            f"{phase['refused']:,} refused, {phase['deadline_exceeded']:,} timed out "
            f"({timed_out:.0%}) of {phase['calls']:,}",
            phase["refused"] > 0 and timed_out <= TIMED_OUT_SHARE,
        ),
        stats.goal(
            f"{name}: refusals are fast",
            f"RESOURCE_EXHAUSTED p99 < {refusal_ms:g} ms",
            "no refusals at all" if refusal is None else f"p99 {refusal:g} ms{little}",
            refusal is not None and refusal < refusal_ms,
        ),
        stats.goal(
            f"{name}: accepted latency bounded",
            f"accepted p99 < {bound_ms:g} ms",
            "none accepted" if accepted is None else f"p99 {accepted:g} ms",
            accepted is not None and accepted < bound_ms,
        ),
        stats.goal(
            f"{name}: throughput holds",
            f"accepted images/s >= {KEPT_SHARE:.0%} of the baseline's",
            f"{phase['accepted_images_per_s']:g} vs {baseline['accepted_images_per_s']:g} "
            f"({kept:.0%})",
            kept >= KEPT_SHARE,
        ),
        stats.goal(
            f"{name}: deadlines honoured",
            f"no call ends > {DEADLINE_MARGIN_S * 1000:g} ms past its {DEADLINE_S:g} s deadline",
            f"{phase['calls_past_deadline_margin']} calls; latest "
            f"{phase['max_past_deadline_ms']:+g} ms vs the deadline (the client's own loop "
            f"lagged up to {phase['client_loop_lag_ms']:g} ms)",
            phase["calls_past_deadline_margin"] == 0,
        ),
        stats.goal(
            f"{name}: no requests lost", "0 lost calls", str(phase["lost"]), phase["lost"] == 0
        ),
    ]


def run(
    repository: Path, logs: Path, builder: Builder, seconds: float, baseline_seconds: float
) -> dict[str, Any]:
    call = builder.classify(MODEL, BATCH, 1)
    extra = ("--max-queue-images", str(QUEUE_IMAGES))
    server = Server(repository, (MODEL,), logs / "overload-server.log", extra=extra)
    server.start()
    sampler = Sampler(server, interval=0.1, queue=True)
    sampler.start()
    fits = max(1, QUEUE_IMAGES // BATCH)  # calls the queue holds: the baseline's concurrency
    runs: list[tuple[str, str, Records, dict[str, Any]]] = []

    def phase(name: str, offered: str, plan: Plan) -> Records:
        before = server.totals()
        records = run_load(plan, logs)
        runs.append((name, offered, records, inside(before, server.totals())))
        return records

    address = server.address
    try:
        base = phase(
            "baseline",
            f"closed loop, concurrency {fits}",
            Plan(address, [call], baseline_seconds, DEADLINE_S, concurrency=fits),
        )
        capacity = float((base.code == 0).sum()) / (base.ended - base.began)
        rate = OPEN_FACTOR * max(capacity, 1.0)
        phase(
            "open loop",
            f"{rate:.0f} calls/s ({OPEN_FACTOR:g}x the baseline's {capacity:.1f})",
            Plan(address, [call], seconds, DEADLINE_S, rate=rate, seed=1),
        )
        phase(
            "refusal storm",
            f"closed loop, concurrency {STORM_CONCURRENCY}",
            Plan(address, [call], seconds, DEADLINE_S, concurrency=STORM_CONCURRENCY, seed=2),
        )
    finally:
        samples = sampler.stop()
        exit_code = server.stop()
    phases = [
        summarize(name, records, samples, offered, BATCH) | {"server_saw": seen}
        for name, offered, records, seen in runs
    ]
    phases[-1]["concurrency"] = STORM_CONCURRENCY  # a closed loop: its refusals queue too
    baseline = phases[0]
    base_goal = stats.goal(
        "baseline: no refusals within the bound",
        "every baseline call OK",
        f"{baseline['accepted']} of {baseline['calls']}",
        baseline["accepted"] == baseline["calls"],
    )
    return {
        "settings": {
            "model": MODEL,
            "images_per_call": BATCH,
            "max_queue_images": QUEUE_IMAGES,
            "deadline_s": DEADLINE_S,
            "seconds": seconds,
            "baseline_seconds": baseline_seconds,
            "open_loop_factor": OPEN_FACTOR,
            "storm_concurrency": STORM_CONCURRENCY,
            "server_command": server.command(),
        },
        "phases": phases,
        "queue_depth_trace": _trace(samples),
        "server_exit_code_after_sigterm": exit_code,
        "server_errors_logged": server.logged_errors(),
        "server_log": str(server.log),
        "goals": [base_goal, *[g for p in phases[1:] for g in goals(p, baseline)]],
    }


def _trace(samples: list[Sample]) -> dict[str, Any]:
    """The queue depth seen, as a histogram of scrapes (values are images waiting)."""
    depths = np.array([s.queue_depth for s in samples if s.queue_depth is not None])
    if not len(depths):
        return {}
    edges = [0, 1, QUEUE_IMAGES // 4, QUEUE_IMAGES // 2, QUEUE_IMAGES, QUEUE_IMAGES + 1]
    counts, _ = np.histogram(depths, bins=[*edges, max(edges[-1] + 1, int(depths.max()) + 1)])
    labels = ["0", f"1-{edges[2] - 1}", f"{edges[2]}-{edges[3] - 1}", f"{edges[3]}-{edges[4] - 1}"]
    labels += [str(QUEUE_IMAGES), f"> {QUEUE_IMAGES}"]
    return dict(zip(labels, (int(c) for c in counts), strict=True))
