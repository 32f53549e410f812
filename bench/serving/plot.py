"""The latency-throughput picture beside docs/BENCHMARKS.md, drawn from the JSON only.

One panel per single-image workload: each system's p99 latency against its throughput, one
marker per concurrency, with raw ONNX Runtime's best-batch throughput as a dashed line; both
axes are logarithmic, so the servers and the limit fit on one picture. Drawn
headless (Agg), like export/plots.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from bench.serving.systems import measured, name  # noqa: E402

DPI = 100
PANELS = (("lenet5 x1", "lenet5"), ("resnet x1", "resnet"))


def latency_throughput(data: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(PANELS), figsize=(11, 4.2), dpi=DPI)
    for panel, (work, model) in zip(axes, PANELS, strict=True):
        for system in measured(data):
            points = sorted(
                (p for p in data["points"] if (p["system"], p["workload"]) == (system, work)),
                key=lambda p: p["concurrency"],
            )
            if not points:
                continue
            x = [p["summary"]["images_per_s"] for p in points]
            y = [p["summary"]["p99"] for p in points]
            (line,) = panel.plot(x, y, marker="o", label=name(system))
            for p, xi, yi in zip(points, x, y, strict=True):
                panel.annotate(
                    str(p["concurrency"]),
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
        top = (data.get("raw") or {}).get("limit", {}).get(model)
        if top:
            panel.axvline(
                top["images_per_s"], color="grey", linestyle="--", label="raw ONNX Runtime"
            )
        panel.set(title=work, xlabel="images / s (log scale)", ylabel="p99 latency, ms")
        panel.set_xscale("log")  # lenet5's limit is tens of times what any server reaches
        panel.set_yscale("log")
        panel.grid(alpha=0.3)
        panel.legend(fontsize="x-small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
