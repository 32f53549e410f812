"""The article's fully connected networks: 0 hidden layers (logistic regression) and 1.

Their first-layer weights have one value per pixel, so each row is a 28x28 picture of the
feature that neuron detects (green positive, red negative in the article's plots).
"""

from __future__ import annotations

from torch import nn

from export.models.base import NUM_CLASSES, FamilyModel
from export.recipe import Recipe
from export.registry import register_model

PIXELS = 28 * 28


@register_model(
    Recipe(epochs=8, batch_size=256, lr=3e-3, weight_decay=0.0, schedule="onecycle"), goal=0.84
)
def logreg() -> FamilyModel:
    """Logistic regression: one linear layer from 784 pixels to 10 classes (0 hidden layers).

    There is no hidden stage, so it exposes no feature maps; its 10 weight vectors are the
    pictures to look at.
    """
    return FamilyModel(stages=[], head=nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, NUM_CLASSES)))


@register_model(
    Recipe(epochs=12, batch_size=256, lr=2e-3, weight_decay=1e-4, label_smoothing=0.05), goal=0.885
)
def mlp(hidden: int = 256) -> FamilyModel:
    """One hidden layer of `hidden` ReLU neurons; stage `hidden` is that layer's activation."""
    return FamilyModel(
        stages=[("hidden", nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, hidden), nn.ReLU()))],
        head=nn.Linear(hidden, NUM_CLASSES),
    )
