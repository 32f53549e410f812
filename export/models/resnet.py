"""ResNet (He et al., 2015) with basic residual blocks, in the ResNet-18 layout, for 28x28.

Each block adds its input back to two 3x3 convs, so a block only has to learn a correction and
gradients reach the early layers through the identity paths. A 3x3 stem replaces ImageNet's
7x7 stride-2 conv and max pool, which would shrink a 28x28 image to 7x7 before the first block;
the four layers then work at 28, 14, 7 and 4 pixels.
"""

from __future__ import annotations

from torch import Tensor, nn

from export.models.base import NUM_CLASSES, FamilyModel, conv_relu, he_init
from export.recipe import Recipe
from export.registry import register_model


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv + BatchNorm without an activation: the residual branch's last step and a shortcut."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the shortcut, then ReLU; a 1x1 conv shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_relu(cin, cout, 3, stride, bn=True)
        self.conv2 = conv_bn(cout, cout, 3)
        same_shape = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same_shape else conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # The sum is a new tensor, so the in-place ReLU never touches x (an earlier stage's
        # output that forward_features keeps).
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


@register_model(
    Recipe(
        epochs=15,
        optimizer="sgd",
        lr=0.1,
        weight_decay=5e-4,
        label_smoothing=0.1,
        crop_padding=2,
        hflip=True,
    ),
    goal=0.935,
)
def resnet(
    width: int = 16, blocks: tuple[int, ...] = (2, 2, 2, 2), stem_stride: int = 1
) -> FamilyModel:
    """ResNet of basic blocks: `blocks` per layer (ResNet-18's by default), widths `width` x 2^i.

    Stages stem (28x28), then layer1 (28x28), layer2 (14x14), layer3 (7x7), layer4 (4x4) for
    the default four layers; every layer after the first halves the size and doubles the
    channels. (1, 1, 1, 1) is ResNet-10, (3, 4, 6, 3) ResNet-34. `stem_stride=2` halves the
    size in the stem, so the layers work at 14, 7, 4 and 2 pixels for a quarter of the cost.

    The recipe reaches 93.62% in 12 epochs of about 133 s. Tried for the family's two-hour
    budget and not adopted: blocks (2, 2, 2, 1), one block less in the 4x4 layer4, trained
    12 epochs of about 109 s (22 minutes instead of 27) to 93.52%, 0.02 points over the goal:
    four minutes are not worth leaving ResNet-18's layout, which the benchmarks measure, at
    that margin. Also tried: width 24 with `stem_stride=2`, 12 epochs of about 85 s (18
    minutes), 93.29%: under the goal, and its training loss stayed above this recipe's.
    15 epochs since 2026-11-26: on a 2-core Intel Xeon (one thread, two members at once) 12
    epochs gave 93.37%, under the goal, and 15 gave 93.86%
    (`cnnserve-export train --model resnet --epochs 15 --threads 1`).
    """
    if not blocks or min(blocks) < 1:
        raise ValueError(f"blocks must be a non-empty sequence of counts >= 1; got {blocks!r}")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2; got {stem_stride!r}")
    stages: list[tuple[str, nn.Module]] = [("stem", conv_relu(1, width, 3, stem_stride, bn=True))]
    channels = width
    for index, count in enumerate(blocks):
        cout = width * 2**index
        stride = 1 if index == 0 else 2
        layer = [BasicBlock(channels, cout, stride)]
        layer += [BasicBlock(cout, cout, 1) for _ in range(count - 1)]
        stages.append((f"layer{index + 1}", nn.Sequential(*layer)))
        channels = cout
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES))
    return he_init(FamilyModel(stages=stages, head=head))
