"""Fuzz case counts: run tests/integration/test_fuzz.py with its JSON report, or read one.

The fuzzer itself is a test (it asserts every case's status and message); this only runs it with
CNNSERVE_FUZZ_REPORT set and carries its per-category counts into the reliability report. With
`--quick` it is not run, and a report file left by an earlier run is included if there is one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.reliability import stats

TEST = "tests/integration/test_fuzz.py"
# Statuses no fuzz case may end in: the server broke, hid a bug, or hung.
FORBIDDEN = ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "CANCELLED")
TIMEOUT_S = 3600


def command(report: Path, python: str) -> str:
    return f"CNNSERVE_FUZZ_REPORT={shlex.quote(str(report))} {python} -m pytest -q {TEST}"


def run(report: Path, execute: bool, root: Path, python: str) -> dict[str, Any]:
    result: dict[str, Any] = {"command": command(report, python), "report_file": str(report)}
    if execute:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.unlink(missing_ok=True)  # a stale file must not pass for this run's
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
            cwd=root,
            env={**os.environ, "CNNSERVE_FUZZ_REPORT": str(report.resolve())},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        result |= {
            "ran": True,
            "pytest_exit_code": done.returncode,
            "pytest_summary": (done.stdout.strip().splitlines() or [""])[-1],
            "seconds": round(time.monotonic() - started, 1),
        }
    else:
        result["ran"] = False
    if not report.exists():
        result["found"] = False
        result["goals"] = [stats.goal("fuzz: no forbidden status", "fuzz run", "not run", None)]
        return result
    data = json.loads(report.read_text())
    modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(report.stat().st_mtime))
    result |= {"found": True, "file_written": modified, **data}
    bad = {s: n for s, n in data.get("status", {}).items() if s in FORBIDDEN}
    result["goals"] = [
        stats.goal(
            "fuzz: no forbidden status",
            "no case ends " + ", ".join(FORBIDDEN),
            ", ".join(f"{s} {n}" for s, n in bad.items())
            or f"none in {data.get('cases', 0)} cases",
            not bad,
        )
    ]
    if execute:
        passed = result["pytest_exit_code"] == 0
        result["goals"].append(
            stats.goal(
                "fuzz: every case in an allowed status",
                "pytest passes",
                result["pytest_summary"] or f"exit code {result['pytest_exit_code']}",
                passed,
            )
        )
    return result
