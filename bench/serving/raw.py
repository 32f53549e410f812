"""The limit: ONNX Runtime in-process, no server, at each batch size, best batch size wins.

Sessions are made exactly as cnnserve makes them (`service.runtime.ModelRuntime`), with ONNX
Runtime's thread spinning off and on, since on two cores spinning changes which is faster: the
limit is the best of both. Each measurement runs in a fresh spawned process, so its CPU time
(`time.process_time`, every thread) and resident memory are the session's alone. Inputs are
float32 batches made once; `session.run` asks for `probabilities` only, as a request without
feature maps does. Two more figures price the feature outputs: resnet's run with every output
(what Triton's ONNX Runtime backend copies on every request), and with `probabilities` and
the stage-1 map, plus one copy of the map's bytes: the least asking for a feature map can cost.
With a GPU `device` the sessions run on ONNX Runtime's CUDA provider, inputs copied from host
memory and outputs back on every run, as in a server; the provider is read back per session.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.reliability.stats import latency_ms
from bench.serving.processes import tree_usage
from bench.serving.workload import FEATURE

BATCHES = (1, 8, 32, 64, 128, 256)
QUICK_BATCHES = (1, 32, 128)
SETTING = {False: "spinning off", True: "spinning on"}


@dataclass(frozen=True)
class RawPlan:
    path: str
    model: str
    batches: tuple[int, ...]
    seconds: float  # per batch size
    allow_spinning: bool
    features: tuple[str, ...]  # the model's feature outputs (empty: none)
    device: str = "cpu"  # cpu | cuda | cuda:N (bench.serving.device)


def _timed(run: Any, seconds: float) -> tuple[np.ndarray, float, float]:
    """Call `run` for `seconds` after one warm-up call; latencies, wall and CPU seconds."""
    run()
    latencies = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    end = wall0 + seconds
    while (now := time.perf_counter()) < end or len(latencies) < 5:
        run()
        latencies.append(time.perf_counter() - now)
    return np.array(latencies), time.perf_counter() - wall0, time.process_time() - cpu0


def _row(batch: int, latencies: np.ndarray, wall: float, cpu: float) -> dict[str, Any]:
    images = batch * len(latencies)
    return {
        "batch": batch,
        "runs": len(latencies),
        "images_per_s": round(images / wall, 1),
        "images_per_cpu_s": round(images / cpu, 1) if cpu > 0 else None,
        "cpu_s_per_1000": round(1000 * cpu / images, 4),
        **latency_ms(latencies),
    }


def _measure(plan: RawPlan) -> dict[str, Any]:
    from service.runtime import ModelRuntime, RuntimeOptions

    options = RuntimeOptions(device=plan.device, allow_spinning=plan.allow_spinning)
    runtime = ModelRuntime(Path(plan.path), options)  # refuses a device it cannot start
    session, name = runtime.session, runtime.input_name
    rng = np.random.default_rng(0)

    def timed(outputs: list[str], batch: int) -> dict[str, Any]:
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        return _row(batch, *_timed(lambda: session.run(outputs, {name: x}), plan.seconds))

    rows = [timed(["probabilities"], batch) for batch in plan.batches]
    out: dict[str, Any] = {
        "batches": rows,
        "rss_mib": round(tree_usage(os.getpid()).rss_bytes / 2**20, 1),
        "provider": runtime.provider,
    }
    if FEATURE in plan.features:
        every = runtime.output_names
        out["every_output_b1"] = timed(every, 1)
        out["every_output_best"] = timed(every, best(rows)["batch"])
        out["feature_b1"] = timed(["probabilities", FEATURE], 1)
        x = rng.random((1, 1, 28, 28), dtype=np.float32)
        feature = session.run([FEATURE], {name: x})[0]
        copies, _, _ = _timed(feature.tobytes, min(plan.seconds, 0.5))
        out["feature_bytes"] = int(feature.nbytes)
        out["feature_copy_ms"] = round(float(np.median(copies)) * 1000, 4)
    return out


def _main(plan: RawPlan, queue: Any) -> None:
    try:
        queue.put(_measure(plan))
    except BaseException as error:  # say why, rather than leave the parent waiting
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise


def measure(plan: RawPlan) -> dict[str, Any]:
    """One model at one spinning setting, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_main, args=(plan, queue))
    process.start()
    result = queue.get(timeout=len(plan.batches) * plan.seconds * 4 + 300)
    process.join(60)
    if "error" in result:
        raise RuntimeError(f"raw ONNX Runtime, {plan.model} on {plan.device}: {result['error']}")
    return result


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch size with the most images per second."""
    return max(rows, key=lambda r: r["images_per_s"])


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one batch size: medians, and the spread of throughput."""
    from bench.serving.measure import spread_pct

    out: dict[str, Any] = {"batch": rows[0]["batch"], "repeats": len(rows)}
    for key in ("images_per_s", "images_per_cpu_s", "cpu_s_per_1000", "p50", "p90", "p99"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    out["spread_pct"] = spread_pct([r["images_per_s"] for r in rows])
    return out


def run(
    models: dict[str, dict[str, Any]],
    spinning: tuple[bool, ...],
    batches: tuple[int, ...],
    seconds: float,
    repeats: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every model at every spinning setting, `repeats` times; the limit is the best of all."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for _ in range(repeats):  # repeats outermost, so a slow spell touches every setting alike
        for model, info in models.items():
            for spin in spinning:
                features = tuple(name for name, _ in info["features"])
                plan = RawPlan(info["path"], model, batches, seconds, spin, features, device)
                found.setdefault(model, {}).setdefault(SETTING[spin], []).append(measure(plan))
    out: dict[str, Any] = {"models": {}, "limit": {}, "batch1": {}, "feature_cost": None}
    out["device"] = device  # and the provider each session really ran on:
    out["providers"] = sorted(
        {r["provider"] for s in found.values() for rs in s.values() for r in rs}
    )
    for model, settings in found.items():
        out["models"][model] = {}
        for setting, runs in settings.items():
            rows = [_summary([r["batches"][i] for r in runs]) for i in range(len(batches))]
            entry: dict[str, Any] = {
                "batches": rows,
                "rss_mib": statistics.median(r["rss_mib"] for r in runs),
            }
            for key in ("every_output_b1", "every_output_best", "feature_b1"):
                if key in runs[0]:
                    entry[key] = _summary([r[key] for r in runs])
            if "feature_copy_ms" in runs[0]:
                entry["feature_copy_ms"] = statistics.median(r["feature_copy_ms"] for r in runs)
                entry["feature_bytes"] = runs[0]["feature_bytes"]
            out["models"][model][setting] = entry
        everything = [
            (setting, row) for setting, e in out["models"][model].items() for row in e["batches"]
        ]
        setting, top = max(everything, key=lambda x: x[1]["images_per_s"])
        out["limit"][model] = {"spinning": setting, **top}
        ones = [(s, row) for s, row in everything if row["batch"] == 1]
        if ones:
            setting, one = min(ones, key=lambda x: x[1]["p50"])
            out["batch1"][model] = {"spinning": setting, **one}
            cost = out["models"][model][setting]
            if "feature_b1" in cost:
                extra = max(0.0, cost["feature_b1"]["p50"] - one["p50"])
                out["feature_cost"] = {
                    "model": model,
                    "spinning": setting,
                    "bytes": cost["feature_bytes"],
                    "ort_extra_ms": round(extra, 4),
                    "bytes_copy_ms": cost["feature_copy_ms"],
                    "copy_ms": round(extra + cost["feature_copy_ms"], 4),
                }
    return out
