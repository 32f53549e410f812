"""`python -m bench.serving.compare REV`: one serving change measured before and after.

A performance commit should quote its effect, measured the same way on both sides. This checks
REV out into a temporary `git worktree` ("before") and compares it with the working tree as it
is, uncommitted changes included ("after"): each round starts our server from one tree, warms
it, drives one load point with the suite's load process, reads the server's CPU time, stops it,
then does the same for the other tree. The order alternates each round (before, after, after,
before, ...), so a machine that gets busier or quieter over the run tilts neither side. Each
server runs its own tree's code (cwd and PYTHONPATH are the tree, checked before measuring);
the client, the requests and the model repository are the same for both sides.

The suite's modules are imported in the functions that use them, not at the top: every load
process is spawned, so it imports this module as its main, and it must not have loaded our
Open Inference Protocol protos before tritonclient loads its own (both define package
`inference`, and one descriptor pool refuses the second).

Usage: `.venv/bin/python -m bench.serving.compare HEAD~1 [--model lenet5] [--system native|oip]
[--concurrency 32] [--images-per-request 1] [--seconds 10] [--rounds 3] [--warmup 2]
[--model-repository bench/models] [--server-args "--max-queue-delay-ms 1"] [--after-args FLAGS]
[--json PATH]`. With `--after-args`, the after server also gets those flags: `compare HEAD
--after-args "--max-queue-delay-ms 2"` measures a setting instead of a code change.
It prints a table per round, the median of each figure per side with the after/before ratio,
and one line to paste into the commit message. Exit status 1 when a call failed or a reply
was wrong on either side (the figures would not compare like with like), else 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.reliability.server import Server

if TYPE_CHECKING:
    from bench.serving.runner import Requests
    from bench.serving.workload import Workload

ROOT = Path(__file__).resolve().parents[2]  # the working tree: the "after" side
SIDES = ("before", "after")
# (key in a run's figures, label, unit): what the tables and the summary line show
FIGURES = (
    ("images_per_s", "throughput", "img/s"),
    ("p50", "p50", "ms"),
    ("p99", "p99", "ms"),
    ("cpu_ms_per_call", "server CPU/call", "ms"),
    ("server_cpu_s_per_1000", "server CPU/1,000 img", "s"),
    # --feature only: p50 of the calls asking for the map minus p50 of those that do not
    ("paired_overhead_ms", "feature map overhead", "ms"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.compare",
        description="Throughput, latency and server CPU of our server at git revision REV "
        "(before) and in the working tree (after), one load point, rounds in alternating order.",
    )
    parser.add_argument("rev", metavar="REV", help="the git revision to compare against")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument(
        "--system",
        choices=("native", "oip"),
        default="native",
        help="native: our Classify API; oip: Open Inference Protocol through tritonclient",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument(
        "--feature",
        default="",
        help="a feature output, e.g. features.layer1: calls alternate between asking for it "
        "beside the probabilities and not, and what it costs is measured in each run",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured load per side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured load first (s)")
    parser.add_argument("--model-repository", type=Path, default=Path("bench/models"))
    parser.add_argument(
        "--server-args", default="", help='flags for both servers, e.g. "--max-queue-delay-ms 1"'
    )
    parser.add_argument(
        "--after-args",
        default="",
        help="flags for the after server only, on top of --server-args: with REV HEAD and a "
        "clean tree, what a setting does",
    )
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--logs", type=Path, default=Path("bench/results/compare-logs"))
    return parser


def order(rounds: int) -> list[tuple[str, ...]]:
    """The sides in each round: before first in odd rounds, after first in even ones."""
    return [SIDES if r % 2 == 0 else SIDES[::-1] for r in range(rounds)]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """REV checked out, detached, in a temporary folder; removed however the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="cnnserve-compare-"))
    tree = folder / "tree"
    try:
        git("worktree", "add", "--detach", "--quiet", str(tree), rev)
        yield tree
    finally:
        try:
            git("worktree", "remove", "--force", str(tree))
        except subprocess.CalledProcessError:  # never added, or half-added: tidy by hand
            shutil.rmtree(tree, ignore_errors=True)
            git("worktree", "prune")
        shutil.rmtree(folder, ignore_errors=True)


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes `tree`'s packages win over the editable install."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    return env


