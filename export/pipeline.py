"""One model from name to repository: build, train, convert, validate, write.

This is where the metadata that travels with a model is assembled, once: the same dict goes
into the ONNX file's metadata and into `model.json`, which is what the service reads.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

import export
from export import convert, machine, repository
from export.complexity import count_params, mflops_per_image
from export.data import LABELS, FashionMNIST
from export.models.base import FMNIST_MEAN, FMNIST_STD, INPUT_SHAPE, FamilyModel
from export.recipe import Recipe
from export.registry import create_model, get_entry
from export.train import TrainResult, train

# The quick set: small enough to train and export in under 3 minutes on 2 cores.
QUICK_SET = ("logreg", "mlp", "lenet5", "kirsch")

# Batching defaults written into model.json; the service's flags override them.
SMALL_MODEL_MFLOPS = 10.0


@dataclass
class ExportRequest:
    """What `cnnserve-export train` was asked to do for one model."""

    model: str
    name: str | None = None  # repository name; defaults to the model name
    options: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None  # overrides of the default recipe's fields
    seed: int = 0
    max_steps: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None  # learning curve and accuracy check on the first N test images
    device: str = "cpu"
    resume: bool = True
    progress: bool = True

    @property
    def target(self) -> str:
        """The repository name this request writes."""
        return self.name or self.model


@dataclass
class ExportResult:
    name: str
    version: int
    path: Path
    config: dict[str, Any]


def batching_defaults(mflops: float) -> dict[str, Any]:
    """Small models batch wide (request overhead dominates), big ones narrower (latency)."""
    big = mflops > SMALL_MODEL_MFLOPS
    return {"max_batch_size": 64 if big else 256, "max_queue_delay_ms": 2.0 if big else 1.0}


def build_config(
    model: FamilyModel,
    recipe: Recipe,
    result: TrainResult,
    validation: convert.Validation,
    data: FashionMNIST,
    seed: int,
) -> dict[str, Any]:
    """The model's metadata: everything a client or operator should know about it."""
    shapes = model.feature_shapes()
    mflops = mflops_per_image(model)
    classifier = model.kind == "classifier"
    outputs = []
    if classifier:
        outputs = [
            {"name": name, "shape": [len(LABELS)], "dtype": "float32"}
            for name in convert.CLASS_OUTPUTS
        ]
    features = [
        {
            "name": convert.feature_output(stage),
            "stage": stage,
            "shape": list(shape),
            "dtype": "float32",
        }
        for stage, shape in shapes.items()
    ]
    entry = get_entry(model.name)
    return {
        "model": model.name,
        "summary": entry.summary,
        "kind": model.kind,
        "labels": list(LABELS) if classifier else None,
        "input": {
            "name": convert.INPUT_NAME,
            "shape": list(INPUT_SHAPE),
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "normalization": (
                {"mean": FMNIST_MEAN, "std": FMNIST_STD, "in_graph": True}
                if model.normalize
                else None
            ),
        },
        "outputs": outputs,
        "features": features,
        "default_outputs": [o["name"] for o in outputs] or [f["name"] for f in features],
        "options": model.init_kwargs,
        "params": count_params(model),
        "mflops": round(mflops, 4),
        "accuracy": {
            "pytorch": validation.pytorch_accuracy,
            "onnxruntime": validation.onnxruntime_accuracy,
        },
        "validation": asdict(validation),
        "recipe": recipe.to_dict(),
        "training": {**result.to_dict(), "seed": seed, "machine": machine.describe(result.device)},
        "dataset": {"name": "fashion-mnist", "sha256": data.checksum},
        "batching": batching_defaults(mflops),
        "exporter": {
            "cnnserve": export.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": convert.OPSET,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def export_model(request: ExportRequest, data: FashionMNIST, root: Path) -> ExportResult:
    """Train (or build, for fixed-weight models), validate, and write a new version."""
    name = repository.check_name(request.target)
    torch.manual_seed(request.seed)  # the initial weights belong to the seed too
    model = create_model(request.model, **(request.options or {}))
    recipe = get_entry(request.model).recipe.override(**(request.recipe or {}))
    checkpoint = repository.checkpoint_path(root, name)
    if not request.resume and checkpoint.exists():
        checkpoint.unlink()
    result = train(
        model,
        data,
        recipe,
        seed=request.seed,
        max_steps=request.max_steps,
        train_limit=request.train_limit,
        test_limit=request.test_limit,
        device=request.device,
        checkpoint=checkpoint if recipe.trainable else None,
        progress=request.progress,
    )
    model = model.cpu().eval()
    proto = convert.to_onnx(model)
    validation = convert.validate(model, proto, data, accuracy_images=request.test_limit)
    config = build_config(model, recipe, result, validation, data, request.seed)
    convert.set_metadata(proto, config)
    path = repository.write_model(root, name, proto, config)
    checkpoint.unlink(missing_ok=True)  # the run is complete; a new export starts fresh
    written = repository.read_configs(root)
    final = next(c for c in written if c["name"] == name and c["version"] == int(path.name))
    return ExportResult(name=name, version=int(path.name), path=path, config=final)
