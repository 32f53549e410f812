"""The tables every serving run gets, CPU or GPU, from its JSON alone.

Per system and concurrency (throughput, its spread, latency, server and client CPU, memory,
and ratios to raw ONNX Runtime's limit, to Triton and to the gRPC floor at the same point),
raw ONNX Runtime at each batch size, cnnserve's own view of where a call's time went, and what
asking for a feature map costs. `report` puts them in docs/BENCHMARKS.md, once for the CPU run
and once for a GPU run, whose ratios are then to the GPU's own limit.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from bench.reliability.report import fmt, table
from bench.serving.goals import point
from bench.serving.systems import NAMES, PAIRED, measured, name


def titled(title: str, headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A bold title line, then its table, each followed by a blank line."""
    return [title, "", table(headers, rows), ""]


def ratio(a: float | None, b: float | None) -> str | None:
    return f"{a / b:.2f} x" if a is not None and b else None


def raw_limit(data: dict[str, Any], model: str) -> dict[str, Any] | None:
    return (data.get("raw") or {}).get("limit", {}).get(model)


def point_rows(data: dict[str, Any], work: str, concurrencies: Iterable[int]) -> list[list[Any]]:
    model = next((w["model"] for w in data.get("workloads", []) if w["name"] == work), "")
    top = raw_limit(data, model)
    rows = []
    for system in measured(data):
        for c in concurrencies:
            s = point(data, system, work, c)
            if s is None:
                continue
            triton = point(data, "triton", work, c)
            floor = point(data, "floor", work, c)
            rows.append(
                [
                    name(system),
                    c,
                    s["images_per_s"],
                    None if s["spread_pct"] is None else f"{s['spread_pct']:g}%",
                    ratio(s["images_per_s"], top and top["images_per_s"]),
                    ratio(s["images_per_s"], triton and triton["images_per_s"]),
                    s["p50"],
                    s["p90"],
                    s["p99"],
                    s["errors"],
                    s["server_cpu_s_per_1000"],
                    ratio(s["server_cpu_s_per_1000"], floor and floor["server_cpu_s_per_1000"]),
                    s["client_cpu_s_per_1000"],
                    s["rss_mib"],
                ]
            )
    return rows


HEADERS = ["System", "Concurrency", "Images/s", "Spread", "vs limit", "vs Triton", "p50 ms"]
HEADERS += ["p90 ms", "p99 ms", "Errors", "Server CPU s / 1k img", "Server CPU vs floor"]
HEADERS += ["Client CPU s / 1k img", "Server RSS MiB"]


def limit_row(data: dict[str, Any], model: str) -> list[Any] | None:
    top = raw_limit(data, model)
    if not top:
        return None
    setting = data["raw"]["models"][model].get(top["spinning"], {})
    return [
        f"{NAMES['raw']}, batch {top['batch']}, {top['spinning']}",
        "–",
        top["images_per_s"],
        None if top["spread_pct"] is None else f"{top['spread_pct']:g}%",
        "1.00 x",
        None,
        top["p50"],
        top["p90"],
        top["p99"],
        0,
        top["cpu_s_per_1000"],
        None,
        None,
        setting.get("rss_mib"),
    ]


def busy_concurrency(data: dict[str, Any]) -> int:
    return 32 if 32 in data["settings"]["concurrencies"] else max(data["settings"]["concurrencies"])


def headline_tables(data: dict[str, Any], busy: int) -> list[str]:
    lines = []
    for work, model in (("lenet5 x1", "lenet5"), ("resnet x1", "resnet")):
        rows = point_rows(data, work, [busy])
        top = limit_row(data, model)
        if top:
            rows.insert(0, top)
        if rows:
            lines += titled(f"**{work}**", HEADERS, rows)
    return lines


def every_point(data: dict[str, Any]) -> list[str]:
    lines = ["## Every point", ""]
    for w in data.get("workloads", []):
        concurrencies = sorted(
            {p["concurrency"] for p in data["points"] if p["workload"] == w["name"]}
        )
        rows = point_rows(data, w["name"], concurrencies)
        if not rows:
            continue
        kinds = [
            ", ".join(f"`{o}`" for o in outputs) for outputs in w.get("kinds") or [w["outputs"]]
        ]
        asking = " and ".join(kinds) + (", in turn" if len(kinds) > 1 else "")
        plural = "s" if w["images"] > 1 else ""
        title = f"**{w['name']}**: {w['images']} image{plural} per request, asking for {asking}."
        lines += titled(title, HEADERS, rows)
    return lines


