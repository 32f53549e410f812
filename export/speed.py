"""How fast ONNX Runtime runs an exported model here: latency at batch 1, throughput at 256.

Medians of repeated runs, because these machines are shared and a mean takes in every stall.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 256


@dataclass(frozen=True)
class Speed:
    """Figures for one model on one machine (`threads` is ONNX Runtime's intra-op pool)."""

    latency_ms: float  # median of batch-1 runs
    latency_p90_ms: float
    throughput: float  # images per second at THROUGHPUT_BATCH, from the median run
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with full graph optimisation, as the service creates it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_times(run: Any, minimum_runs: int, seconds: float) -> list[float]:
    """Wall times of `run()` after two warm-up calls, until both limits are reached."""
    run()
    run()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < minimum_runs or time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def measure(
    path: Path,
    outputs: list[str],
    images: np.ndarray,
    seconds: float = 1.0,
    threads: int | None = None,
) -> Speed:
    """Latency and throughput fetching `outputs` for float32 `images` (N x 1 x 28 x 28)."""
    if len(images) < THROUGHPUT_BATCH:
        raise ValueError(f"need {THROUGHPUT_BATCH} images to measure throughput; got {len(images)}")
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    singles = iter(range(1 << 62))

    def one() -> None:
        index = next(singles) % len(images)
        sess.run(outputs, {name: images[index : index + LATENCY_BATCH]})

    batch = np.ascontiguousarray(images[:THROUGHPUT_BATCH])
    latency = sorted(_run_times(one, minimum_runs=50, seconds=seconds))
    bulk = _run_times(lambda: sess.run(outputs, {name: batch}), minimum_runs=3, seconds=seconds)
    return Speed(
        latency_ms=round(statistics.median(latency) * 1000, 3),
        latency_p90_ms=round(latency[int(0.9 * (len(latency) - 1))] * 1000, 3),
        throughput=round(THROUGHPUT_BATCH / statistics.median(bulk), 1),
        threads=sess.get_session_options().intra_op_num_threads,
    )


def best(figures: list[Speed]) -> Speed:
    """The best of repeated measurements: noise on a shared machine only ever slows a run."""
    return Speed(
        latency_ms=min(f.latency_ms for f in figures),
        latency_p90_ms=min(f.latency_p90_ms for f in figures),
        throughput=max(f.throughput for f in figures),
        threads=figures[0].threads,
    )


def compare(
    first: Path,
    second: Path,
    outputs: list[str],
    images: np.ndarray,
    seconds: float = 1.0,
    rounds: int = 3,
) -> tuple[Speed, Speed]:
    """Two models measured in alternating rounds, best of each: a fair race on a noisy machine."""
    a: list[Speed] = []
    b: list[Speed] = []
    for _ in range(rounds):
        a.append(measure(first, outputs, images, seconds))
        b.append(measure(second, outputs, images, seconds))
    return best(a), best(b)
