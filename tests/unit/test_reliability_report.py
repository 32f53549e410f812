"""docs/RELIABILITY.md is rendered from the benchmark's JSON: tables, goals, and misses shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.reliability import report


def goal(name: str, met: bool | None) -> dict[str, Any]:
    return {"goal": name, "target": f"{name} target", "measured": f"{name} measured", "met": met}


def latency(p50: float | None) -> dict[str, float | None]:
    if p50 is None:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {"p50": p50, "p90": 2 * p50, "p99": 3 * p50, "max": 4 * p50}


def phase(name: str, refused: int) -> dict[str, Any]:
    return {
        "phase": name,
        "offered": "closed loop, concurrency 2",
        "calls": 100,
        "accepted": 100 - refused,
        "refused": refused,
        "deadline_exceeded": 0,
        "lost": 0,
        "not_sent": 0,
        "accepted_images_per_s": 3200.0,
        "accepted_latency_ms": latency(12.5),
        "refusal_latency_ms": latency(1.5 if refused else None),
        "max_past_deadline_ms": -1900.0,
        "queue_depth_max": 64,
        "server_cpu_pct": 90.0,
        "client_cpu_pct": 20.0,
        "server_saw": {
            "answered": {"OK": 100 - refused},
            "handler_ms": 8.0,
            "queue_wait_ms": 2.0,
            "inference_ms": 3.0,
            "batch_images": 48.0,
        },
    }


SERVER = ["python", "-m", "service.cli", "serve", "--grpc-port", "4242"]


def synthetic() -> dict[str, Any]:
    soak = {
        "settings": {
            "concurrency": 32,
            "call_timeout_s": 30.0,
            "window_s": 30.0,
            "server_command": SERVER,
        },
        "calls": 1000,
        "duration_s": 60.0,
        "calls_per_s": 16.7,
        "images_per_s": 50.0,
        "latency_ms": latency(20.0),
        "status": {"OK": 997, "UNAVAILABLE": 3},
        "server_cpu_pct": 95.0,
        "client_cpu_pct": 20.0,
        "replies_checked": 20,
        "replies_wrong": 0,
        "server_saw": {
            "answered": {"OK": 997},
            "handler_ms": 5.0,
            "queue_wait_ms": 1.0,
            "inference_ms": 2.0,
            "batch_images": 4.0,
            "handler_ms_by_method": {"Classify": 5.5, "FeatureMaps": 4.0},
        },
        "methods": {
            "Classify": {"calls": 750, "mean": 25.0, **latency(20.0)},
            "FeatureMaps": {"calls": 250, "mean": 11.0, **latency(9.0)},
        },
        "mix": [
            {"call": "Classify lenet5 x1", "weight": 3, "calls": 750, "errors": 3, **latency(20)},
            {"call": "FeatureMaps kirsch x1", "weight": 1, "calls": 250, "errors": 0, **latency(9)},
        ],
        "windows": [
            {"from_s": 0.0, "to_s": 30.0, "calls_per_s": 16.0, "images_per_s": 48.0, "errors": 3}
            | latency(21.0)
            | {"rss_mib": 120.0, "server_cpu_pct": 94.0},
            {"from_s": 30.0, "to_s": 60.0, "calls_per_s": 17.0, "images_per_s": 51.0, "errors": 0}
            | latency(19.0)
            | {"rss_mib": 131.0, "server_cpu_pct": 96.0},
        ],
        "memory": {
            "warmup_s": 12.0,
            "rss_ready_mib": 110.0,
            "rss_after_warmup_mib": 120.0,
            "rss_end_mib": 131.0,
            "rss_max_mib": 131.0,
            "growth_pct": 9.17,
        },
        "server_exit_code_after_sigterm": 0,
        "server_errors_logged": [],
        "goals": [goal("no errors", False), goal("flat memory", False), goal("lost", True)],
    }
    overload = {
        "settings": {
            "model": "lenet5",
            "images_per_call": 32,
            "max_queue_images": 64,
            "deadline_s": 2.0,
            "seconds": 30.0,
            "open_loop_factor": 4.0,
            "storm_concurrency": 256,
            "server_command": SERVER,
        },
        "phases": [phase("baseline", 0), phase("refusal storm", 40)],
        "queue_depth_trace": {"0": 10, "64": 2, "> 64": 0},
        "server_exit_code_after_sigterm": 0,
        "server_errors_logged": ["batch of 32 images for lenet5 failed"],
        "goals": [goal("refusals are fast", True)],
    }
    restart = {
        "settings": {
            "rounds": 2,
            "models": ["lenet5"],
            "images_per_check": 4,
            "server_command": SERVER,
        },
        "attempts": [
            {"attempt": 1, "serving_s": 1.2, "first_answer_s": 1.3, "same_answer": True},
            {"attempt": 2, "serving_s": 1.1, "first_answer_s": 1.25, "same_answer": False},
        ],
        "serving_s": {"min": 1.1, "median": 1.15, "max": 1.2},
        "first_answer_s": {"min": 1.25, "median": 1.275, "max": 1.3},
        "goals": [goal("ready again", True), goal("same answers", False)],
    }
    fuzz = {
        "command": "CNNSERVE_FUZZ_REPORT=f.json python -m pytest -q tests/integration/test_fuzz.py",
        "report_file": "f.json",
        "ran": False,
        "found": False,
        "goals": [goal("fuzz: no forbidden status", None)],
    }
    return {
        "command": "python -m bench.reliability --quick",
        "date": "2026-01-01 12:00:00 UTC",
        "quick": True,
        "load_average_start": [2.5, 2.0, 1.0],
        "load_average_end": [3.0, 2.0, 1.0],
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "platform": "Linux", "niceness": 15},
        "versions": {"python": "3.11.7", "grpcio": "1.0"},
        "scenarios": {"soak": soak, "overload": overload, "restart": restart, "fuzz": fuzz},
        "lost": [
            {"where": "soak", "calls": 1000, "lost": 0},
            {"where": "overload: baseline", "calls": 100, "lost": 2},
        ],
        "covered_elsewhere": [
            {
                "file": "tests/integration/test_faults.py",
                "summary": "Faults a real server survives.",
                "tests": ["test_sigterm_under_load"],
            }
        ],
    }


def rows_under(text: str, header: str) -> list[str]:
    """The body rows of the table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append(line)
    return body


