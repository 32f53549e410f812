"""Parameter count and compute cost per image, measured on the network itself.

MFLOPs are counted by PyTorch's FlopCounterMode on one 28x28 image: a multiply-add counts as
two FLOPs, and only matrix products and convolutions are counted (activations, pooling and
normalisation are a rounding error next to them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.models.base import INPUT_SHAPE


def count_params(model: nn.Module) -> int:
    """Learned parameters (buffers such as Kirsch kernels and BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def mflops_per_image(model: nn.Module) -> float:
    """Millions of FLOPs for one image in inference mode."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *INPUT_SHAPE))
    model.train(was_training)
    return counter.get_total_flops() / 1e6