def inside(data: dict[str, Any]) -> list[str]:
    """cnnserve's own metrics over each point: where a call's time went inside the server."""
    rows = [
        [
            name(p["system"]),
            p["workload"],
            p["concurrency"],
            p["summary"]["p50"],
            seen.get("handler_ms"),
            seen.get("queue_wait_ms"),
            seen.get("inference_ms"),
            seen.get("batch_images"),
        ]
        for p in data.get("points", [])
        if (seen := p["summary"].get("server_saw"))
    ]
    if not rows:
        return []
    return [
        "## Inside cnnserve",
        "",
        "From the server's own metrics over each point (means, median over repeats): the "
        "handler's time per call (decoding, batch queue, inference, reply), of that the wait "
        "in the batch queue and the batch's inference, and the images per batch. What the "
        "client waited beyond the handler went to gRPC, the event loop and the client itself.",
        "",
        table(
            ["System", "Workload", "Concurrency", "Client p50 ms", "Handler ms"]
            + ["Batch-queue wait ms", "Inference ms", "Images per batch"],
            rows,
        ),
        "",
    ]


SPIN_FIGURES = (("images_per_s", "Images/s"), ("p50", "p50"), ("p99", "p99"))
SPIN_FIGURES += (("server_cpu_s_per_1000", "Server CPU per image"),)


def spinning(data: dict[str, Any]) -> list[str]:
    """Our server with ONNX Runtime's thread spinning on against off, point by point: the
    measurement its default is chosen by (README, `--allow-spinning`)."""
    pairs = [
        (p, on)
        for p in data.get("points", [])
        if p["system"] in ("native", "oip")
        and (on := point(data, p["system"] + "+spin", p["workload"], p["concurrency"]))
    ]
    if not pairs:
        return []
    rows = [
        [name(p["system"]), p["workload"], p["concurrency"]]
        + [ratio(on.get(key), p["summary"].get(key)) for key, _ in SPIN_FIGURES]
        for p, on in pairs
    ]

    def median_ratio(key: str, keep: Callable[[dict[str, Any]], bool]) -> str:
        values = [
            on[key] / p["summary"][key]
            for p, on in pairs
            if keep(p) and on.get(key) and p["summary"].get(key)
        ]
        return f"{statistics.median(values):.2f} x" if values else "–"

    low, busy = min(data["settings"]["concurrencies"]), busy_concurrency(data)
    return [
        "## Thread spinning, on against off",
        "",
        "cnnserve with ONNX Runtime's thread spinning on (`--allow-spinning`) divided by the "
        "same server with it off (the default), point by point, both measured in this run. "
        f"Medians over the points: throughput {median_ratio('images_per_s', lambda p: True)} "
        f"(at concurrency {busy}: "
        f"{median_ratio('images_per_s', lambda p: p['concurrency'] == busy)}), p50 at "
        f"concurrency {low} {median_ratio('p50', lambda p: p['concurrency'] == low)}, p99 at "
        f"concurrency {low} {median_ratio('p99', lambda p: p['concurrency'] == low)}, server CPU "
        f"per image {median_ratio('server_cpu_s_per_1000', lambda p: True)}. A spinning "
        "thread keeps its core busy between batches: the CPU it takes is what the gRPC "
        "threads and everything else on the host then lack. A ratio inside the spread of "
        "repeated runs (below, per point) is noise.",
        "",
        table(
            ["System", "Workload", "Concurrency"]
            + [f"{label} on / off" for _, label in SPIN_FIGURES],
            rows,
        ),
        "",
    ]


def threads(data: dict[str, Any]) -> list[str]:
    """Each one-process server's CPU by thread at each workload's busiest point below overload:
    whether its event loop, where all of a grpc.aio server's Python runs, is what limits it."""
    busy = busy_concurrency(data)
    rows = []
    for w in data.get("workloads", []):
        level = max(
            (
                p["concurrency"]
                for p in data.get("points", [])
                if p["workload"] == w["name"] and p["concurrency"] <= busy
            ),
            default=0,
        )
        for system in measured(data):
            s = point(data, system, w["name"], level)
            if s is None or s.get("main_ms_per_call") is None:
                continue
            parts = [s["main_ms_per_call"], s["grpc_ms_per_call"], s["other_ms_per_call"]]
            rows.append(
                [
                    name(system),
                    w["name"],
                    level,
                    s["calls_per_s"],
                    f"{s['main_busy_pct']:.0f}%",
                ]
                + parts
                + [round(sum(parts), 4)]
            )
    if not rows:
        return []
    return [
        "## Where the server's CPU goes",
        "",
        "CPU per answered call of each server that is one process, by thread, read from /proc "
        "over each run (median over repeats), at each workload's busiest point below overload. "
        "A grpc.aio server runs every call's Python (parsing, handler, reply) on its main "
        "thread, the event loop, under the GIL; gRPC core's own threads move the bytes; the "
        "other threads are inference (the batch threads and ONNX Runtime's pool) and the "
        "metrics endpoint. A main thread near 100% busy decides the throughput whatever the "
        "other cores have left. For the synchronous floor, the handlers run on its pool's "
        "threads, counted as other. Triton is several processes and has no row.",
        "",
        table(
            ["System", "Workload", "Concurrency", "Calls/s", "Main thread busy"]
            + ["Main thread ms / call", "gRPC threads ms / call", "Other threads ms / call"]
            + ["Total ms / call"],
            rows,
        ),
        "",
    ]


