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


def accuracy_against_cost(points: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy against MFLOPs per image (log scale); int8 variants as open markers."""
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    for point in points:
        quantized = point["quantized"]
        axes.scatter(
            point["mflops"],
            point["accuracy"],
            marker="v" if quantized else "o",
            facecolors="none" if quantized else "tab:blue",
            edgecolors="tab:orange" if quantized else "tab:blue",
            s=40,
        )
        if not quantized:
            axes.annotate(
                point["name"],
                (point["mflops"], point["accuracy"]),
                textcoords="offset points",
                xytext=(5, -3),
                fontsize="small",
            )
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.margins(x=0.15, y=0.08)
    axes.set(
        xlabel="MFLOPs per image (log scale)",
        ylabel="test accuracy (ONNX Runtime)",
        title="Fashion-MNIST: test accuracy against cost per image",
    )
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
