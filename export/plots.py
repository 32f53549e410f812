"""The pictures beside docs/MODELS.md: a learning curve per model, accuracy against cost.

matplotlib draws them headless (Agg), so the report runs on servers without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib import ticker  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

DPI = 100


def learning_curve(config: dict[str, Any], path: Path) -> Path:
    """Train loss, and train and test accuracy, by epoch, with the accuracy goal if known."""
    history = config["training"]["history"]
    epochs = [h["epoch"] for h in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(8, 3), dpi=DPI)
    loss_axes.plot(epochs, [h["train_loss"] for h in history], marker="o", color="tab:red")
    loss_axes.set(xlabel="epoch", ylabel="train loss", title="training loss")
    recipe = config.get("recipe", {})
    augmented = recipe.get("crop_padding") or recipe.get("hflip")
    train_label = "train (augmented)" if augmented else "train"
    accuracy_axes.plot(
        epochs, [h["train_accuracy"] for h in history], marker="o", label=train_label
    )
    accuracy_axes.plot(epochs, [h["test_accuracy"] for h in history], marker="o", label="test")
    goal = config.get("goal")
    if goal is not None:
        accuracy_axes.axhline(goal, color="grey", linestyle="--", label=f"goal {goal:.3f}")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy (10,000 test images)")
    accuracy_axes.legend(loc="lower right", fontsize="small")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.set_xticks(epochs if len(epochs) <= 20 else epochs[:: len(epochs) // 10])
    figure.suptitle(f"{config['name']} v{config['version']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


# Where a point's label may go, in points from the marker, tried in this order: close first,
# then further out with a leader line.
LABEL_OFFSETS = tuple(
    (dx * scale, dy * scale)
    for scale in (1, 2.5, 4, 6, 8)
    for dx, dy in ((6, -3), (6, 6), (6, -12), (-6, -3), (-6, 6), (-6, -12), (0, 9), (0, -15))
)
ZOOM_BAND = 0.02  # the zoom panel shows the points this close to the best accuracy
MARKER_POINTS = 8  # a marker's box, in points, that labels keep clear of


def _place_labels(figure: Any, axes: Any, labelled: list[tuple[str, float, float]]) -> None:
    """Label each point at the first offset clear of the axes' edges, markers and other labels.

    Several members cost about the same (20-70 MFLOPs, 2-5k img/s), so labels at one fixed
    offset overlap each other and the markers.
    """
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)  # a label past it would cover the tick labels
    half = MARKER_POINTS * figure.dpi / 72 / 2
    placed = [
        Bbox.from_extents(px - half, py - half, px + half, py + half)
        for px, py in axes.transData.transform([(x, y) for _, x, y in labelled])
    ]
    for text, x, y in labelled:
        candidates = (*LABEL_OFFSETS, LABEL_OFFSETS[0])  # no free place: the first, overlapping
        for attempt, (dx, dy) in enumerate(candidates):
            far = abs(dx) > 10 or abs(dy) > 16
            label = axes.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=(dx, dy),
                ha="left" if dx >= 0 else "right",
                fontsize="small",
                arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if far else None,
            )
            box = label.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                break
            if attempt < len(candidates) - 1:
                label.remove()
        placed.append(box)


def _tick(value: float, _position: int) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _log_axis(axes: Any) -> None:
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(_tick))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.margins(x=0.2, y=0.08)
    axes.grid(alpha=0.3, which="both")


def _speed_scatter(axes: Any, points: list[dict[str, Any]]) -> None:
    """float32 members as dots, int8 variants as triangles: filled served, open rejected."""
    floats = [p for p in points if not p["quantized"]]
    axes.scatter(
        [p["throughput"] for p in floats], [p["accuracy"] for p in floats], s=40, label="float32"
    )
    for served, face, label in (
        (True, "tab:orange", "int8, served"),
        (False, "none", "int8, rejected"),
    ):
        chosen = [p for p in points if p["quantized"] and p["served"] == served]
        if chosen:
            axes.scatter(
                [p["throughput"] for p in chosen],
                [p["accuracy"] for p in chosen],
                marker="v",
                s=50,
                facecolors=face,
                edgecolors="tab:orange",
                label=label,
            )


def _frame(axes: Any, points: list[dict[str, Any]]) -> None:
    """A dashed box around `points` on log-x axes, labelled to point at the zoom panel."""
    xs = [p["throughput"] for p in points]
    ys = [p["accuracy"] for p in points]
    left, right = min(xs) / 1.4, max(xs) * 1.4
    bottom, top = min(ys) - 0.003, max(ys) + 0.003
    axes.add_patch(
        Rectangle(
            (left, bottom), right - left, top - bottom, fill=False, ls="--", lw=0.8, ec="grey"
        )
    )
    axes.annotate(
        "zoomed at right",
        (right, top),
        xytext=(4, -10),
        textcoords="offset points",
        fontsize="small",
        color="grey",
    )


def accuracy_against_cost(points: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy against MFLOPs per image and against measured throughput, side by side.

    int8 variants share their float32 model's MFLOPs, so they appear only in the speed panels,
    where what differs is speed: filled where served, open where rejected. The most accurate
    members cost about the same, so a third panel zooms on those within ZOOM_BAND of the best.
    Each point: name, mflops, accuracy, throughput (img/s at batch 256), quantized, served,
    and optionally family (False: not trained by `make models`; default True).
    """
    figure, (cost_axes, speed_axes, zoom_axes) = plt.subplots(
        1, 3, figsize=(18, 5), dpi=DPI, gridspec_kw={"width_ratios": (1, 1, 1.1)}
    )
    speed_axes.sharey(cost_axes)
    floats = [p for p in points if not p["quantized"]]
    # The band hangs from the best model `make models` trains: a bigger one trained elsewhere
    # (resnet-w64 on a GPU) would otherwise leave the crowded family out of the zoom.
    family = [p for p in points if p.get("family", True)]
    best = max(p["accuracy"] for p in family or points)
    zoomed = [p for p in family if best - ZOOM_BAND <= p["accuracy"] <= best]
    cost_axes.scatter([p["mflops"] for p in floats], [p["accuracy"] for p in floats], s=40)
    _speed_scatter(speed_axes, points)
    _speed_scatter(zoom_axes, zoomed)
    for axes in (cost_axes, speed_axes, zoom_axes):
        _log_axis(axes)
    # The zoom spans less than a decade: ticks at 1, 2 and 5 times powers of ten.
    zoom_axes.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    zoom_axes.yaxis.set_major_locator(ticker.MultipleLocator(0.005))
    zoom_axes.yaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0, decimals=1))
    speed_title = "ONNX Runtime images/s at batch 256, this machine (log scale)"
    cost_axes.set(
        xlabel="MFLOPs per image (log scale)",
        ylabel="test accuracy (ONNX Runtime)",
        title="accuracy against compute",
    )
    speed_axes.set(xlabel=speed_title, title="accuracy against measured speed")
    zoom_axes.set(
        xlabel=speed_title,
        title=f"zoom: within {ZOOM_BAND * 100:g} points of the family's best",
    )
    speed_axes.legend(loc="lower left", fontsize="small")
    figure.suptitle("Fashion-MNIST model family: test accuracy against cost per image")
    figure.tight_layout()
    _place_labels(figure, cost_axes, [(p["name"], p["mflops"], p["accuracy"]) for p in floats])
    # The zoomed points are named in the zoom panel; here a frame shows where they are.
    _frame(speed_axes, zoomed)
    outside = [p for p in points if p not in zoomed]
    _place_labels(
        figure, speed_axes, [(p["name"], p["throughput"], p["accuracy"]) for p in outside]
    )
    _place_labels(figure, zoom_axes, [(p["name"], p["throughput"], p["accuracy"]) for p in zoomed])
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
