"""Run the serving suite: raw ONNX Runtime, then every server at every point, then the report.

Usage: `.venv/bin/python -m bench.serving [--quick] [--repeats N] [--seconds S]
[--systems raw,native,oip,triton,naive,floor,floor-sync] [--allow-spinning off|on|both]
[--device cpu|cuda|cuda:N] [--out bench/results/serving.json] [--docs docs/BENCHMARKS.md]
[--changes bench/results/changes] [--gpu-data bench/results/serving-cuda.json]`. Exit status:
0 when every goal measured was met, 1 when one was missed, 2 when nothing could be measured
or the device asked for cannot be used.

`--device cuda` (or `cuda:N`, `make bench-gpu`) runs raw ONNX Runtime, cnnserve and the naive
server on ONNX Runtime's CUDA execution provider, checked before anything is measured
(`device`); Triton, CPU-only here, is skipped. A GPU run writes only its JSON, by default
bench/results/serving-cuda.json, and judges no goal (they are CPU goals): docs/BENCHMARKS.md
gets its figures, in a section of their own after the CPU ones, from
`python -m bench.serving.report` or the next CPU run, which both read the CPU JSON and the GPU
JSON beside it (`--gpu-data`) when it exists.

Repeats go round every server in turn (start, measure each point once, stop), so a slow spell
on the machine touches every system alike, and every repeat times each server's start-up too.
The machine, versions, date, load average and the command go into the JSON beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.reliability.runner import machine, run_header, versions
from bench.reliability.server import Server
from bench.reliability.workload import test_images
from bench.serving import changes, device, footprint, goals, raw, report, triton, workload
from bench.serving import measure as measuring
from bench.serving.floor_server import FloorServer
from bench.serving.load import Load
from bench.serving.naive_server import NaiveServer
from bench.serving.processes import ServerProcess, tree_usage
from bench.serving.workload import MODELS, QUICK_SET, Workload

SYSTEMS = ("raw", "native", "oip", "triton", "naive", "floor", "floor-sync")
# the synchronous floor's handler threads: one per call in flight at the goals' concurrency (32)
SYNC_FLOOR_WORKERS = 32
CLASSIFY = "/cnnserve.v1.Inference/Classify"
CALL_TIMEOUT_S = 30.0
SPINNING = {"off": (False,), "on": (True,), "both": (False, True)}
CPU_JSON, GPU_JSON = report.CPU_DATA, report.GPU_DATA
DOCS = Path("docs/BENCHMARKS.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description="Throughput, latency, CPU and memory of cnnserve beside raw ONNX Runtime, "
        "Triton (PyTriton), a naive grpc.aio server and the gRPC floor (a prebuilt reply), on "
        "loopback; writes a JSON file and docs/BENCHMARKS.md from it.",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--repeats", type=int, help="runs of every point (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="each run of a point (default 10; quick 2)")
    parser.add_argument(
        "--concurrency", help="comma-separated calls in flight (default 1,8,32,128; quick 1,8,32)"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated systems")
    parser.add_argument(
        "--allow-spinning",
        choices=sorted(SPINNING),
        default="off",
        help="ONNX Runtime thread spinning in our server (both: measure it twice)",
    )
    parser.add_argument(
        "--family",
        action=argparse.BooleanOptionalAction,
        help="export the whole family and report memory with it loaded (default: on; quick off)",
    )
    parser.add_argument(
        "--device",
        type=device.parse,
        default="cpu",
        help="cpu | cuda | cuda:N: where raw ONNX Runtime, cnnserve and the naive server run "
        "inference (cuda: ONNX Runtime's CUDA execution provider; Triton is then skipped)",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("bench/models"))
    parser.add_argument(
        "--out", type=Path, help=f"the JSON written (default {CPU_JSON}; on a GPU {GPU_JSON})"
    )
    parser.add_argument(
        "--docs", type=Path, help=f"the report written (default {DOCS}; a GPU run writes none)"
    )
    parser.add_argument(
        "--gpu-data",
        type=Path,
        default=GPU_JSON,
        help="a GPU run's JSON, rendered in --docs after this CPU run's figures if it exists",
    )
    parser.add_argument(
        "--changes",
        type=Path,
        default=changes.FOLDER,
        help="bench.serving.compare JSON files the report lists, one per change",
    )
    parser.add_argument("--logs", type=Path, help="server logs (default: beside --out, *-logs)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with --out and --docs settled by the device (argparse exits 2 on errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    gpu = device.is_gpu(args.device)
    if gpu and args.docs:
        parser.error(
            "--docs: a GPU run writes only its JSON; python -m bench.serving.report "
            "renders docs/BENCHMARKS.md from both runs' JSON"
        )
    args.out = args.out or (GPU_JSON if gpu else CPU_JSON)
    args.docs = None if gpu else args.docs or DOCS
    return args


class Requests:
    """Every workload's requests, built once for both clients."""

    def __init__(self, works: list[Workload]) -> None:
        images = test_images()
        self.arrays = {
            w.name: workload.pixels(images, w.images, seed=i) for i, w in enumerate(works)
        }
        self.classify = {w.name: workload.classify_requests(w, self.arrays[w.name]) for w in works}

    def load(
        self, system: str, work: Workload, address: str, concurrency: int, seconds: float
    ) -> Load:
        common = {
            "address": address,
            "concurrency": concurrency,
            "seconds": seconds,
            "timeout": CALL_TIMEOUT_S,
            "images": work.images,
            "kinds": len(work.kinds),
        }
        if system.startswith(("native", "floor")):  # the floors answer Classify
            return Load(client="grpc", method=CLASSIFY, payloads=self.classify[work.name], **common)
        model = work.triton_model if system == "triton" and work.triton_model else work.model
        arrays = tuple(self.arrays[work.name])
        return Load(client="tritonclient", model=model, arrays=arrays, outputs=work.kinds, **common)


