"""Training throughput of each conv family member in NCHW and channels-last (NHWC) layout.

Why `Recipe.channels_last` defaults to True: PyTorch's CPU kernels (max pooling above all) are
faster on NHWC tensors. Both layouts are measured in one run, so compare the ratio, not the
absolute numbers (the machine is shared).

Usage: `.venv/bin/python bench/train_layout.py [MODEL ...]`
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from export.registry import create_model, get_entry, list_models

BATCH = 128
STEPS = 5


def images_per_second(name: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).train().to(memory_format=layout)
    x = torch.rand(BATCH, 1, 28, 28).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (BATCH,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(STEPS + 1):
        if step == 1:  # the first step pays for allocation
            started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return STEPS * BATCH / (time.perf_counter() - started)


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    print(f"{'model':18} {'NCHW img/s':>11} {'NHWC img/s':>11} {'ratio':>6}")
    for name in names:
        plain, nhwc = images_per_second(name, False), images_per_second(name, True)
        print(f"{name:18} {plain:11.0f} {nhwc:11.0f} {nhwc / plain:6.2f}", flush=True)


if __name__ == "__main__":
    convolutional = [
        n for n in list_models() if get_entry(n).recipe.trainable and n not in ("logreg", "mlp")
    ]
    main(sys.argv[1:] or convolutional)
