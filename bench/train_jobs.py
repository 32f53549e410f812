"""Training throughput on this machine: one process on all cores, or one process per core.

Why `cnnserve-export all` (so `make models`) trains one member per core by default: on a
2-core CPU, PyTorch splitting each small convolution of a 128-image step across two threads
leaves part of both cores waiting, while two single-threaded trainings keep both busy. Each
model is measured both ways in one run (the same steps and batch, the recipe's own batch
size), so compare the ratio, not the absolute figures (the machine is shared).

The last column is what the recipe's training steps take on this machine when the model
trains alone on all cores (its epochs x 60,000 images at the first column's rate, evaluation
not included): the per-model budget of issue 6 is about this figure, while `make models`
runs two members side by side, each slower but both cores busy.

Usage: `.venv/bin/python bench/train_jobs.py [--steps N] [MODEL ...]`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from export.family import step_seconds
from export.pipeline import ExportRequest
from export.registry import get_entry, list_models

TRAIN_IMAGES = 60_000  # Fashion-MNIST's training set, one epoch


def run_workers(names: list[str], threads: int, steps: int) -> list[float]:
    """One worker process per name, all at once; each one's images per second."""
    command = [sys.executable, __file__, "--worker", "--threads", str(threads)]
    command += ["--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen([*command, name], stdout=subprocess.PIPE, text=True, env=env)
        for name in names
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return [float(out.split()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per figure")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name = args.models[0]
        batch = get_entry(name).recipe.batch_size
        print(batch / step_seconds(ExportRequest(model=name), args.threads, args.steps))
        return
    cores = os.cpu_count() or 1
    names = args.models or [
        n for n in list_models() if get_entry(n).recipe.trainable and n not in ("logreg", "mlp")
    ]
    print(f"{cores} cores, {args.steps} training steps per figure")
    together, apart = f"1 job x {cores} threads", f"{cores} jobs x 1 thread"
    print(f"{'model':18} {together:>20} {apart:>20} {'ratio':>6} {'recipe alone':>14}")
    for name in names:
        one = run_workers([name], cores, args.steps)[0]
        many = sum(run_workers([name] * cores, 1, args.steps))
        alone = get_entry(name).recipe.epochs * TRAIN_IMAGES / one / 60
        print(
            f"{name:18} {one:14.0f} img/s {many:14.0f} img/s {many / one:6.2f} {alone:10.1f} min",
            flush=True,
        )


if __name__ == "__main__":
    main()