def server_for(
    kind: str,
    spin: bool,
    models: dict[str, dict[str, Any]],
    repository: Path,
    logs: Path,
    works: list[Workload],
    on: str = "cpu",
) -> Server | ServerProcess:
    """The server of one kind; `on` is the device its inference runs on (not the floor's)."""
    log = logs / f"{kind}{'-spin' if spin else ''}.log"
    if kind == "cnnserve":
        flag = "--allow-spinning" if spin else "--no-allow-spinning"
        return Server(repository, tuple(models), log, extra=(flag, "--device", on))
    if kind == "naive":
        paths = {m: Path(info["path"]) for m, info in models.items()}
        return NaiveServer(log=log, models=list(models), paths=paths, device=on)
    if kind in ("floor", "floor-sync"):  # replies prebuilt for every image count asked for
        floored = [w for w in works if kind in w.systems]
        images = sorted({w.images for w in floored})
        workers = SYNC_FLOOR_WORKERS if kind == "floor-sync" else 0
        maps = {
            name: tuple(shape)
            for w in floored
            for name, shape in models[w.model].get("features", [])
            if name in w.outputs
        }
        return FloorServer(log=log, models=[], images=images, sync_workers=workers, features=maps)
    bindings = triton.bindings(models)
    return triton.TritonServer(
        log=log,
        models=[b["name"] for b in bindings],
        bindings=bindings,
        workspace=logs / "triton-workspace",
        threads=os.cpu_count() or 1,
    )


def apis(kind: str, spin: bool, systems: list[str]) -> list[str]:
    """The systems one server process is measured as (ours speaks both APIs)."""
    if kind != "cnnserve":
        return [kind]
    return [s + ("+spin" if spin else "") for s in ("native", "oip") if s in systems]


def run_points(
    server: Server | ServerProcess,
    system: str,
    works: list[Workload],
    requests: Requests,
    settings: dict[str, Any],
    runs: dict[tuple[str, str, int], list[dict[str, Any]]],
    workdir: Path,
) -> None:
    """One run of every point of `system` on a started server, added to `runs`."""
    totals = server.totals if isinstance(server, Server) else None  # cnnserve's own metrics
    for work in works:
        if system.split("+")[0] not in work.systems:
            continue
        warm = requests.load(system, work, server.address, 8, settings["warmup_s"])
        measuring.once(server.pid, warm, workdir)
        for c in work.concurrencies:
            plan = requests.load(system, work, server.address, c, settings["seconds"])
            result = measuring.once(server.pid, plan, workdir, totals)
            runs.setdefault((system, work.name, c), []).append(result)
            print(
                f"  {system:12} {work.name:22} c={c:<4} {result['images_per_s']:>9,.0f} img/s"
                f"  p50 {result['p50']} ms  p99 {result['p99']} ms  errors {result['errors']}",
                flush=True,
            )


