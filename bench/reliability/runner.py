"""Run the reliability scenarios in turn, write the JSON of everything, then the report.

Usage: `.venv/bin/python -m bench.reliability [--soak-seconds 600] [--quick]
[--out bench/results/reliability.json] [--docs docs/RELIABILITY.md]`. Exit status: 0 when every
goal was met, 1 when one was missed, 2 when there is nothing to measure (no models, no data).
The machine, versions, date, load average and the exact command go into the JSON beside the
figures: a figure means nothing without where and how it was taken.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.reliability import fuzz, overload, report, restart, soak
from bench.reliability.workload import SOAK_MODELS, Builder, missing_models, test_images

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("soak", "overload", "restart", "fuzz")
PACKAGES = ("cnnserve", "grpcio", "onnxruntime", "numpy", "protobuf", "pillow")
# Tests that cover what this benchmark does not; their docstrings are quoted in the report.
COVERED_ELSEWHERE = (
    "tests/integration/test_fuzz.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_hot_swap.py",
    "tests/integration/test_security.py",
    "tests/integration/test_devices_and_failures.py",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability",
        description="Soak, overload, kill -9 restart and fuzz counts against a real "
        "`cnnserve serve` on loopback; writes a JSON file and docs/RELIABILITY.md from it.",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--soak-seconds", type=float, help="soak length (default 600; quick 30)")
    parser.add_argument("--concurrency", type=int, default=32, help="soak calls in flight")
    parser.add_argument("--window-seconds", type=float, help="latency table rows (30; quick 5)")
    parser.add_argument("--overload-seconds", type=float, help="each overload phase (30; quick 10)")
    parser.add_argument("--restarts", type=int, help="kill -9 rounds (default 5; quick 3)")
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run; the fuzzer is not run"
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help="comma-separated scenarios (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/reliability.json"))
    parser.add_argument("--docs", type=Path, default=Path("docs/RELIABILITY.md"))
    parser.add_argument(
        "--fuzz-report",
        type=Path,
        default=Path("bench/results/fuzz.json"),
        help="the fuzzer's JSON report, written by running it (read only with --quick)",
    )
    parser.add_argument(
        "--logs", type=Path, help="server logs folder (default: beside --out, *-logs)"
    )
    return parser


def shown_python() -> str:
    """The interpreter as the user typed it: relative when it lives in the project."""
    path = Path(sys.executable)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_header(module: str, quick: bool, repository: Path) -> dict[str, Any]:
    """The opening fields of a suite's JSON: the command as typed, when, on what, from where."""
    return {
        "command": shlex.join([shown_python(), "-m", module, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": quick,
        "model_repository": str(repository),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "revision": revision(),
    }


def revision() -> str | None:
    """The commit the figures were measured at (a '+' when the tree had changes), if known.

    `$CNNSERVE_REVISION` names it where git cannot: a copy of the tree whose git metadata is
    not its own (a machine lent for a GPU run gets the files, not always the history)."""
    if named := os.environ.get("CNNSERVE_REVISION"):
        return named
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None  # not a git checkout (a copied tree)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    try:  # export.machine needs torch, which a serving-only install lacks
        from export.machine import cpu_model

        cpu = cpu_model()
    except ImportError:
        cpu = platform.processor() or platform.machine()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "niceness": os.nice(0),
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def covered_elsewhere(root: Path) -> list[dict[str, Any]]:
    """Each test file's docstring summary and its test names, read from the file."""
    covered = []
    for name in COVERED_ELSEWHERE:
        path = root / name
        if not path.exists():
            continue
        tree = ast.parse(path.read_text())
        doc = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
        tests = [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        ]
        covered.append({"file": name, "summary": doc, "tests": tests})
    return covered


def lost_calls(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    if "soak" in results:
        s = results["soak"]
        rows.append({"where": "soak", "calls": s["calls"], "lost": s["lost"]})
    if "overload" in results:
        for phase in results["overload"]["phases"]:
            rows.append(
                {
                    "where": f"overload: {phase['phase']}",
                    "calls": phase["calls"],
                    "lost": phase["lost"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    soak_s = args.soak_seconds or (30.0 if quick else 600.0)
    window_s = args.window_seconds or (5.0 if quick else 30.0)
    overload_s = args.overload_seconds or (10.0 if quick else 30.0)
    baseline_s = min(overload_s, 10.0) / (2 if quick else 1)
    rounds = args.restarts or (3 if quick else 5)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        print(f"--only: unknown scenarios {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    repository = args.model_repository
    missing = missing_models(repository) if repository.is_dir() else list(SOAK_MODELS)
    if missing and set(only) - {"fuzz"}:
        print(
            f"{repository}: no servable {', '.join(missing)}; run `make quick-models` "
            "(or pass --model-repository)",
            file=sys.stderr,
        )
        return 2
    logs = args.logs or args.out.with_name(args.out.stem + "-logs")  # made when a server starts
    started = time.time()
    data = run_header("bench.reliability", quick, repository)
    builder = Builder(test_images(), repository) if set(only) - {"fuzz"} else None
    results: dict[str, Any] = {}
    if "soak" in only:
        print(f"soak: {soak_s:g} s at concurrency {args.concurrency} ...", flush=True)
        assert builder is not None
        results["soak"] = soak.run(repository, logs, builder, soak_s, args.concurrency, window_s)
    if "overload" in only:
        print(f"overload: {baseline_s:g} s baseline, 2 x {overload_s:g} s overload ...", flush=True)
        assert builder is not None
        results["overload"] = overload.run(repository, logs, builder, overload_s, baseline_s)
    if "restart" in only:
        print(f"restart: {rounds} rounds of kill -9 ...", flush=True)
        assert builder is not None
        results["restart"] = restart.run(repository, logs, builder, rounds)
    if "fuzz" in only:
        print("fuzz: " + ("reading an earlier report" if quick else "running the fuzzer ..."))
        results["fuzz"] = fuzz.run(args.fuzz_report, not quick, ROOT, shown_python())
    data |= {
        "seconds": round(time.time() - started, 1),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
        "versions": versions(),
        "scenarios": results,
        "lost": lost_calls(results),
        "covered_elsewhere": covered_elsewhere(ROOT),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    report.write(data, args.docs)
    goals = [g for r in results.values() for g in r.get("goals", [])]
    for g in goals:
        verdict = {True: "met   ", False: "MISSED", None: "n/a   "}[g["met"]]
        print(f"  {verdict} {g['goal']}: {g['measured']} (goal: {g['target']})")
    print(f"wrote {args.out} and {args.docs}; server logs in {logs}")
    return 1 if any(g["met"] is False for g in goals) else 0
