"""The eight Kirsch compass filters as one fixed conv layer: the article's edge detectors.

Not trained and not a classifier: a feature extractor whose maps show where edges of each
compass orientation are. Padding mode and stride are chosen at export, so users can see the
article's points for themselves: 'same' padding keeps 28x28, stride 2 halves it, and with
'wrap' padding and stride 1 a shifted input gives exactly shifted maps (shift equivariance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.models.base import FamilyModel
from export.recipe import Recipe
from export.registry import register_model

# Compass order of the eight output channels; channel i responds to an edge whose bright side
# faces DIRECTIONS[i].
DIRECTIONS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")

# The article's padding names, mapped to torch's F.pad modes.
PADDING_MODES = {
    "constant": "constant",
    "nearest": "replicate",
    "mirror": "reflect",
    "wrap": "circular",
}

# Positions of the 3x3 ring, clockwise from the top-left corner.
_RING = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]


def kirsch_kernels() -> Tensor:
    """The 8 Kirsch kernels (8 x 1 x 3 x 3): three 5s on one side of the ring, -3 elsewhere."""
    kernels = torch.full((8, 1, 3, 3), -3.0)
    kernels[:, :, 1, 1] = 0.0
    # North has its 5s at ring positions 0, 1, 2; each next compass point turns 45 degrees.
    for k in range(8):
        for j in range(3):
            row, col = _RING[(k + j) % 8]
            kernels[k, 0, row, col] = 5.0
    return kernels


class KirschEdges(nn.Module):
    """Pad with the chosen mode, then correlate with the fixed kernels at the chosen stride."""

    def __init__(self, padding: str, stride: int) -> None:
        super().__init__()
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {', '.join(PADDING_MODES)}; got {padding!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1; got {stride}")
        self.mode = PADDING_MODES[padding]
        self.stride = stride
        self.register_buffer("weight", kirsch_kernels())

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode=self.mode)
        return F.conv2d(x, self.weight, stride=self.stride)


class ChannelMax(nn.Module):
    """Kirsch edge magnitude: the strongest response over the eight directions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=1, keepdim=True)


@register_model(Recipe(epochs=0, trainable=False))
def kirsch(padding: str = "constant", stride: int = 1) -> FamilyModel:
    """The 8 Kirsch compass edge filters (fixed weights) with a chosen padding mode and stride.

    Stage `edges` holds the eight directional maps (N, NE, E, SE, S, SW, W, NW), stage
    `magnitude` their maximum. Input pixels are used as they are, without normalisation.
    """
    return FamilyModel(
        stages=[("edges", KirschEdges(padding, stride)), ("magnitude", ChannelMax())],
        head=None,
        normalize=False,
    )