def imported_from(tree: Path) -> Path:
    """Where a process started as the server is (cwd and PYTHONPATH) finds `service`."""
    code = "import service; print(service.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env=tree_env(tree),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.strip()).resolve().parent


def run_side(
    server: Server, requests: Requests, work: Workload, args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    """Start, warm, measure once, stop: one side's figures for one round."""
    from bench.serving import measure

    try:
        startup = server.start()  # one that never gets ready is stopped below all the same
        if args.warmup > 0:
            warm = requests.load(args.system, work, server.address, args.concurrency, args.warmup)
            measure.once(server.pid, warm, logs / "load")
        plan = requests.load(args.system, work, server.address, args.concurrency, args.seconds)
        result = measure.once(server.pid, plan, logs / "load")
    finally:
        code = server.stop()
    answered = result["calls"] - result["errors"]
    result["cpu_ms_per_call"] = (
        round(1000 * result["server_cpu_s"] / answered, 4) if answered else None
    )
    return result | {"startup_s": round(startup, 2), "exit_code": code}


def number(value: float | None, scale: float | None = None) -> str:
    """Three significant figures or so, thousands separated; `scale` (the other side's value)
    gives both sides of a comparison the same decimals, so 1.10 -> 0.80 does not read 0.800."""
    if value is None:
        return "-"
    size = max(abs(value), abs(scale or 0))
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
    return f"{value:,.{digits}f}"


def ratio(before: float | None, after: float | None) -> float | None:
    return round(after / before, 3) if before and after is not None else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per figure: the median of each side over rounds and after/before."""
    from bench.serving.measure import spread_pct

    out: dict[str, dict[str, Any]] = {}
    for key, _, _ in FIGURES:
        medians = {}
        for side in SIDES:
            values = [r[key] for r in runs if r["side"] == side and r.get(key) is not None]
            medians[side] = round(statistics.median(values), 4) if values else None
        out[key] = medians | {"ratio": ratio(medians["before"], medians["after"])}
    for side in SIDES:
        throughput = [r["images_per_s"] for r in runs if r["side"] == side]
        out["images_per_s"][f"{side}_spread_pct"] = spread_pct(throughput)
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain columns, names left and figures right, so the digits line up."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(
            [
                row[0].ljust(widths[0]),
                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
            ]
        ).rstrip()
        for row in lines
    )


def round_table(runs: list[dict[str, Any]]) -> str:
    header = ["side", *(f"{label} ({unit})" for _, label, unit in FIGURES), "errors", "start s"]
    rows = [
        [
            r["side"],
            *(number(r.get(key)) for key, _, _ in FIGURES),
            str(r["errors"]),
            number(r["startup_s"]),
        ]
        for r in runs
    ]
    return table(header, rows)


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    header = ["median", "before", "after", "after/before"]
    rows = []
    for key, label, unit in FIGURES:
        s = summary[key]
        shown = "-" if s["ratio"] is None else f"x{s['ratio']:.2f}"
        before, after = number(s["before"], s["after"]), number(s["after"], s["before"])
        rows.append([f"{label} ({unit})", before, after, shown])
    spread = summary["images_per_s"]
    rows.append(
        [
            "throughput spread (%)",
            number(spread["before_spread_pct"]),
            number(spread["after_spread_pct"]),
            "",
        ]
    )
    return table(header, rows)


def one_line(rev: str, commit: str, settings: dict[str, Any], summary: dict[str, Any]) -> str:
    """The sentence a commit message quotes: the point, throughput, p99, CPU per call."""

    def change(key: str, label: str, unit: str) -> str:
        s = summary[key]
        shown = "" if s["ratio"] is None else f" (x{s['ratio']:.2f})"
        before, after = number(s["before"], s["after"]), number(s["after"], s["before"])
        return f"{label} {before} -> {after} {unit}{shown}"

    feature = settings.get("feature")
    point = (
        f"{settings['model']} {settings['system']} c={settings['concurrency']} "
        f"x{settings['images_per_request']} img" + (f" ± {feature}" if feature else "")
    )
    if settings.get("after_args"):
        point += f", after with {shlex.join(settings['after_args'])}"
    shown = ("images_per_s", "p99", "cpu_ms_per_call") + (
        ("paired_overhead_ms",) if feature else ()
    )
    figures = ", ".join(change(k, label, unit) for k, label, unit in FIGURES if k in shown)
    n = settings["rounds"]
    rounds = f"{n} round{'s' if n != 1 else ''} of {settings['seconds']:g} s"
    return f"bench.serving.compare {rev} ({commit}): {point}: {figures}, {rounds}"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What was measured, for the JSON and the summary line; server flags split as a shell would."""
    names = ("model", "system", "concurrency", "images_per_request", "feature", "seconds")
    names += ("rounds",)
    return {k: getattr(args, k) for k in names} | {
        "warmup_s": args.warmup,
        "server_args": shlex.split(args.server_args),
        "after_args": shlex.split(args.after_args),
        "cores": os.cpu_count(),
    }


def measure_rounds(
    args: argparse.Namespace,
    data: dict[str, Any],
    requests: Requests,
    work: Workload,
    repository: Path,
    logs: Path,
) -> list[dict[str, Any]] | None:
    """Every round, in `order`, inside a worktree of REV; None if a tree imports the wrong code.

    Where each side's `service` came from goes into `data`, so the JSON shows it.
    """
    extra = tuple(shlex.split(args.server_args))
    flags = {"before": extra, "after": extra + tuple(shlex.split(args.after_args))}
    runs: list[dict[str, Any]] = []
    with worktree(args.rev) as before_tree:
        trees = {"before": before_tree, "after": ROOT}
        for side, tree in trees.items():
            found = imported_from(tree)
            if found != (tree / "service").resolve():
                print(f"{side}: `service` comes from {found}, not {tree}", file=sys.stderr)
                return None
            data[side]["service"] = str(found)
            print(f"{side}: {tree} (service from {found})", flush=True)
        for n, sides in enumerate(order(args.rounds), 1):
            this_round = []
            for side in sides:
                log = logs / f"{side}-{n}.log"
                tree = trees[side]
                server = Server(
                    repository, (args.model,), log, flags[side], cwd=tree, env=tree_env(tree)
                )
                result = {"round": n, "side": side} | run_side(server, requests, work, args, logs)
                this_round.append(result)
            runs += this_round
            print(f"\nround {n}/{args.rounds}\n{round_table(this_round)}", flush=True)
    return runs


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers, worktree


def main(argv: list[str] | None = None) -> int:
    from bench.reliability.runner import shown_python
    from bench.serving import workload
    from bench.serving.runner import Requests
    from bench.serving.workload import Workload

    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.rounds, args.concurrency, args.images_per_request) < 1 or args.seconds <= 0:
        parser.error("--rounds, --concurrency, --images-per-request and --seconds must be > 0")
    signal.signal(signal.SIGTERM, _terminated)
    try:
        commit = git("rev-parse", "--short", "--verify", f"{args.rev}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"not a git revision: {args.rev}", file=sys.stderr)
        return 2
    repository = args.model_repository.resolve()  # the servers run from other folders
    logs = args.logs.resolve()
    workload.export(repository, (args.model,))
    name = f"{args.model} x{args.images_per_request}"
    outputs = ("probabilities", args.feature) if args.feature else ("probabilities",)
    work = Workload(
        name + (f" ± {args.feature}" if args.feature else ""),
        args.model,
        args.images_per_request,
        outputs,
        (args.concurrency,),
        paired=bool(args.feature),
    )
    settings = settings_of(args)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    data: dict[str, Any] = {
        "command": shlex.join([shown_python(), "-m", "bench.serving.compare", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "before": {"rev": args.rev, "commit": commit},
        "after": {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": dirty},
        "model_repository": str(repository),
        "settings": settings,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        runs = measure_rounds(args, data, Requests([work]), work, repository, logs)
    finally:  # a signal can leave a load process waiting on a server that is gone
        for child in multiprocessing.active_children():
            child.terminate()
    if runs is None:
        return 2
    summary = summarise(runs)
    line = one_line(args.rev, commit, settings, summary)
    data |= {
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        "summary": summary,
        "line": line,
    }
    print(f"\nmedians over {len(runs) // 2} rounds\n{summary_table(summary)}\n\n{line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = [r for r in runs if r["errors"] or r["replies_wrong"]]
    for r in bad:
        log = logs / f"{r['side']}-{r['round']}.log"
        print(
            f"round {r['round']} {r['side']}: {r['errors']} failed calls {r['status']}, "
            f"{r['replies_wrong']} wrong replies; server log {log}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":  # spawned load processes import this module without running it
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers and the worktree are gone by now
        sys.exit(130)
