"""docs/BENCHMARKS.md and its goals come from the serving suite's JSON alone: checked on a
small synthetic JSON, so a goal judged wrongly or a figure dropped from a table fails here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.serving import changes, compare, goals, report
from bench.serving.systems import PAIRED


def summary(images_per_s: float, p50: float, p99: float, cpu_per_1000: float) -> dict[str, Any]:
    return {
        "repeats": 2,
        "images_per_s": images_per_s,
        "images_per_s_min": images_per_s * 0.9,
        "images_per_s_max": images_per_s * 1.1,
        "spread_pct": 20.0,
        "calls_per_s": images_per_s,
        "p50": p50,
        "p90": 2 * p50,
        "p99": p99,
        "server_cpu_s_per_1000": cpu_per_1000,
        "client_cpu_s_per_1000": 0.5,
        "images_per_server_cpu_s": 1000 / cpu_per_1000,
        "rss_mib": 130.0,
        "calls": 1000,
        "errors": 0,
        "replies_wrong": 0,
    }


def paired(without: float, with_: float) -> dict[str, float]:
    return {"p50_without": without, "p50_with": with_, "paired_overhead_ms": with_ - without}


def point(system: str, work: str, c: int, s: dict[str, Any]) -> dict[str, Any]:
    model, _, rest = work.partition(" ")
    images = 32 if rest.startswith("x32") else 1
    return {
        "system": system,
        "workload": work,
        "model": model,
        "images_per_request": images,
        "outputs": ["probabilities"],
        "concurrency": c,
        "runs": [],
        "summary": s,
    }


SAW = {"handler_ms": 30.0, "queue_wait_ms": 12.5, "inference_ms": 15.0, "batch_images": 21.0}


def raw_row(batch: int, images_per_s: float, p50: float) -> dict[str, Any]:
    return {
        "batch": batch,
        "repeats": 2,
        "images_per_s": images_per_s,
        "images_per_cpu_s": images_per_s,
        "cpu_s_per_1000": 1000 / images_per_s,
        "p50": p50,
        "p90": p50,
        "p99": p50,
        "spread_pct": 5.0,
    }


def synthetic() -> dict[str, Any]:
    lenet_rows = [raw_row(1, 5000.0, 0.2), raw_row(256, 40000.0, 6.4)]
    resnet_rows = [raw_row(1, 400.0, 2.5), raw_row(64, 1000.0, 64.0)]
    raw = {
        "models": {
            "lenet5": {"spinning off": {"batches": lenet_rows, "rss_mib": 60.0}},
            "resnet": {
                "spinning off": {
                    "batches": resnet_rows,
                    "rss_mib": 80.0,
                    "every_output_b1": raw_row(1, 300.0, 3.3),
                    "every_output_best": raw_row(64, 700.0, 91.0),
                    "feature_b1": raw_row(1, 390.0, 2.55),
                    "feature_copy_ms": 0.01,
                    "feature_bytes": 50176,
                }
            },
        },
        "limit": {
            "lenet5": {"spinning": "spinning off", **lenet_rows[1]},
            "resnet": {"spinning": "spinning off", **resnet_rows[1]},
        },
        "batch1": {
            "lenet5": {"spinning": "spinning off", **lenet_rows[0]},
            "resnet": {"spinning": "spinning off", **resnet_rows[0]},
        },
        "feature_cost": {
            "model": "resnet",
            "spinning": "spinning off",
            "bytes": 50176,
            "ort_extra_ms": 0.05,
            "bytes_copy_ms": 0.01,
            "copy_ms": 0.06,
        },
    }
    points = [
        # resnet at 32: 800 / 1000 = 0.8 x the limit (met), 0.8 x its CPU efficiency (missed).
        point("native", "resnet x1", 32, summary(800.0, 40.0, 80.0, 1.25) | {"server_saw": SAW}),
        point("native", "resnet x1", 1, summary(350.0, 2.9, 4.0, 2.9)),
        # Calls with and without the stage-1 map, alternating in one run: 0.05 ms apart.
        point("native", PAIRED, 1, summary(340.0, 2.92, 4.2, 3.0) | paired(2.9, 2.95)),
        point("native", "lenet5 x1", 1, summary(1500.0, 0.6, 1.0, 0.7)),
        point("native", "lenet5 x32", 1, summary(20000.0, 1.6, 3.0, 0.05)),
        point("native", "lenet5 x32", 8, summary(26000.0, 9.8, 12.0, 0.04)),
        # lenet5 at 32 over the same client: 3 x naive (met), 2.5 x Triton (missed).
        point("oip", "lenet5 x1", 32, summary(3000.0, 10.0, 20.0, 0.6)),
        point("naive", "lenet5 x1", 32, summary(1000.0, 30.0, 60.0, 1.8)),
        point("triton", "lenet5 x1", 32, summary(1200.0, 25.0, 70.0, 2.2)),
        point("triton", "resnet x1", 32, summary(300.0, 100.0, 160.0, 3.1)),
        # The gRPC floor: native's server CPU at resnet x1, c=32 is 1.25 / 0.25 = 5 x the floor's.
        point("floor", "resnet x1", 32, summary(9000.0, 3.5, 6.0, 0.25)),
        point("floor", "lenet5 x1", 32, summary(9500.0, 3.4, 5.5, 0.24)),
        point("floor", "lenet5 x32", 1, summary(90000.0, 0.35, 0.6, 0.01)),
        point(
            "triton",
            "resnet x1, Triton bound to probabilities only",
            32,
            summary(650.0, 47.0, 77.0, 1.6),
        ),
    ]
    data: dict[str, Any] = {
        "command": "python -m bench.serving --quick",
        "date": "2026-01-01 12:00:00 UTC",
        "quick": True,
        "model_repository": "bench/models",
        "load_average_start": [2.5, 2.0, 1.0],
        "load_average_end": [3.0, 2.0, 1.0],
        "seconds": 95.0,
        "settings": {
            "systems": ["raw", "native", "oip", "triton", "naive", "floor"],
            "seconds": 2.0,
            "repeats": 2,
            "concurrencies": [1, 8, 32],
            "warmup_s": 0.5,
            "raw_seconds": 0.5,
            "raw_batches": [1, 256],
            "allow_spinning": [False],
            "baselines_allow_spinning": False,
        },
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "platform": "Linux", "niceness": 15},
        "versions": {"python": "3.11.7", "onnxruntime": "1.0"},
        "triton": {"note": "Triton with its Python backend", "versions": {"pytriton": "0.7.0"}},
        "exported": ["train --model resnet"],
        "workloads": [
            {"name": "lenet5 x1", "model": "lenet5", "images": 1, "outputs": ["probabilities"]},
            {"name": "lenet5 x32", "model": "lenet5", "images": 32, "outputs": ["probabilities"]},
            {"name": "resnet x1", "model": "resnet", "images": 1, "outputs": ["probabilities"]},
            {
                "name": PAIRED,
                "model": "resnet",
                "images": 1,
                "outputs": ["probabilities", "features.layer1"],
                "kinds": [["probabilities"], ["probabilities", "features.layer1"]],
            },
        ],
        "raw": raw,
        "points": points,
        "servers": {
            "cnnserve": {
                "command": ["python", "-m", "service.cli", "serve", "--grpc-port", "4242"],
                "startup_s": [1.1, 1.3],
                "rss_ready_mib": [120.0, 121.0],
            },
            "floor": {
                "command": ["/x/python", "-m", "bench.serving.floor_server", "--port", "4343"]
                + ["--images", "1,32"],
                "startup_s": [0.4, 0.5],
                "rss_ready_mib": [40.0, 41.0],
            },
        },
        "footprint": {
            "quick_set": {
                "models": ["logreg", "mlp", "lenet5", "kirsch"],
                "startup_s": [2.5, 3.5],
                "startup_s_median": 3.2,
                "rss_mib": 140.0,
            },
            "family": {"skipped": "--no-family, the default with --quick"},
        },
        "skipped": {},
    }
    data["goals"] = goals.compute(data)
    return data


def verdicts(data: dict[str, Any]) -> dict[str, bool | None]:
    return {g["goal"]: g["met"] for g in data["goals"]}


def test_goals_are_judged_from_the_figures() -> None:
    met = verdicts(synthetic())
    assert met["resnet, concurrency 32: throughput"] is True
    assert met["resnet, concurrency 32: images per server CPU-second"] is False
    assert met["lenet5, concurrency 32: vs the naive baseline"] is True
    assert met["lenet5, concurrency 32: vs Triton"] is False
    assert met["lenet5, batches of 32 per request"] is True  # 26,000 / 40,000 = 0.65
    assert met["lenet5, concurrency 1: p50 latency"] is True  # 0.6 <= 0.2 + 0.5
    assert met["resnet, concurrency 1: p50 latency"] is True  # 2.9 <= 2.5 + 0.5
    assert met["resnet: overhead of asking for the stage-1 map"] is True  # 0.05 <= 0.06
    assert met["resnet: asking for a feature map runs no second inference"] is True
    assert met["start-up to ready with the quick set"] is False  # 3.2 s
    assert met["resident memory with the whole family loaded"] is None


def test_each_goal_carries_the_bound_the_grpc_floor_sets() -> None:
    data = synthetic()
    data["points"].append(point("floor-sync", "lenet5 x1", 1, summary(2000.0, 0.4, 0.9, 0.5)))
    data["points"].append(point("floor", "lenet5 x1", 1, summary(1800.0, 0.7, 1.2, 0.6)))
    by_name = {g["goal"]: g for g in goals.compute(data)}
    # 2 cores / (1.0 raw + 0.25 floor + 0.5 client) ms per image = 1,143 img/s, 1.14 x 1,000
    speed = by_name["resnet, concurrency 32: throughput"]
    assert (speed["reach"], speed["reachable"]) == ("1.14 x (1,143 img/s)", True)
    # 1,000 / (1.0 + 0.25) = 800 images per server CPU-second, under 0.85 x raw's 1,000
    thrift = by_name["resnet, concurrency 32: images per server CPU-second"]
    assert (thrift["reach"], thrift["reachable"]) == ("0.80 x (800)", False)
    # 2 / (0.025 + 0.24 + 0.5) = 2,614 img/s: 2.61 x naive's 1,000, 2.18 x Triton's 1,200
    assert by_name["lenet5, concurrency 32: vs the naive baseline"]["reachable"] is True
    triton = by_name["lenet5, concurrency 32: vs Triton"]
    assert (triton["reach"], triton["reachable"]) == ("2.18 x (2,614 img/s)", False)
    assert by_name["lenet5, batches of 32 per request"]["reachable"] is False  # 3,738 img/s
    idle = by_name["lenet5, concurrency 1: p50 latency"]  # the cheaper floor's round trip
    assert (idle["reach"], idle["reachable"]) == ("+0.40 ms (the floor's round trip)", True)
    assert "reach" not in by_name["resnet, concurrency 1: p50 latency"]  # no floor measured
    assert "reach" not in by_name["resnet: overhead of asking for the stage-1 map"]  # no floor
    text = report.render(data | {"goals": list(by_name.values())})
    assert "**2 of the 3 missed goals are out of reach on this machine" in text
    assert "| 0.80 x (800): **out of reach** |" in text
    assert "| met | 0.09 x (3,738 img/s) |" in text  # met: the bound was too low, not the goal


def test_the_feature_map_goals_read_the_paired_run_and_the_floors_cost_of_the_bytes() -> None:
    data = synthetic()
    # Sending the map's bytes alone cost the floor 0.08 ms: more than copying them (0.06 ms),
    # less than an inference (2.5 ms).
    data["points"].append(
        point("floor", PAIRED, 1, summary(900.0, 1.0, 2.0, 0.5) | paired(1, 1.08))
    )
    by_name = {g["goal"]: g for g in goals.compute(data)}
    cheap = by_name["resnet: overhead of asking for the stage-1 map"]
    assert (cheap["met"], cheap["measured"]) == (True, "+0.050 ms p50 vs 0.060 ms to copy")
    assert cheap["reach"] == "+0.080 ms (the floor's, sending the same bytes)"
    assert cheap["reachable"] is False
    assert by_name["resnet: asking for a feature map runs no second inference"]["reachable"]
    text = report.render(data | {"goals": list(by_name.values())})
    assert "| cnnserve, native Classify | 1 | 2.9 | 2.95 | 0.05 | 340 |" in text
    assert (
        "| gRPC floor: grpc.aio (uvloop) answering a prebuilt reply | 1 | 1 | 1.08 | 0.08 |" in text
    )
    assert "asking for `probabilities` and `probabilities`, `features.layer1`, in turn." in text
    # Without a paired run there is no overhead to judge: not run, never guessed from two runs,
    # and a run from before the paired workload says so instead of showing a difference.
    data["points"] = [p for p in data["points"] if p["workload"] != PAIRED]
    assert verdicts(data | {"goals": goals.compute(data)})[cheap["goal"]] is None
    data["points"].append(point("native", "resnet x1 + layer1", 1, summary(300.0, 3.0, 4.0, 3.0)))
    text = report.render(data | {"goals": goals.compute(data)})
    assert "This run predates the paired workload" in text
    assert "| p50 ms without |" not in text


def test_spinning_on_is_shown_against_off_point_by_point() -> None:
    data = synthetic()
    data["points"] += [
        point("native+spin", "resnet x1", 1, summary(420.0, 2.5, 6.0, 3.48)),
        point("native+spin", "resnet x1", 32, summary(800.0, 40.0, 80.0, 1.5)),
    ]
    text = report.render(data)
    section = text.split("## Thread spinning, on against off")[1].split("\n## ")[0]
    # resnet x1 at 1: 420 / 350 img/s, p50 2.5 / 2.9, p99 6.0 / 4.0, CPU 3.48 / 2.9
    assert "| cnnserve, native Classify | resnet x1 | 1 | 1.20 x | 0.86 x | 1.50 x | 1.20 x |" in (
        section
    )
    assert "| cnnserve, native Classify | resnet x1 | 32 | 1.00 x | 1.00 x | 1.00 x | 1.20 x |" in (
        section
    )
    assert "throughput 1.10 x (at concurrency 32: 1.00 x)" in section  # median of 1.2 and 1.0
    assert "p99 at concurrency 1 1.50 x, server CPU per image 1.20 x" in section
    assert "## Thread spinning" not in report.render(synthetic())  # measured one way only


def test_unmeasured_goals_are_not_run_never_guessed() -> None:
    data = synthetic()
    data["points"] = [p for p in data["points"] if p["system"] != "triton"]
    data.pop("raw")
    met = verdicts(data | {"goals": goals.compute(data)})
    assert met["lenet5, concurrency 32: vs Triton"] is None
    assert met["resnet, concurrency 32: throughput"] is None
    assert met["lenet5, concurrency 32: vs the naive baseline"] is True


def test_spinning_both_ways_judges_our_goals_twice() -> None:
    data = synthetic()
    data["points"].append(point("native+spin", "resnet x1", 32, summary(500.0, 60.0, 90.0, 2.0)))
    met = verdicts(data | {"goals": goals.compute(data)})
    assert met["resnet, concurrency 32: throughput"] is True
    assert met["resnet, concurrency 32: throughput (spinning on)"] is False  # 0.5 x


def test_every_section_and_table_is_rendered() -> None:
    text = report.render(synthetic())
    assert "Generated by `python -m bench.serving --quick`" in text
    assert "**Test CPU 9000**" in text and "`--quick` smoke run" in text
    for section in ("## Summary", "## Single images at concurrency 32", "## Every point"):
        assert section in text
    for section in ("## Raw ONNX Runtime", "## Feature outputs", "## Start-up and memory"):
        assert section in text
    assert "7 of 11 goals met, **3 missed**, 1 not run." in text
    rows = [line for line in text.splitlines() if line.startswith("| cnnserve, native Classify |")]
    assert "| cnnserve, native Classify | 32 | 800 | 20% | 0.80 x | 2.67 x | 40 |" in text
    assert "| 0 | 1.25 | 5.00 x | 0.5 | 130 |" in rows[0]  # server CPU, and vs the floor's
    assert any(row.startswith("| cnnserve, native Classify | 8 | 26,000 |") for row in rows)
    limit = "| ONNX Runtime in-process (the limit), batch 64, spinning off | – | 1,000 | 5% |"
    assert limit in text and "| 0 | 1 | – | – | 80 |" in text  # CPU s per 1,000, RSS MiB
    assert "| resnet: overhead of asking for the stage-1 map | <= the cost of copying" in text
    assert "| 256 | 40,000 | 6.4 | 40,000 |" in text  # raw lenet5, batch 256
    assert "bound with `probabilities` only: 650 images/s" in text
    assert "at batch 64, 1,000 images/s with `probabilities` alone against 700 with every" in text
    assert "| cnnserve, native Classify | resnet x1 | 32 | 40 | 30 | 12.5 | 15 | 21 |" in text
    assert "Server: " not in text and "`cnnserve serve --grpc-port 4242`" in text
    assert "Whole family: not measured (--no-family, the default with --quick)." in text
    assert "Triton: Triton with its Python backend (pytriton 0.7.0)." in text
    assert "None" not in text and "nan" not in text


def by_thread(busy: float, main: float, grpc_ms: float, other: float) -> dict[str, float]:
    return {
        "main_busy_pct": busy,
        "main_ms_per_call": main,
        "grpc_ms_per_call": grpc_ms,
        "other_ms_per_call": other,
    }


def test_one_process_servers_show_their_cpu_by_thread_at_the_busiest_point() -> None:
    data = synthetic()
    split = {
        ("native", "lenet5 x32", 8): by_thread(97.5, 0.5, 0.05, 0.9),
        ("native", "lenet5 x32", 1): by_thread(60.0, 0.4, 0.04, 0.8),  # not the busiest
        ("floor", "lenet5 x32", 1): by_thread(35.0, 0.15, 0.05, 0.0),
        ("floor", "lenet5 x1", 32): by_thread(80.0, 0.16, 0.06, 0.01),
    }
    for p in data["points"]:
        p["summary"] |= split.get((p["system"], p["workload"], p["concurrency"]), {})
    text = report.render(data)
    section = text.split("## Where the server's CPU goes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "| gRPC floor: grpc.aio (uvloop) answering a prebuilt reply | lenet5 x1 | 32 | 9,500 "
        "| 80% | 0.16 | 0.06 | 0.01 | 0.23 |",
        "| cnnserve, native Classify | lenet5 x32 | 8 | 26,000 | 98% | 0.5 | 0.05 | 0.9 | 1.45 |",
    ]  # the floor's x32 point at concurrency 1 is not its busiest (native's 8 is)
    assert "Triton is several processes and has no row" in section
    plain = synthetic()
    assert "## Where the server's CPU goes" not in report.render(plain)  # an older JSON


def test_the_grpc_floor_has_its_rows_and_says_what_it_is_for() -> None:
    text = report.render(synthetic())
    floor = "| gRPC floor: grpc.aio (uvloop) answering a prebuilt reply |"
    rows = [line for line in text.splitlines() if line.startswith(floor)]
    # The headline and every-point tables: resnet and lenet5 x1 at 32 (twice each), x32 at 1.
    assert (
        rows.count(
            f"{floor} 32 | 9,000 | 20% | 9.00 x | 30.00 x | 3.5 | 7 | 6 | 0 | 0.25 |"
            " 1.00 x | 0.5 | 130 |"
        )
        == 2
    )
    assert any(row.startswith(f"{floor} 1 | 90,000 |") for row in rows)
    assert f"{floor} 0.4, 0.5 | 40, 41 |" in rows  # start-up and memory
    assert len(rows) == 6
    assert "minus the floor's is its serving code's own cost" in text
    assert "`python -m bench.serving.floor_server --port 4343 --images 1,32`" in text
    assert "7 of 11 goals met" in text  # the floor has no goals


def test_a_skipped_triton_says_why() -> None:
    data = synthetic()
    data["skipped"] = {"triton": "bench/.venv-triton/bin/python is missing"}
    text = report.render(data)
    assert "**Triton was not measured:** bench/.venv-triton/bin/python is missing." in text
    assert "- Skipped triton: bench/.venv-triton/bin/python is missing" in text


def test_write_adds_the_picture_beside_the_markdown(tmp_path: Path) -> None:
    path = report.write(synthetic(), tmp_path / "docs" / "BENCHMARKS.md")
    assert path.read_text().count(f"]({report.PICTURE})") == 1
    picture = tmp_path / "docs" / report.PICTURE
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def compared(
    date: str, commit: str, subject: str | None = "batcher: run small batches inline"
) -> dict[str, Any]:
    """A bench.serving.compare JSON as `changes.load` returns it, figures from `summarise`."""
    runs = [
        {"side": side, "images_per_s": ips, "p50": p50, "p99": p99}
        | {"cpu_ms_per_call": cpu, "server_cpu_s_per_1000": cpu}
        for side, ips, p50, p99, cpu in (
            ("before", 1000.0, 4.0, 9.0, 1.0),
            ("after", 1200.0, 3.0, 7.0, 0.8),
            ("after", 1100.0, 3.5, 6.0, 0.9),
            ("before", 900.0, 5.0, 11.0, 1.2),
            ("before", 950.0, 4.5, 10.0, 1.1),
            ("after", 1150.0, 2.5, 8.0, 0.7),
        )
    ]
    command = ".venv/bin/python -m bench.serving.compare HEAD~1 --system oip --rounds 3"
    return {
        "command": command,
        "date": date,
        "before": {"rev": "HEAD~1", "commit": "aaaaaaa"},
        "after": {"commit": commit, "uncommitted_changes": False},
        "settings": {"model": "lenet5", "system": "oip", "concurrency": 32}
        | {"images_per_request": 1, "seconds": 6.0, "rounds": 3, "warmup_s": 2.0},
        "runs": runs,
        "summary": compare.summarise(runs),
        "file": f"{date[:10]}-{commit}.json",
        "subject": subject,
    }


def test_each_change_measured_is_a_row_of_its_figures() -> None:
    text = report.render(synthetic() | {"changes": [compared("2026-01-02 10:00:00 UTC", "bbb")]})
    section = text.split("## Changes, measured one at a time")[1].split("## Every point")[0]
    assert text.index("## Single images at concurrency") < text.index("## Changes, measured")
    assert "interleaved in alternating order on the same machine" in section
    assert "a ratio inside the throughput spread of either side is noise" in section
    row = next(line for line in section.splitlines() if line.startswith("| 2026-01-02"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[:3] == [
        "2026-01-02 10:00:00 UTC",
        "`bbb` batcher: run small batches inline",
        "lenet5 oip, concurrency 32, 1 image per request",
    ]
    assert cells[3] == f"950 → 1,150 (x{1150 / 950:.2f})"  # medians over the rounds per side
    assert cells[4:6] == ["4.50 → 3.00", "10.0 → 7.0"]  # p50, p99 ms: both sides' decimals
    assert cells[6] == f"1.10 → 0.80 (x{0.8 / 1.1:.2f})"  # server CPU ms per call
    assert cells[7] == "10.5% / 8.7%"  # (1000 - 900) / 950 and (1200 - 1100) / 1150
    assert cells[8] == "3 × 6 s"
    assert cells[9] == "`.venv/bin/python -m bench.serving.compare HEAD~1 --system oip --rounds 3`"


def test_a_change_measured_with_a_feature_map_shows_its_overhead() -> None:
    change = compared("2026-01-02 10:00:00 UTC", "bbb")
    change["settings"] |= {"model": "resnet", "concurrency": 1, "feature": "features.layer1"}
    for run, overhead in zip(change["runs"], (0.05, 0.04, 0.03, 0.06, 0.05, 0.035), strict=True):
        run["paired_overhead_ms"] = overhead
    change["summary"] = compare.summarise(change["runs"])
    text = report.render(synthetic() | {"changes": [change]})
    assert (
        "| resnet oip, concurrency 1, 1 image per request, calls with and without "
        "`features.layer1` alternating: its overhead 0.050 → 0.035 ms |"
    ) in text


def test_an_uncommitted_change_names_no_subject_and_pipes_stay_in_their_cell() -> None:
    change = compared("2026-01-02 10:00:00 UTC", "bbb", subject="a | b")
    change["after"]["uncommitted_changes"] = True
    change["command"] += ' --server-args "--x a|b"'
    text = report.render(synthetic() | {"changes": [change]})
    assert "| `bbb` + uncommitted changes |" in text and "a | b" not in text
    assert '--server-args "--x a\\|b"`' in text


def test_a_setting_measured_on_one_tree_is_named_by_its_flags_not_the_subject() -> None:
    change = compared("2026-01-02 10:00:00 UTC", "bbb", subject="bench results: a run")
    change["settings"]["after_args"] = ["--max-queue-delay-ms", "2"]
    text = report.render(synthetic() | {"changes": [change]})
    assert "| `bbb` with `--max-queue-delay-ms 2`, against without |" in text
    assert "bench results" not in text


def test_a_change_is_named_by_its_subjects_first_sentence_without_asides() -> None:
    subject = (
        "service: fewer calls (the gate knows it once; submit() runs inline) on the hot path. "
        "149 instead of 170 calls. bench.serving.compare HEAD (abc): x1.00"
    )
    assert changes.headline(subject) == "service: fewer calls on the hot path"
    assert changes.headline("batcher: runs inside submit()") == "batcher: runs inside submit()"
    text = report.render(
        synthetic() | {"changes": [compared("2026-01-02 10:00:00 UTC", "b", subject)]}
    )
    assert "| `b` service: fewer calls on the hot path |" in text and "149" not in text


def test_no_change_measured_says_so_in_one_line() -> None:
    text = report.render(synthetic() | {"changes": []})
    section = text.split("## Changes, measured one at a time\n\n")[1].split("\n\n## ")[0]
    assert section == "No change measured one at a time yet (no JSON in `bench/results/changes/`)."


def test_changes_load_sorted_by_date_with_their_commit_subjects(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "runtime: faster"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    folder = tmp_path / "changes"
    folder.mkdir()
    dates = {"a-late": "2026-03-01 09:00:00 UTC", "b-early": "2026-01-05 18:00:00 UTC"}
    dates |= {"c-middle": "2026-02-01 08:00:00 CET"}
    for stem, date in dates.items():
        commit = head.stdout.strip() if stem == "b-early" else "0123456789"
        change = {k: v for k, v in compared(date, commit).items() if k not in ("file", "subject")}
        (folder / f"{stem}.json").write_text(json.dumps(change))
    (folder / "README.md").write_text("not a change")
    found = changes.load(folder)
    assert [c["file"] for c in found] == ["b-early.json", "c-middle.json", "a-late.json"]
    assert [c["subject"] for c in found] == ["runtime: faster", None, None]  # unknown commit
    assert [c["reverted_by"] for c in found] == [None, None, None]
    assert found[0]["summary"]["images_per_s"]["after"] == 1150
    assert changes.load(tmp_path / "missing") == []
    # a change tried and dropped: the revert's message names it, as `git revert` writes it
    full = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    quoted = f"results: measured {full.stdout.strip()}"  # naming it is not reverting it
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", quoted], check=True)
    assert [c["reverted_by"] for c in changes.load(folder)] == [None, None, None]
    message = f"Revert: slower\n\nThis reverts commit {full.stdout.strip()}."
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], check=True)
    revert = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert [c["reverted_by"] for c in changes.load(folder)] == [revert.stdout.strip(), None, None]


def test_a_reverted_change_says_so_beside_its_subject() -> None:
    change = compared("2026-01-02 10:00:00 UTC", "bbb") | {"reverted_by": "ccc"}
    text = report.render(synthetic() | {"changes": [change]})
    assert "| `bbb` batcher: run small batches inline; **reverted** in `ccc` |" in text


def test_the_report_is_written_again_from_the_json_and_the_changes(tmp_path: Path) -> None:
    (tmp_path / "serving.json").write_text(json.dumps(synthetic()))
    (tmp_path / "changes").mkdir()
    change = compared("2026-01-02 10:00:00 UTC", "bbb")
    (tmp_path / "changes" / "2026-01-02-inline.json").write_text(json.dumps(change))
    docs = tmp_path / "docs" / "BENCHMARKS.md"
    args = ["--data", str(tmp_path / "serving.json"), "--changes", str(tmp_path / "changes")]
    assert report.main([*args, "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "| 2026-01-02 10:00:00 UTC | `bbb` |" in text  # no such commit, so no subject
    assert f"| 950 → 1,150 (x{1150 / 950:.2f}) |" in text
    assert "7 of 11 goals met" in text and (docs.parent / report.PICTURE).is_file()


def gpu_run() -> dict[str, Any]:
    """A GPU run's JSON: the CPU run's structure, its own raw limit ten times the CPU's,
    Triton skipped, the device recorded, no goals."""
    data = synthetic()
    data["command"] = "python -m bench.serving --device cuda --repeats 1"
    data["quick"] = False
    data["settings"] |= {"device": "cuda", "systems": ["raw", "native", "oip", "naive", "floor"]}
    data["points"] = [p for p in data["points"] if p["system"] != "triton"]
    for top in data["raw"]["limit"].values():
        top["images_per_s"] *= 10  # resnet: 10,000, so native's 800 at 32 is 0.08 x
    data["machine"] = {"cpu": "Test CPU 16", "cores": 16, "platform": "Linux", "niceness": 0}
    data["device"] = {
        "device": "cuda",
        "provider": "CUDAExecutionProvider",
        "onnxruntime": "1.31.1",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04"},
    }
    data["skipped"] = {"triton": "not measured on a GPU: triton_app.py runs on the CPU"}
    data["goals"] = []
    return data


def gpu_part(text: str) -> str:
    return text.split("## On a GPU: NVIDIA H100 80GB HBM3\n")[1]


def test_a_gpu_run_gets_the_same_tables_after_the_cpu_figures() -> None:
    cpu = synthetic()
    text = report.render(cpu, gpu_run())
    assert text.index("## How it was measured") < text.index("## On a GPU: NVIDIA H100")
    assert "The same suite on a GPU, NVIDIA H100 80GB HBM3, with ONNX Runtime's CUDA" in text
    assert text.split("## On a GPU")[0].rstrip() + "\n" == report.render(cpu).replace(
        "## Summary", report._gpu_pointer(gpu_run())[0] + "\n\n## Summary"
    )
    gpu = gpu_part(text)
    assert "Generated by `python -m bench.serving --device cuda --repeats 1` on 2026" in gpu
    assert "**NVIDIA H100 80GB HBM3** (driver 580.159.04), with CUDAExecutionProvider" in gpu
    assert "onnxruntime 1.31.1). Machine: **Test CPU 16**, 16 cores" in gpu
    assert "Issue 8's goals are CPU goals, so these figures are shown without verdicts." in gpu
    assert "**Triton was not measured:** not measured on a GPU" in gpu
    for section in ("Single images at concurrency 32", "Every point", "Inside cnnserve"):
        assert f"\n### {section}\n" in gpu
    for section in ("Raw ONNX Runtime", "Feature outputs", "Start-up and memory", "How it was"):
        assert f"\n### {section}" in gpu
    assert "\n## " not in gpu and "| Goal |" not in gpu and "goals met" not in gpu
    # vs limit: the GPU's own raw limit (10,000 img/s for resnet), not the CPU's 1,000
    assert "| cnnserve, native Classify | 32 | 800 | 20% | 0.08 x | – | 40 |" in gpu
    assert "| ONNX Runtime in-process (the limit), batch 64, spinning off | – | 10,000 |" in gpu
    assert "| naive grpc.aio server | 32 | 1,000 |" in gpu
    assert "| Triton (PyTriton" not in gpu  # no Triton row: it was skipped
    assert "None" not in gpu and "nan" not in gpu


def test_without_a_gpu_run_the_report_is_the_cpu_one(tmp_path: Path) -> None:
    (tmp_path / "serving.json").write_text(json.dumps(synthetic()))
    docs = tmp_path / "BENCHMARKS.md"
    args = ["--data", str(tmp_path / "serving.json"), "--docs", str(docs)]
    args += ["--changes", str(tmp_path / "none"), "--gpu-data", str(tmp_path / "serving-cuda.json")]
    assert report.main(args) == 0
    assert docs.read_text() == report.render(synthetic() | {"changes": []})
    assert "On a GPU" not in docs.read_text()
    (tmp_path / "serving-cuda.json").write_text(json.dumps(gpu_run()))
    found = report.load(tmp_path / "serving-cuda.json")  # as main and the runner load it
    assert found is not None and report.load(tmp_path / "none.json") is None
    gpu = gpu_part(report.render(synthetic(), found))
    assert f"(`{tmp_path / 'serving-cuda.json'}`)" in gpu  # the file it came from


def test_the_real_json_renders_as_a_gpu_section_too() -> None:
    """The committed CPU run's JSON, as a GPU run would write it: every part of the real
    structure the GPU section reads is there."""
    real = json.loads(Path("bench/results/serving.json").read_text())
    gpu = real | {"device": {"device": "cuda", "provider": "CUDAExecutionProvider"}}
    text = report.render(real, gpu | {"goals": []})
    part = text.split("## On a GPU: cuda\n")[1]
    assert "### Single images at concurrency" in part and "### Raw ONNX Runtime" in part


def test_a_failed_start_up_measurement_says_why() -> None:
    gpu = gpu_run() | {"footprint": {"error": "--device cuda: cnnserve serve reports mlp: FAILED"}}
    part = gpu_part(report.render(synthetic(), gpu))
    assert "start-up and memory: not measured (--device cuda: cnnserve serve reports mlp" in part


def test_every_gpu_run_kept_is_listed_oldest_first(tmp_path: Path) -> None:
    older = gpu_run() | {"date": "2026-01-01 00:00:00 UTC", "revision": "aaa"}
    for p in older["points"]:
        if p["system"] in ("native", "oip"):
            p["summary"] = p["summary"] | {"images_per_s": 10.0}
    (tmp_path / "serving-cuda-aaa.json").write_text(json.dumps(older))
    newer = gpu_run() | {"date": "2026-02-01 00:00:00 UTC", "revision": "bbb"}
    (tmp_path / "serving-cuda.json").write_text(json.dumps(newer))
    loaded = report.load(tmp_path / "serving-cuda.json")
    assert loaded is not None and [run["revision"] for run in loaded["history"]] == ["aaa", "bbb"]
    part = gpu_part(report.render(synthetic(), loaded))
    rows = [line for line in part.split("### Every GPU run")[1].splitlines() if "| `" in line]
    assert rows[0].startswith("| `aaa` | 2026-01-01 00:00:00 UTC |")
    assert rows[-1].startswith("| `bbb` | 2026-02-01 00:00:00 UTC |")
    newest = [row for row in rows if "`bbb`" in row]
    # OIP 3,000 against naive 1,000; resnet has no naive point, so no ratio
    assert any(row.endswith("| lenet5 x1 | 32 | – | 3,000 | 1,000 | 3.00 x |") for row in newest)
    assert any(row.endswith("| resnet x1 | 32 | 800 | – | – | – |") for row in newest)
    assert all("| 10 |" in row for row in rows if "`aaa`" in row)
    # one run alone has nothing to be set beside
    assert "### Every GPU run" not in gpu_part(report.render(synthetic(), gpu_run()))


def test_the_batch_size_changes_are_shown_when_measured(tmp_path: Path) -> None:
    (tmp_path / "serving-cuda.json").write_text(json.dumps(gpu_run()))
    shapes = {
        "command": "python -m bench.gpu_shapes",
        "date": "2026-02-01 00:00:00 UTC",
        "onnxruntime": "1.31.1",
        "device": "cuda",
        "cycle": [1, 2, 1],
        "models": {"resnet": {"one session": {"median_ms": 191.0, "max_ms": 250.0}}},
        "note": "a note",
    }
    loaded = report.load(tmp_path / "serving-cuda.json")
    assert loaded is not None and loaded["shapes"] is None
    assert "Batch-size changes" not in gpu_part(report.render(synthetic(), loaded))
    (tmp_path / "gpu-shapes.json").write_text(json.dumps(shapes))
    part = gpu_part(report.render(synthetic(), report.load(tmp_path / "serving-cuda.json")))
    assert "### Batch-size changes on one CUDA session" in part
    assert "Batch sizes cycle through 1, 2, 1" in part and "Note: a note." in part
    assert "| resnet | one session | 191 | 250 |" in part


def test_a_new_gpu_run_keeps_the_one_before_under_its_commit(tmp_path: Path) -> None:
    path = tmp_path / "serving-cuda.json"
    assert report.keep_previous(path) is None  # nothing there yet
    path.write_text(json.dumps(gpu_run() | {"revision": "abc1234+"}))
    kept = report.keep_previous(path)
    assert kept == tmp_path / "serving-cuda-abc1234-dirty.json" and not path.exists()
    path.write_text(json.dumps(gpu_run() | {"revision": "abc1234+"}))  # the same commit again
    again = report.keep_previous(path)
    assert again is not None and again.name.startswith("serving-cuda-abc1234-dirty-2026")
    path.write_text(json.dumps(gpu_run()))
    loaded = report.load(path)
    assert loaded is not None and len(loaded["history"]) == 3