def test_every_section_and_table_is_rendered() -> None:
    text = report.render(synthetic())
    assert "Generated by `python -m bench.reliability --quick`" in text
    assert "**Test CPU 9000**" in text and "`--quick` smoke run" in text
    for section in ("## Summary", "## Soak", "## Overload", "## Restart after kill -9"):
        assert section in text
    windows = rows_under(text, "| Window (s) |")
    assert len(windows) == 2 and windows[1].startswith("| 30–60 | 17 | 51 | 0 | 19 | 38 | 57 |")
    assert rows_under(text, "| Call | Share |")[0].startswith("| Classify lenet5 x1 | 75% | 750 |")
    assert "| growth after warm-up | +9.17% |" in text
    assert rows_under(text, "| Method |")[0] == "| Classify | 750 | 25 | 20 | 60 | 5.5 |"
    assert rows_under(text, "| Phase | Offered |")[1].startswith("| refusal storm |")
    assert len(rows_under(text, "| Round |")) == 2
    assert "Server: `cnnserve serve --grpc-port 4242`" in text
    assert "`batch of 32 images for lenet5 failed`" in text
    assert "`tests/integration/test_faults.py`: Faults a real server survives." in text
    assert "None" not in text and "nan" not in text


def test_missed_goals_are_shown_as_missed() -> None:
    text = report.render(synthetic())
    assert "3 of 7 goals met, **3 missed**, 1 not run." in text
    summary = rows_under(text, "| Goal | Target |")
    assert "| flat memory | flat memory target | flat memory measured | **missed** |" in summary
    assert "| ready again | ready again target | ready again measured | met |" in summary
    assert any(row.endswith("| not run |") for row in summary)
    # The same verdicts appear in each scenario's own table.
    assert (
        text.count("| same answers | same answers target | same answers measured | **missed** |")
        == 2
    )
    assert "Lost in all: **2** of 1,100 calls." in text


def test_a_missing_fuzz_report_says_how_to_make_one(tmp_path: Path) -> None:
    path = report.write(synthetic(), tmp_path / "docs" / "RELIABILITY.md")
    text = path.read_text()
    assert "No fuzz report at `f.json`" in text
    assert "Run `CNNSERVE_FUZZ_REPORT=f.json python -m pytest" in text


def test_a_fuzz_report_becomes_a_table_per_category() -> None:
    data = synthetic()
    data["scenarios"]["fuzz"] |= {
        "found": True,
        "file_written": "2026-01-01 11:00",
        "examples_per_property": 60,
        "cases": 12,
        "known_good_checks": 12,
        "status": {"INVALID_ARGUMENT": 9, "INTERNAL": 1, "OK": 2},
        "categories": {
            "encoded image": {"cases": 12, "status": {"INVALID_ARGUMENT": 9, "INTERNAL": 1}}
        },
        "goals": [goal("fuzz: no forbidden status", False)],
    }
    text = report.render(data)
    assert "12 hostile requests (60 examples per property)" in text
    assert "its report file is from 2026-01-01 11:00" in text
    assert "| encoded image | 12 | INVALID_ARGUMENT 9, INTERNAL 1 |" in text
    assert "| fuzz: no forbidden status | fuzz: no forbidden status target" in text
    assert text.count("fuzz: no forbidden status measured | **missed** |") == 2
