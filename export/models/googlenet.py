"""GoogLeNet's Inception v1 modules and their BatchNorm successor, Inception v2, at 28x28.

An Inception module runs four branches on the same input and concatenates them: a 1x1 conv, a
1x1 reduction then 3x3, a 1x1 reduction then 5x5, and a 3x3 max pool then a 1x1 projection. The
1x1 reductions keep the larger kernels cheap. Inception v2 (Ioffe and Szegedy, 2015) adds
BatchNorm after every conv and replaces each 5x5 with two stacked 3x3s (same receptive field,
fewer weights). Both share the module code and the channel table of GoogLeNet's paper (Szegedy
et al., 2014, table 1), scaled by `width`. Convs start from He initialisation: with PyTorch's
default, the BatchNorm-free GoogLeNet barely learns in its first epochs.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

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


class InceptionChannels(NamedTuple):
    """Output channels of each conv in one Inception module."""

    c1: int
    c3_reduce: int
    c3: int
    c5_reduce: int
    c5: int
    pool_proj: int

    def scaled(self, width: float) -> InceptionChannels:
        return InceptionChannels(*(scale_channels(c, width) for c in self))

    @property
    def out(self) -> int:
        return self.c1 + self.c3 + self.c5 + self.pool_proj


STEM_CHANNELS = 192
# GoogLeNet's modules 3a to 5a (5b, the last module, is left out at 28x28).
MODULES = {
    "inception3a": InceptionChannels(64, 96, 128, 16, 32, 32),
    "inception3b": InceptionChannels(128, 128, 192, 32, 96, 64),
    "inception4a": InceptionChannels(192, 96, 208, 16, 48, 64),
    "inception4b": InceptionChannels(160, 112, 224, 24, 64, 64),
    "inception5a": InceptionChannels(256, 160, 320, 32, 128, 128),
}
# The stages after the stem: Inception modules between 3x3 stride-2 max pools (28 -> 14 -> 7 -> 4).
LAYOUT = (
    "pool2",
    "inception3a",
    "inception3b",
    "pool3",
    "inception4a",
    "inception4b",
    "pool4",
    "inception5a",
)


def inception_module(cin: int, ch: InceptionChannels, bn: bool) -> Branches:
    """The four-branch module; with `bn`, the v2 form (BatchNorm, 5x5 as two 3x3)."""
    if bn:
        wide = nn.Sequential(
            conv_relu(cin, ch.c5_reduce, 1, bn=True),
            conv_relu(ch.c5_reduce, ch.c5, 3, bn=True),
            conv_relu(ch.c5, ch.c5, 3, bn=True),
        )
    else:
        wide = nn.Sequential(conv_relu(cin, ch.c5_reduce, 1), conv_relu(ch.c5_reduce, ch.c5, 5))
    return Branches(
        conv_relu(cin, ch.c1, 1, bn=bn),
        nn.Sequential(
            conv_relu(cin, ch.c3_reduce, 1, bn=bn), conv_relu(ch.c3_reduce, ch.c3, 3, bn=bn)
        ),
        wide,
        nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_relu(cin, ch.pool_proj, 1, bn=bn)),
    )


def inception_network(
    width: float, bn: bool, dropout: float, stem: int | None = None
) -> FamilyModel:
    """Stem conv, the LAYOUT of modules and pools, then global average pool, dropout and fc.

    `stem` sets the stem's channels; None scales GoogLeNet's 192 by `width`.
    """
    channels = scale_channels(STEM_CHANNELS, width) if stem is None else stem
    stages: list[tuple[str, nn.Module]] = [("stem", conv_relu(1, channels, 3, bn=bn))]
    for name in LAYOUT:
        if name in MODULES:
            ch = MODULES[name].scaled(width)
            stages.append((name, inception_module(channels, ch, bn)))
            channels = ch.out
        else:
            stages.append((name, nn.MaxPool2d(3, stride=2, padding=1)))
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels, NUM_CLASSES),
    )
    return he_init(FamilyModel(stages=stages, head=head))


@register_model(
    Recipe(
        epochs=16,
        lr=3e-3,
        weight_decay=5e-2,
        label_smoothing=0.1,
        crop_padding=2,
        hflip=True,
    ),
    goal=0.93,
)
def googlenet(width: float = 0.375, stem: int | None = None) -> FamilyModel:
    """GoogLeNet (Inception v1) modules 3a to 5a, no BatchNorm, at `width` times its channels.

    Stages stem (28x28), pool2 (14x14), inception3a, inception3b, pool3 (7x7), inception4a,
    inception4b, pool4 (4x4), inception5a. Like the paper, which shrinks 224 to 28 pixels before
    module 3a, the image is pooled once before the first module: a quarter of the cost of
    running 3a and 3b at 28x28. The head is global average pooling, 20% dropout and one fc layer.
    `stem` sets the stem's channels (default 192 x `width`).

    Version 1 (width 0.25, 40% dropout, 14 epochs) under-fitted: 92.9% train accuracy under
    augmentation and 92.0% test. Version 2 (width 0.375, 20% dropout, 12 epochs, AdamW peak
    rate 2e-3) reached 92.97% at 138 s an epoch, a fifth of it in the 72-channel stem and its
    pool at 28x28 (bench/train_stages.py). Tried and rejected: a 32-channel stem with a 13th
    epoch (108-127 s an epoch, 26 minutes): 92.67%, so the stem's channels earn their time;
    and version 2 with a 13th epoch, 2 threads: 92.88% in 33 minutes. Version 3, this recipe,
    changes only the peak rate, to 3e-3 (with AdamW's decoupled decay that also regularises
    more): 93.01%, its training loss below version 2's from the fourth epoch on.
    Version 4 trains 16 epochs: on a 2-core Intel Xeon (one thread, two members at once)
    version 3 reached only 92.82%, so 93.01% had been a lucky margin; 16 epochs reached 93.38%
    there (2026-11-26, `cnnserve-export train --model googlenet --epochs 16 --threads 1`).
    """
    return inception_network(width, bn=False, dropout=0.2, stem=stem)


@register_model(
    Recipe(
        epochs=15,
        optimizer="sgd",
        lr=5e-2,
        weight_decay=5e-4,
        label_smoothing=0.1,
        crop_padding=2,
        hflip=True,
    ),
    goal=0.93,
)
def inception_bn(width: float = 0.25) -> FamilyModel:
    """Inception v2: GoogLeNet's layout with BatchNorm after every conv and 5x5 as two 3x3.

    The same stages as `googlenet`; BatchNorm regularises enough for 20% dropout in the head.
    Version 1 (12 epochs, about 85 s each) reached 92.7% with its test accuracy still rising at
    the last epoch, so version 2 trains 15 epochs (about 21 minutes).
    """
    return inception_network(width, bn=True, dropout=0.2)
