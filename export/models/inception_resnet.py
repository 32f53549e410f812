"""Inception-ResNet-v2 (Szegedy et al., 2016) scaled to 28x28: Inception branches as residuals.

Each residual block runs Inception branches on its input, concatenates them, projects them back
to the input's channels with a linear 1x1 conv, scales that down (0.17 in A blocks, 0.1 in B
blocks, which keeps the sum stable at the start of training) and adds it to the input before
the ReLU. Reduction blocks halve the size with parallel stride-2 convs and a max pool. The
channel tables are the paper's (figures 16 to 18, k, l, m, n = 256, 256, 384, 384) times
`width`; the stem is two 3x3 convs instead of the paper's 299x299 stem, reductions pad so the
sizes go 28 -> 14 -> 7 -> 4, and the 8x8 C blocks the paper runs last are left out.
"""

from __future__ import annotations

from torch import Tensor, nn

from export.models.base import (
    NUM_CLASSES,
    Branches,
    FamilyModel,
    conv_relu,
    he_init,
    scale_channels,
)
from export.recipe import Recipe
from export.registry import register_model

# A branch is a chain of conv + BatchNorm + ReLU layers: (output channels, kernel, stride).
Layer = tuple[int, int | tuple[int, int], int]
Table = tuple[tuple[Layer, ...], ...]

STEM: tuple[Layer, ...] = ((128, 3, 1), (384, 3, 2))
BLOCK_A: Table = (
    ((32, 1, 1),),
    ((32, 1, 1), (32, 3, 1)),
    ((32, 1, 1), (48, 3, 1), (64, 3, 1)),
)
BLOCK_B: Table = (
    ((192, 1, 1),),
    ((128, 1, 1), (160, (1, 7), 1), (192, (7, 1), 1)),
)
# Reductions also have a 3x3 stride-2 max-pool branch, which keeps the input's channels.
REDUCTION_A: Table = (
    ((384, 3, 2),),
    ((256, 1, 1), (256, 3, 1), (384, 3, 2)),
)
REDUCTION_B: Table = (
    ((256, 1, 1), (384, 3, 2)),
    ((256, 1, 1), (288, 3, 2)),
    ((256, 1, 1), (288, 3, 1), (320, 3, 2)),
)
SCALE_A = 0.17
SCALE_B = 0.1


def conv_chain(cin: int, layers: tuple[Layer, ...], width: float) -> tuple[nn.Sequential, int]:
    """One branch: its conv layers with channels times `width`, and its output channels."""
    modules: list[nn.Module] = []
    for channels, kernel, stride in layers:
        cout = scale_channels(channels, width)
        modules.append(conv_relu(cin, cout, kernel, stride, bn=True))
        cin = cout
    return nn.Sequential(*modules), cin


def branches(cin: int, table: Table, width: float, pool: bool) -> tuple[Branches, int]:
    """Parallel branches from a table (after a max-pool branch if `pool`), and their channels."""
    modules: list[nn.Module] = [nn.MaxPool2d(3, stride=2, padding=1)] if pool else []
    total = cin if pool else 0
    for layers in table:
        chain, cout = conv_chain(cin, layers, width)
        modules.append(chain)
        total += cout
    return Branches(*modules), total


class ResidualInception(nn.Module):
    """relu(x + scale * project(branches(x))): an Inception-ResNet A or B block."""

    def __init__(self, channels: int, table: Table, width: float, scale: float) -> None:
        super().__init__()
        self.branches, concat = branches(channels, table, width, pool=False)
        # Linear projection (no BatchNorm, no activation), as in the paper.
        self.project = nn.Conv2d(concat, channels, 1)
        self.scale = scale
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # The sum is a new tensor, so the in-place ReLU never modifies x.
        return self.relu(x + self.scale * self.project(self.branches(x)))


@register_model(
    Recipe(
        epochs=7,
        lr=2e-3,
        weight_decay=5e-2,
        label_smoothing=0.1,
        crop_padding=2,
        hflip=True,
    ),
    goal=0.93,
)
def inception_resnet(width: float = 0.25, blocks_a: int = 3, blocks_b: int = 3) -> FamilyModel:
    """Inception-ResNet-v2 style: stem, A blocks, reduction, B blocks, reduction, pooled fc.

    Stages stem (14x14), block_a (`blocks_a` A blocks, 14x14), reduction_a (7x7), block_b
    (`blocks_b` B blocks, 7x7), reduction_b (4x4); `width` scales the paper's channels.

    The recipe reaches 93.05% in 7 epochs of about 255 s. Tried and rejected for the family's
    two-hour budget: two A and two B blocks, 7 epochs of about 205 s, 92.82%, under the 93.0%
    goal.
    """
    if blocks_a < 1 or blocks_b < 1:
        raise ValueError(f"blocks_a and blocks_b must be >= 1; got {blocks_a}, {blocks_b}")
    stem, channels = conv_chain(1, STEM, width)
    block_a = nn.Sequential(
        *(ResidualInception(channels, BLOCK_A, width, SCALE_A) for _ in range(blocks_a))
    )
    reduction_a, channels = branches(channels, REDUCTION_A, width, pool=True)
    block_b = nn.Sequential(
        *(ResidualInception(channels, BLOCK_B, width, SCALE_B) for _ in range(blocks_b))
    )
    reduction_b, channels = branches(channels, REDUCTION_B, width, pool=True)
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(channels, NUM_CLASSES),
    )
    model = FamilyModel(
        stages=[
            ("stem", stem),
            ("block_a", block_a),
            ("reduction_a", reduction_a),
            ("block_b", block_b),
            ("reduction_b", reduction_b),
        ],
        head=head,
    )
    return he_init(model)
