"""Training loop: a recipe, the in-memory Fashion-MNIST arrays, and checkpoints to resume from.

The whole data set lives in memory as uint8 tensors (47 MB), so batches are slices and the light
augmentation (random crop after padding, horizontal flip) is done on whole batches at once. The
data order of every epoch is derived from the seed and the epoch number, so a run resumed from
a checkpoint sees the same batches it would have seen without the interruption.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from export.data import FashionMNIST
from export.models.base import FamilyModel
from export.recipe import Recipe

EVAL_BATCH = 1000


@dataclass
class EpochRecord:
    """One line of the learning curve."""

    epoch: int
    steps: int
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """What the exporter needs to know about a finished run."""

    test_accuracy: float | None
    epochs: float
    steps: int
    seconds: float
    images_per_second: float
    device: str
    history: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_pixels(images: Tensor) -> Tensor:
    """uint8 N x 28 x 28 to float32 N x 1 x 28 x 28 in [0, 1], the service's input format."""
    return images.unsqueeze(1).float().div_(255.0)


def augment(x: Tensor, recipe: Recipe, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, for a whole batch."""
    n, _, h, w = x.shape
    p = recipe.crop_padding
    if p > 0:
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # n x h x 1
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # n x 1 x w
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    if recipe.hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    device: str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> float:
    """Top-1 accuracy over the given images (uint8 N x 28 x 28)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        x = to_pixels(images[start : start + EVAL_BATCH]).to(device, memory_format=memory_format)
        y = labels[start : start + EVAL_BATCH].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(images)


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    raise ValueError(f"recipe optimizer must be adamw or sgd; got {recipe.optimizer!r}")


def _scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=max(total_steps, 2), pct_start=0.25
        )
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if recipe.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(
        f"recipe schedule must be onecycle, cosine or constant; got {recipe.schedule!r}"
    )


def _fingerprint(
    model: FamilyModel, recipe: Recipe, seed: int, max_steps: int | None, n: int
) -> str:
    """What must match for a checkpoint to be resumed rather than started over."""
    return json.dumps(
        {
            "model": model.name,
            "options": model.init_kwargs,
            "recipe": recipe.to_dict(),
            "seed": seed,
            "max_steps": max_steps,
            "train_images": n,
        },
        sort_keys=True,
    )


def train(
    model: FamilyModel,
    data: FashionMNIST,
    recipe: Recipe,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    device: str = "cpu",
    checkpoint: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place by `recipe`; resume from `checkpoint` when it holds the same run.

    `max_steps` bounds the number of optimiser steps (tests and benchmarks train a handful);
    `train_limit` trains on the first N training images only, and `test_limit` measures the
    learning curve on the first N test images (quick runs in tests).
    """
    torch.manual_seed(seed)
    images = torch.tensor(data.train_images[:train_limit])
    labels = torch.tensor(data.train_labels[:train_limit]).long()
    test_images = torch.tensor(data.test_images[:test_limit])
    test_labels = torch.tensor(data.test_labels[:test_limit]).long()
    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout)

    if not recipe.trainable:
        return TrainResult(None, 0, 0, 0.0, 0.0, device)

    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    optimizer = _optimizer(model, recipe)
    scheduler = _scheduler(optimizer, recipe, total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    fingerprint = _fingerprint(model, recipe, seed, max_steps, len(images))
    step, history, elapsed = 0, [], 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, elapsed = state["step"], state["seconds"]
            torch.set_rng_state(state["torch_rng"])  # dropout continues as if never stopped
            history = [EpochRecord(**r) for r in state["history"]]
            tqdm.write(f"{model.name}: resuming from {checkpoint} at step {step}/{total_steps}")
        else:
            tqdm.write(f"{model.name}: {checkpoint} is from a different run; starting over")

    epoch = step // steps_per_epoch
    while step < total_steps:
        model.train()
        # The epoch's order and augmentation depend only on (seed, epoch): resumable.
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator)
        first = step - epoch * steps_per_epoch
        last = min(steps_per_epoch, first + total_steps - step)
        loss_sum, correct, seen, started = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(
            range(first, last),
            desc=f"{model.name} epoch {epoch + 1}/{math.ceil(total_steps / steps_per_epoch)}",
            unit="step",
            disable=not progress,
            leave=False,
            # Redirected to a log (make models > log), a line every 30 s, not 10 a second.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        for batch_index in bar:
            index = order[batch_index * recipe.batch_size : (batch_index + 1) * recipe.batch_size]
            x = augment(to_pixels(images[index]), recipe, generator)
            x = x.to(device, memory_format=layout)
            y = labels[index].to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.3f}",
                img_s=f"{rate:.0f}",
                refresh=False,  # shown at the bar's own pace, not redrawn every step
            )
        bar.close()
        elapsed += time.perf_counter() - started
        test_accuracy = evaluate(model, test_images, test_labels, device, layout)
        history.append(
            EpochRecord(
                epoch + 1,
                step,
                loss_sum / max(seen, 1),
                correct / max(seen, 1),
                test_accuracy,
                elapsed,
            )
        )
        tqdm.write(
            f"{model.name} epoch {epoch + 1}: loss {history[-1].train_loss:.4f} "
            f"train acc {history[-1].train_accuracy:.4f} test acc {test_accuracy:.4f} "
            f"({elapsed:.0f} s)"
        )
        epoch += 1
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint, model, optimizer, scheduler, fingerprint, step, elapsed, history
            )

    model.eval()
    accuracy = (
        history[-1].test_accuracy
        if history
        else evaluate(model, test_images, test_labels, device, layout)
    )
    model.to(memory_format=torch.contiguous_format)  # export and checkpoints see plain NCHW
    images_seen = min(step * recipe.batch_size, total_steps * recipe.batch_size)
    return TrainResult(
        test_accuracy=accuracy,
        epochs=round(step / steps_per_epoch, 3),
        steps=step,
        seconds=round(elapsed, 2),
        images_per_second=round(images_seen / elapsed, 1) if elapsed else 0.0,
        device=device,
        history=history,
    )


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: str,
    step: int,
    seconds: float,
    history: list[EpochRecord],
) -> None:
    """Write atomically, so an interruption mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "fingerprint": fingerprint,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "seconds": seconds,
            "history": [asdict(r) for r in history],
            "torch_rng": torch.get_rng_state(),
            # The constructor arguments beside the weights, so the network can be rebuilt.
            "model_name": getattr(model, "name", None),
            "model_options": getattr(model, "init_kwargs", {}),
        },
        tmp,
    )
    tmp.replace(path)
