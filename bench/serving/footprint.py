"""Start-up to ready with the quick set, and resident memory with the whole family loaded.

`cnnserve serve` is launched as a user would launch it and timed to grpc health SERVING (the
moment a load balancer would send traffic); its resident memory is read then, after every
model has loaded and run its warm-up batch. Every start gets the suite's `--device`, and the
provider each model reports is checked, so a model that failed to load on the GPU cannot make
a start-up look fast.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.reliability.server import Server
from bench.serving import device
from bench.serving.processes import tree_usage

MiB = 2**20


def started(
    repository: Path,
    models: tuple[str, ...],
    log: Path,
    timeout: float = 120,
    on: str = "cpu",
) -> dict[str, Any]:
    """Launch, wait for SERVING, read memory, stop: one start-up's figures."""
    server = Server(repository, models, log, extra=("--device", on))
    try:
        seconds = server.start(timeout)
        usage = tree_usage(server.pid)
        device.check_served(on, device.served(server.address))
    finally:
        code = server.stop()
    return {
        "startup_s": round(seconds, 3),
        "rss_mib": round(usage.rss_bytes / MiB, 1),
        "exit_code": code,
        "command": server.command()[1:],
    }


def run(
    repository: Path,
    quick_set: tuple[str, ...],
    family: list[str] | None,
    repeats: int,
    logs: Path,
    on: str = "cpu",
) -> dict[str, Any]:
    """`repeats` start-ups with the quick set; one with the family when it was exported."""
    log = logs / "footprint-quick-set.log"
    runs = [started(repository, quick_set, log, on=on) for _ in range(repeats)]
    out: dict[str, Any] = {
        "quick_set": {
            "models": list(quick_set),
            "startup_s": [r["startup_s"] for r in runs],
            "startup_s_median": round(statistics.median(r["startup_s"] for r in runs), 3),
            "rss_mib": statistics.median(r["rss_mib"] for r in runs),
            "command": runs[0]["command"],
        }
    }
    if family is None:
        out["family"] = {"skipped": "--no-family, the default with --quick"}
    else:
        log = logs / "footprint-family.log"
        one = started(repository, tuple(family), log, timeout=900, on=on)
        out["family"] = {"models": family, **one}
    return out
