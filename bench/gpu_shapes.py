"""What a change of batch size costs an ONNX Runtime CUDA session, and what avoids it.

Why cnnserve gives each padded batch size a CUDA session of its own (service/runtime.py,
`padded_sizes`): a dynamic batcher's batch sizes change from one batch to the next, and a
CUDA session sets its convolutions up again whenever the shape changes, even back to a shape
it has run before. Every model is measured here five ways in one run, batch sizes cycling
through the same order each time:
- `one session`: one session, every size run once first, as the server's warm-up does;
- `one session, HEURISTIC` / `one session, DEFAULT`: the same with a cheaper cuDNN algorithm
  choice (`cudnn_conv_algo_search`) than ONNX Runtime's exhaustive default;
- `session per size`: one session for each size, each only ever sees its own shape;
- `steady`: one session, the same size again and again (what no shape change costs).

Usage (on a machine with onnxruntime-gpu and a GPU):
`python -m bench.gpu_shapes [--models lenet5,resnet] [--model-repository bench/models]`.
It writes bench/results/gpu-shapes.json; `--device cpu` runs the same code on the CPU, for
its test, where shape changes cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.runtime import CUDA, RuntimeOptions, make_session, providers_for

SIZES = (1, 2, 4, 8, 16, 32, 64)
CYCLE = (1, 2, 4, 8, 1, 4, 2, 8, 64, 1)  # a batcher's sizes under a varying load
SEARCHES = {
    "one session": None,
    "one session, HEURISTIC": "HEURISTIC",
    "one session, DEFAULT": "DEFAULT",
}
Run = Callable[[int], None]


def _session(path: Path, providers: list, search: str | None) -> ort.InferenceSession:
    """A one-thread session as cnnserve makes them, with `search` as cuDNN's algorithm search."""
    if search is not None:  # only the CUDA provider has the option
        providers = [
            (entry[0], {**entry[1], "cudnn_conv_algo_search": search})
            if isinstance(entry, tuple) and entry[0] == CUDA
            else entry
            for entry in providers
        ]
    return make_session(path, RuntimeOptions(), 1, providers)


def _runner(sessions: dict[int, ort.InferenceSession], images: np.ndarray) -> Run:
    """Run a batch of `size` images on the session for that size (or the only one)."""
    name = next(iter(sessions.values())).get_inputs()[0].name  # looked up once, not timed

    def run(size: int) -> None:
        (sessions.get(size) or sessions[0]).run(None, {name: images[:size]})

    return run


def _milliseconds(run: Run, sizes: tuple[int, ...], cycles: int) -> list[float]:
    times = []
    for _ in range(cycles):
        for size in sizes:
            started = time.perf_counter()
            run(size)
            times.append((time.perf_counter() - started) * 1e3)
    return times


def measure(path: Path, providers: list, cycles: int) -> dict[str, dict[str, float]]:
    """Each way's median and worst call while sizes cycle; `steady` at the cycle's sizes."""
    one = {label: {0: _session(path, providers, search)} for label, search in SEARCHES.items()}
    per_size = {size: _session(path, providers, None) for size in SIZES}
    inputs = per_size[1].get_inputs()[0].shape[1:]
    images = np.random.default_rng(0).random((max(SIZES), *inputs), dtype=np.float32)
    ways = {label: _runner(sessions, images) for label, sessions in one.items()}
    ways["session per size"] = _runner(per_size, images)
    results = {}
    for label, run in ways.items():
        _milliseconds(run, SIZES, 1)  # every shape once: the searches a warm-up does
        times = _milliseconds(run, CYCLE, cycles)
        results[label] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    steady = ways["one session"]
    # the first call of each size is a change of size: left out
    times = [t for size in sorted(set(CYCLE)) for t in _milliseconds(steady, (size,) * 6, 1)[1:]]
    results["steady"] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet5,resnet")
    parser.add_argument("--model-repository", type=Path, default=Path("bench/models"))
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument("--cycles", type=int, default=3, help="times through the size cycle")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-shapes.json"))
    args = parser.parse_args(argv)
    providers = providers_for(args.device)  # refuses cuda where onnxruntime has no CUDA
    models = {}
    for name in args.models.split(","):
        path = args.model_repository / name / "1" / "model.onnx"
        if not path.is_file():
            print(f"gpu_shapes: no {path}; `make bench` exports the models", file=sys.stderr)
            return 2
        models[name] = measure(path, providers, args.cycles)
        for label, figures in models[name].items():
            print(
                f"{name:8} {label:24} median {figures['median_ms']:8.2f} ms  "
                f"worst {figures['max_ms']:8.2f} ms"
            )
    record = {
        "command": " ".join(["python -m bench.gpu_shapes", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "onnxruntime": ort.__version__,
        "device": args.device,
        "cycle": list(CYCLE),
        "models": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
