"""Training recipes: the optimiser, schedule and augmentation each family member trains with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a model is trained, stored in the exported metadata."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # onecycle | cosine | constant
    label_smoothing: float = 0.0
    crop_padding: int = 0  # random crop after padding by this many pixels; 0 disables
    hflip: bool = False  # random horizontal flip
    # NHWC tensors during training: faster for every conv member on a CPU (bench/train_layout.py)
    channels_last: bool = True
    trainable: bool = True  # False for fixed filters (kirsch): export without training

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def override(self, **changes: Any) -> Recipe:
        """A copy with the non-None changes applied (CLI flags left unset change nothing)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
