"""The whole family in one command: several members at once on a multi-core CPU, longest first.

Why in parallel: on a 2-core CPU, PyTorch splitting each small convolution of a 128-image step
across two threads leaves part of both cores waiting, while two single-threaded trainings keep
both busy (`bench/train_jobs.py` measures each member both ways). Why longest first: the run
ends when its last lane does, so the long trainings start at once and the short ones fill in.
Each member's length is measured, not guessed: a few training steps on the threads it will get,
times the steps its recipe takes (MFLOPs alone mispredict the branchy Inception members).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from export import machine, records
from export.pipeline import ExportRequest

# Appended to by every `cnnserve-export all` run that trained something: the wall time that
# `make models` took, which the model table sets against its two-hour budget.
RUNS_FILE = ".family-runs.json"
PROBE_STEPS = 2
# What became of a member in a run.
TRAINED, SKIPPED, FAILED, INT8_FAILED = "trained", "skipped", "failed", "trained, int8 failed"
FAILURES = (FAILED, INT8_FAILED)
TRAIN_IMAGES = 60_000


@dataclass(frozen=True)
class Planned:
    """One member to train, with the training time its measured steps predict."""

    request: ExportRequest
    seconds: float


def parse_jobs(text: str) -> int | None:
    """`--jobs N` or `auto` (None: decided from the cores and the device)."""
    if text == "auto":
        return None
    jobs = int(text)
    if jobs < 1:
        raise ValueError(f"--jobs must be auto or at least 1; got {text}")
    return jobs


def choose_jobs(requested: int | None, models: int, device: str, cores: int) -> int:
    """auto: one training per core on a CPU (at most one per model), one on a GPU."""
    if requested is not None:
        return max(1, min(requested, models))
    if device != "cpu":
        return 1
    return max(1, min(cores, models))


def step_seconds(
    request: ExportRequest,
    threads: int,
    steps: int = PROBE_STEPS,
    channels_last: bool | None = None,
) -> float:
    """Wall time of one training step of `request`'s model and recipe, after a warm step.

    `channels_last` overrides the recipe's tensor layout (bench/train_layout.py races both).
    """
    import torch
    import torch.nn.functional as F

    from export.registry import create_model, get_entry

    recipe = get_entry(request.model).recipe.override(**(request.recipe or {}))
    if not recipe.trainable:
        return 0.0
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nhwc = recipe.channels_last if channels_last is None else channels_last
    layout = torch.channels_last if nhwc else torch.contiguous_format
    model = create_model(request.model, **(request.options or {})).train()
    model.to(memory_format=layout)
    x = torch.rand(recipe.batch_size, 1, 28, 28).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (recipe.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    started = 0.0
    for step in range(steps + 1):
        if step == 1:  # the first step pays for allocation
            started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def planned_seconds(request: ExportRequest, step: float) -> float:
    """The recipe's steps (or `max_steps`) times one step's time."""
    from export.registry import get_entry

    recipe = get_entry(request.model).recipe.override(**(request.recipe or {}))
    images = min(request.train_limit or TRAIN_IMAGES, TRAIN_IMAGES)
    steps = recipe.epochs * math.ceil(images / recipe.batch_size)
    if request.max_steps is not None:
        steps = min(steps, request.max_steps)
    return steps * step


def plan(requests: list[ExportRequest], threads: int) -> list[Planned]:
    """Each member's training time from two measured steps on `threads`, longest first."""
    return longest_first(
        [Planned(r, planned_seconds(r, step_seconds(r, threads))) for r in requests]
    )


def describe_plan(planned: list[Planned], jobs: int, threads: int) -> str:
    """The plan's one line: lanes, threads, predicted minutes, the order."""
    return (
        f"training {len(planned)} models, {jobs} at a time on {threads} torch thread(s) each, "
        f"longest first: about {lanes_finish(planned, jobs) / 60:.0f} min of training steps "
        f"({', '.join(p.request.target for p in planned)})"
    )


def longest_first(planned: list[Planned]) -> list[Planned]:
    """Longest predicted training first; ties keep the family's order."""
    return sorted(planned, key=lambda p: -p.seconds)


def lanes_finish(planned: list[Planned], jobs: int) -> float:
    """When the last of `jobs` lanes finishes, each taking the next member as it frees up."""
    ends = [0.0] * jobs
    for item in planned:
        lane = ends.index(min(ends))
        ends[lane] += item.seconds
    return max(ends)


def run_parallel(
    work: Callable[..., str],
    planned: list[Planned],
    jobs: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> dict[str, str]:
    """Run `work(request)` for each planned member in `jobs` worker processes, in plan order.

    `work` returns the member's outcome (trained, skipped, failed); a worker that dies counts as
    failed for its member, and the others go on. Workers are spawned, not forked: a fork of a
    process whose OpenMP threads have run can hang in its first parallel region.
    """
    outcomes: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=initializer, initargs=initargs
    ) as pool:
        futures: dict[Future[str], str] = {
            pool.submit(work, p.request): p.request.target for p in planned
        }
        bar = tqdm(total=len(futures), desc="family", unit="model", position=0, leave=True)
        for future in as_completed(futures):
            name = futures[future]
            try:
                outcomes[name] = future.result()
            except Exception as error:  # a worker died (killed, out of memory): report, go on
                tqdm.write(f"cnnserve-export: {name} failed: {error!r}")
                outcomes[name] = FAILED
            bar.update(1)
        bar.close()
    return outcomes


def record_run(
    root: Path,
    started: dt.datetime,
    seconds: float,
    jobs: int,
    threads: int,
    device: str,
    outcomes: dict[str, str],
) -> None:
    """Append this run to the repository's run record if it trained anything."""
    trained = sorted(n for n, o in outcomes.items() if o in (TRAINED, INT8_FAILED))
    if not trained:
        return
    path = root / RUNS_FILE
    runs = read_runs(root)
    runs.append(
        {
            "started": started.isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            "jobs": jobs,
            "threads": threads,
            # Not machine.describe(): the parent's own torch threads say nothing of the workers'.
            "machine": machine.describe(device)
            if device.startswith("cuda")
            else f"{machine.cpu_model()} ({os.cpu_count()} CPUs)",
            "trained": trained,
            "skipped": sorted(n for n, o in outcomes.items() if o == SKIPPED),
            "failed": sorted(n for n, o in outcomes.items() if o in FAILURES),
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    tmp.replace(path)


def read_runs(root: Path) -> list[dict[str, Any]]:
    """The repository's recorded `cnnserve-export all` runs, oldest first ([] when none)."""
    return records.read_runs(root / RUNS_FILE)