def measure_servers(
    args: argparse.Namespace,
    settings: dict[str, Any],
    models: dict[str, dict[str, Any]],
    works: list[Workload],
    requests: Requests,
    logs: Path,
    skipped: dict[str, str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every repeat: each server started, warmed, measured at every point, stopped."""
    systems = settings["systems"]
    kinds: list[tuple[str, bool]] = []
    if {"native", "oip"} & set(systems):
        kinds += [("cnnserve", spin) for spin in settings["allow_spinning"]]
    if "triton" in systems:
        reason = device.TRITON_CPU_ONLY if device.is_gpu(args.device) else triton.unavailable()
        if reason:
            skipped["triton"] = reason
        else:
            kinds.append(("triton", False))
    if "naive" in systems:
        kinds.append(("naive", False))
    kinds += [(floor, False) for floor in ("floor", "floor-sync") if floor in systems]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    servers: dict[str, dict[str, Any]] = {}
    workdir = logs / "load"
    for repeat in range(settings["repeats"]):
        turn = repeat % max(1, len(kinds))  # each repeat starts with another server
        for kind, spin in kinds[turn:] + kinds[:turn]:
            label = kind + ("+spin" if spin else "")
            print(f"[{repeat + 1}/{settings['repeats']}] {label}: starting", flush=True)
            repository = args.model_repository
            server = server_for(kind, spin, models, repository, logs, works, args.device)
            try:
                startup = server.start()
            except BaseException as error:
                server.stop()  # whatever it left running
                if kind != "triton" or not isinstance(error, RuntimeError):
                    raise
                skipped["triton"] = "Triton did not start: " + str(error).splitlines()[0]
                print(f"  skipped: {skipped['triton']}", flush=True)
                kinds.remove((kind, spin))
                continue
            info = servers.setdefault(
                label, {"command": server.command(), "startup_s": [], "rss_ready_mib": []}
            )
            info["startup_s"].append(round(startup, 3))
            info["rss_ready_mib"].append(round(tree_usage(server.pid).rss_bytes / 2**20, 1))
            try:
                if kind == "cnnserve":  # the provider each model really runs on, as it says
                    info["providers"] = device.served(server.address)
                    device.check_served(args.device, info["providers"])
                for system in apis(kind, spin, systems):
                    run_points(server, system, works, requests, settings, runs, workdir)
            finally:
                info.setdefault("exit_codes", []).append(server.stop())
    by_work = {w.name: w for w in works}
    measured = [
        {
            "system": system,
            "workload": name,
            "model": by_work[name].model,
            "images_per_request": by_work[name].images,
            "outputs": list(by_work[name].outputs),
            "concurrency": c,
            "runs": results,
            "summary": measuring.summarise(results),
        }
        for (system, name, c), results in runs.items()
    ]
    return measured, servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not systems:
        print(f"--systems: unknown {', '.join(sorted(unknown)) or 'none given'}", file=sys.stderr)
        return 2
    try:
        device.check_available(args.device)  # before anything is exported or started
        return run(args, systems)
    except device.DeviceError as error:
        print(f"bench.serving: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, systems: list[str]) -> int:
    quick = args.quick
    concurrencies = (
        tuple(int(c) for c in args.concurrency.split(","))
        if args.concurrency
        else ((1, 8, 32) if quick else (1, 8, 32, 128))
    )
    settings: dict[str, Any] = {
        "systems": systems,
        "seconds": args.seconds or (2.0 if quick else 10.0),
        "repeats": args.repeats or (1 if quick else 3),
        "concurrencies": list(concurrencies),
        "warmup_s": 0.5 if quick else 2.0,
        "raw_seconds": 0.5 if quick else 2.0,
        "raw_batches": list(raw.QUICK_BATCHES if quick else raw.BATCHES),
        "allow_spinning": list(SPINNING[args.allow_spinning]),
        "baselines_allow_spinning": False,
        "call_timeout_s": CALL_TIMEOUT_S,
        "cores": os.cpu_count(),
        "device": args.device,
    }
    family = not quick if args.family is None else args.family
    repository = args.model_repository
    logs = args.logs or args.out.with_name(args.out.stem + "-logs")
    started = time.time()
    data = run_header("bench.serving", quick, repository) | {"settings": settings}
    # Read before any CUDA library loads: export.machine imports torch, whose CUDA libraries
    # need not agree with onnxruntime-gpu's.
    data["machine"] = machine()
    exported = workload.export(repository, (*MODELS, *QUICK_SET))
    if family:
        exported += workload.export(repository, (), everything=True)
    models = {m: workload.describe(repository, m) for m in MODELS}
    # One batch of each model on the device, read back, before anything is measured.
    probed = device.probe_all(args.device, {m: Path(info["path"]) for m, info in models.items()})
    data["device"] = device.record(args.device, probed)
    shown = data["device"]["gpu"] or {}
    print(f"device {args.device}: {data['device']['provider']} {shown.get('name', '')}", flush=True)
    works = workload.workloads(concurrencies, quick)
    servers_wanted = set(systems) - {"raw"}
    requests = Requests(works) if servers_wanted else None  # the test images, found up front
    skipped: dict[str, str] = {}
    if "raw" in systems:
        print("raw ONNX Runtime: every batch size, spinning off and on ...", flush=True)
        data["raw"] = raw.run(
            models,
            (False, True),
            tuple(settings["raw_batches"]),
            settings["raw_seconds"],
            settings["repeats"],
            args.device,
        )
    measured, servers = (
        measure_servers(args, settings, models, works, requests, logs, skipped)
        if requests is not None
        else ([], {})
    )
    print("start-up and memory ...", flush=True)
    everything = workload.family(repository) if family else None
    try:  # the last figures of a long run: their failure must not lose the others
        data["footprint"] = footprint.run(
            repository, QUICK_SET, everything, settings["repeats"], logs, args.device
        )
    except Exception as error:  # noqa: BLE001
        print(f"  start-up and memory not measured: {error}", flush=True)
        data["footprint"] = {"error": str(error).splitlines()[0]}
    triton_ran = "triton" in systems and "triton" not in skipped
    data |= {
        "seconds": round(time.time() - started, 1),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "versions": versions() | {"tritonclient": _version("tritonclient")},
        "triton": {
            "note": triton.BACKEND_NOTE,
            "versions": triton.versions() if triton_ran else {},
        },
        "exported": exported,
        "models": models,
        "workloads": [
            {
                "name": w.name,
                "model": w.model,
                "images": w.images,
                "outputs": list(w.outputs),
                "kinds": [list(k) for k in w.kinds],
            }
            for w in works
        ],
        "points": measured,
        "servers": servers,
        "skipped": skipped,
    }
    # The goals are CPU goals (issue 8): a GPU run's figures are shown without verdicts.
    data["goals"] = [] if device.is_gpu(args.device) else goals.compute(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if device.is_gpu(args.device) and (kept := report.keep_previous(args.out)):
        print(f"the previous GPU run is kept as {kept}")
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    if args.docs:  # a CPU run; a GPU run's JSON reaches the docs through bench.serving.report
        gpu = report.load(args.gpu_data)
        report.write(data | {"changes": changes.load(args.changes)}, args.docs, gpu)
    for g in data["goals"]:
        verdict = {True: "met   ", False: "MISSED", None: "n/a   "}[g["met"]]
        print(f"  {verdict} {g['goal']}: {g['measured']} (goal: {g['target']})")
    for system, reason in skipped.items():
        print(f"  skipped {system}: {reason}")
    if args.docs:
        print(f"wrote {args.out} and {args.docs}; server logs in {logs}")
    else:
        print(
            f"wrote {args.out}; server logs in {logs}. The report, with the CPU figures: "
            f"python -m bench.serving.report --gpu-data {args.out}"
        )
    if not measured and "raw" not in data:
        return 2
    return 1 if any(g["met"] is False for g in data["goals"]) else 0


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
