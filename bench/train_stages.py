"""Where a member's training time goes: forward + backward milliseconds per stage, per batch.

Why: a recipe's budget is spent stage by stage, and FLOPs mislead on a CPU. A 3x3 conv on the
one-channel image has almost no FLOPs, yet GoogLeNet's 72-channel stem and the pool after it
took a fifth of its training step. Each stage runs on the previous stage's (detached) output,
so the figures add up to about one training step without the optimiser. The machine is
shared: compare stages within one run.

Usage: `.venv/bin/python bench/train_stages.py MODEL [KEY=VALUE ...]`, options as in
`cnnserve-export train --option`, e.g. `bench/train_stages.py googlenet stem=72`.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor, nn

from export.cli import parse_option
from export.registry import create_model

BATCH = 128
REPEATS = 5


def stage_ms(stage: nn.Module, x: Tensor) -> tuple[float, Tensor]:
    """Median forward + backward time of one stage on `x`, and its output."""
    times = []
    for _ in range(REPEATS + 1):
        given = x.detach().requires_grad_(True)
        started = time.perf_counter()
        out = stage(given)
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - started)
    times = sorted(times[1:])  # the first run pays for allocation
    return times[len(times) // 2] * 1000, out.detach()


def main(name: str, options: list[str]) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model(name, **dict(parse_option(o) for o in options)).train()
    model.to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    rows, total = [], 0.0
    for stage_name, stage in [*model.stages.items(), ("head", model.head)]:
        ms, out = stage_ms(stage, x)
        rows.append((stage_name, tuple(x.shape[1:]), tuple(out.shape[1:]), ms))
        total += ms
        x = out
    print(f"{name} {' '.join(options)}: batch {BATCH}, forward + backward per stage")
    for stage_name, shape_in, shape_out, ms in rows:
        print(
            f"  {stage_name:14} {str(shape_in):15} -> {str(shape_out):15} "
            f"{ms:7.1f} ms {ms / total:6.1%}"
        )
    print(f"  {'total':14} {'':34} {total:7.1f} ms  ({BATCH / total * 1000:.0f} images/s)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
