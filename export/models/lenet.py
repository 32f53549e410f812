"""LeNet-5 (LeCun et al., 1998) in its modern form: ReLU and max pooling, fully connected C3.

The layer names are the paper's: C convolution, S subsampling, F fully connected. The paper's
32x32 input is met by padding the 28x28 image by 2 in C1, so every later map has the paper's
size (C3 10x10, S4 5x5, C5 1x1). The originals' tanh-like squashing, trainable average-pool
subsampling, sparse C3 connection table and RBF output layer are replaced by what LeNet-5 is
usually trained with today.
"""

from __future__ import annotations

from torch import nn

from export.models.base import NUM_CLASSES, FamilyModel, conv_relu
from export.recipe import Recipe
from export.registry import register_model


@register_model(Recipe(epochs=12, lr=3e-3, weight_decay=1e-4, schedule="onecycle"), goal=0.905)
def lenet5() -> FamilyModel:
    """LeNet-5 layout (6 and 16 5x5 maps, 120, 84, 10) with ReLU and max pooling.

    Stages c1 (6x28x28), s2 (6x14x14), c3 (16x10x10), s4 (16x5x5), then the vectors c5 (120:
    a 5x5 conv that covers all of S4, i.e. a fc layer) and f6 (84). The paper's layout is
    fixed, so there are no size options.
    """
    return FamilyModel(
        stages=[
            ("c1", conv_relu(1, 6, 5, padding=2)),
            ("s2", nn.MaxPool2d(2)),
            ("c3", conv_relu(6, 16, 5, padding=0)),
            ("s4", nn.MaxPool2d(2)),
            ("c5", nn.Sequential(conv_relu(16, 120, 5, padding=0), nn.Flatten())),
            ("f6", nn.Sequential(nn.Linear(120, 84), nn.ReLU(inplace=True))),
        ],
        head=nn.Linear(84, NUM_CLASSES),
    )
