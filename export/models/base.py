"""What every family member is: a chain of named stages and an optional classifier head.

The stages are the feature maps users ask the service for. Each stage ends with its activation
(or pooling), so the exported `features.<stage>` outputs are post-activation tensors: ONNX
Runtime cannot fuse a Conv whose raw output is a graph output, and pre-activation outputs would
slow every request. Inputs are raw pixels in [0, 1]; normalisation is the first operation of
the network, so the exported ONNX graph is self-contained.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

# Mean and standard deviation of the 60,000 Fashion-MNIST training pixels scaled to [0, 1]
# (tests/unit/test_data.py recomputes them from the IDX files).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class FamilyModel(nn.Module):
    """A network as an ordered chain of named stages followed by an optional head.

    `forward` returns logits (what training needs); `forward_features` also returns every
    stage's activation, in order (what the exporter turns into graph outputs).
    """

    kind = "classifier"

    def __init__(
        self,
        stages: list[tuple[str, nn.Module]],
        head: nn.Module | None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(OrderedDict(stages))
        self.head = head
        self.normalize = normalize
        if head is None:
            self.kind = "feature_extractor"
        # Filled in by registry.create_model.
        self.name: str = type(self).__name__.lower()
        self.init_kwargs: dict[str, Any] = {}

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def _run(self, x: Tensor, keep: bool) -> tuple[Tensor | None, dict[str, Tensor]]:
        if self.normalize:
            x = (x - FMNIST_MEAN) / FMNIST_STD
        features: dict[str, Tensor] = {}
        for name, stage in self.stages.items():
            x = stage(x)
            if keep:
                features[name] = x
        logits = self.head(x) if self.head is not None else None
        return logits, features

    def forward_features(self, x: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Logits (None for feature extractors) and every stage's activation, in order."""
        return self._run(x, keep=True)

    def forward(self, x: Tensor) -> Tensor:
        logits, features = self._run(x, keep=self.head is None)
        if logits is None:
            return next(reversed(features.values()))
        return logits

    @torch.no_grad()
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every stage output, found by running one blank image."""
        was_training = self.training
        self.eval()
        _, features = self.forward_features(torch.zeros(1, *INPUT_SHAPE))
        self.train(was_training)
        return {name: tuple(t.shape[1:]) for name, t in features.items()}


def conv_relu(
    cin: int,
    cout: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] | None = None,
    bn: bool = False,
) -> nn.Sequential:
    """Conv (+ BatchNorm) + ReLU; 'same' padding for odd kernels unless told otherwise.

    A (height, width) kernel such as (1, 7) gives the factorised convolutions of Inception.
    """
    if padding is None:
        pad = kernel // 2 if isinstance(kernel, int) else (kernel[0] // 2, kernel[1] // 2)
    else:
        pad = padding
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, pad, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def scale_channels(channels: int, width: float) -> int:
    """A channel count times a width multiplier, rounded, and never below one channel."""
    return max(1, round(channels * width))


class Branches(nn.Module):
    """Parallel branches on one input, concatenated along channels (Inception's filter concat).

    Each branch ends with its own activation or pooling, so the concatenation is post-activation.
    """

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def he_init(model: ModuleT) -> ModuleT:
    """He (Kaiming) normal initialisation of every conv for ReLU, biases zero; returns the model.

    PyTorch's default conv initialisation leaves a ReLU layer's output about six times smaller
    in variance than its input. Without BatchNorm the signal fades through a deep stack and
    training stalls; with BatchNorm the running variance starts at 1, far above the batch
    variance, and a network trained only briefly evaluates badly.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