def raw_onnx_runtime(data: dict[str, Any]) -> list[str]:
    r = data.get("raw")
    if not r:
        return []
    lines = [
        "## Raw ONNX Runtime",
        "",
        "In-process `session.run` asking for `probabilities`, sessions made as cnnserve makes "
        "them, each setting in a fresh process; CPU is the whole process's (every thread).",
        "",
    ]
    for model, settings in r["models"].items():
        names = list(settings)
        headers = ["Batch"] + [
            f"{label} {s}" for s in names for label in ("img/s", "p50 ms", "img per CPU-s")
        ]
        count = len(next(iter(settings.values()))["batches"])
        rows = []
        for i in range(count):
            row: list[Any] = [settings[names[0]]["batches"][i]["batch"]]
            for s in names:
                b = settings[s]["batches"][i]
                row += [b["images_per_s"], b["p50"], b["images_per_cpu_s"]]
            rows.append(row)
        top = r["limit"][model]
        title = (
            f"**{model}**: limit {fmt(top['images_per_s'])} images/s at batch {top['batch']}, "
            f"{top['spinning']}."
        )
        lines += titled(title, headers, rows)
    return lines


def feature_outputs(data: dict[str, Any]) -> list[str]:
    r = data.get("raw") or {}
    cost = r.get("feature_cost")
    lines = ["## Feature outputs", ""]
    if cost:
        setting = r["models"][cost["model"]][cost["spinning"]]
        every, every_best = setting.get("every_output_b1", {}), setting.get("every_output_best", {})
        batch = every_best.get("batch")
        one = next(b for b in setting["batches"] if b["batch"] == 1)
        plain = next((b for b in setting["batches"] if b["batch"] == batch), {})
        lines += [
            f"Raw ONNX Runtime, {cost['model']} ({cost['spinning']}): batch 1 takes "
            f"{fmt(one['p50'])} ms (p50) asking for `probabilities` only and "
            f"{fmt(every.get('p50'))} ms asking for every output, as Triton's ONNX Runtime "
            f"backend does on every request; at batch {batch or '–'}, "
            f"{fmt(plain.get('images_per_s'))} images/s with `probabilities` alone against "
            f"{fmt(every_best.get('images_per_s'))} with every output. The stage-1 map is "
            f"{cost['bytes']:,} bytes an image: returning it costs ONNX Runtime "
            f"{fmt(cost['ort_extra_ms'])} ms more at batch 1 (p50, never below 0), and one copy "
            f"of its bytes {fmt(cost['bytes_copy_ms'])} ms, so {fmt(cost['copy_ms'])} ms is "
            "the least asking for it can cost.",
            "",
        ]
    rows = [
        [
            name(system),
            c,
            s["p50_without"],
            s["p50_with"],
            s["paired_overhead_ms"],
            s["images_per_s"],
        ]
        for system in measured(data)
        for c in sorted({p["concurrency"] for p in data["points"] if p["workload"] == PAIRED})
        if (s := point(data, system, PAIRED, c)) and s.get("paired_overhead_ms") is not None
    ]
    if rows:
        lines += [
            "Asking for the stage-1 map (`features.layer1`) beside the classes, per system. "
            "Calls with and without the map alternate in one run (each client worker takes the "
            "two in turn), so both p50s come from the same minutes on the same server, and the "
            "overhead is their difference (median over repeats). The floors answer the map's "
            "bytes prebuilt: their overhead is what sending those bytes alone costs.",
            "",
            table(
                ["System", "Concurrency", "p50 ms without", "p50 ms with", "Overhead ms"]
                + ["Images/s (both kinds)"],
                rows,
            ),
            "",
        ]
    elif any(p["workload"].startswith("resnet x1 +") for p in data.get("points", [])):
        lines += [
            "This run predates the paired workload: it measured the map in runs of its own "
            "(`resnet x1 + layer1` under *Every point*), whose p50s differ from the plain "
            "runs' by the runs' own noise as much as by the map, so no overhead is shown.",
            "",
        ]
    probs = next(
        (p for p in data.get("points", []) if p["workload"].startswith("resnet x1, Triton")), None
    )
    if probs:
        c = probs["concurrency"]
        every = point(data, "triton", "resnet x1", c)
        s = probs["summary"]
        if every:
            lines += [
                f"Triton at concurrency {c}, resnet bound with every output (as its ONNX Runtime "
                f"backend serves the file): {fmt(every['images_per_s'])} images/s, p99 "
                f"{fmt(every['p99'])} ms; bound with `probabilities` only: "
                f"{fmt(s['images_per_s'])} images/s, p99 {fmt(s['p99'])} ms. Requests that ask "
                "for no feature map pay for every map with the first binding.",
                "",
            ]
    return lines if len(lines) > 2 else []
