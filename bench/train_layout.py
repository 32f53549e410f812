"""Training throughput of each conv family member in NCHW and channels-last (NHWC) layout.

Why `Recipe.channels_last` defaults to True: PyTorch's CPU kernels (max pooling above all) are
faster on NHWC tensors. Both layouts are measured in one run, so compare the ratio, not the
absolute numbers (the machine is shared).

Usage: `.venv/bin/python bench/train_layout.py [MODEL ...]`
"""

from __future__ import annotations

import sys

from export.family import step_seconds
from export.pipeline import ExportRequest
from export.registry import get_entry, list_models

STEPS = 5


def images_per_second(name: str, channels_last: bool) -> float:
    step = step_seconds(ExportRequest(model=name), 2, STEPS, channels_last=channels_last)
    return get_entry(name).recipe.batch_size / step


def main(names: list[str]) -> None:
    print(f"{'model':18} {'NCHW img/s':>11} {'NHWC img/s':>11} {'ratio':>6}")
    for name in names:
        plain, nhwc = images_per_second(name, False), images_per_second(name, True)
        print(f"{name:18} {plain:11.0f} {nhwc:11.0f} {nhwc / plain:6.2f}", flush=True)


if __name__ == "__main__":
    convolutional = [
        n for n in list_models() if get_entry(n).recipe.trainable and n not in ("logreg", "mlp")
    ]
    main(sys.argv[1:] or convolutional)
