"""PyTorch to ONNX, with every feature stage as a named graph output, validated before writing.

We use the TorchScript exporter (`dynamo=False`) on purpose: with torch pinned at 2.13 it is
mature for these plain conv nets, gives compact graphs whose Conv+ReLU pairs ONNX Runtime fuses,
needs no onnxscript, and exports in well under a second. Its deprecation warning is silenced
here and nowhere else; moving to the dynamo exporter is a change to this module only.

Validation runs before anything is written: the full `onnx.checker` check, ONNX Runtime against
PyTorch on 256 real test images (every output), and the accuracy recomputed by ONNX Runtime on
the whole test set. A model that fails raises `ValidationError` saying why.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.data import FashionMNIST
from export.models.base import INPUT_SHAPE, FamilyModel
from export.train import to_pixels

OPSET = 18
INPUT_NAME = "image"
CLASS_OUTPUTS = ("logits", "probabilities")
METADATA_KEY = "cnnserve"
PROBABILITY_TOLERANCE = 1e-5
ACCURACY_TOLERANCE = 0.001  # 0.1 point
COMPARE_IMAGES = 256


class ValidationError(RuntimeError):
    """The exported graph does not behave like the PyTorch model; nothing was written."""


def feature_output(stage: str) -> str:
    return f"features.{stage}"


class _GraphOutputs(nn.Module):
    """The exported function: pixels in, class outputs and every stage activation out."""

    def __init__(self, model: FamilyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        logits, features = self.model.forward_features(image)
        stages = tuple(features.values())
        if logits is None:
            return stages
        return (logits, torch.softmax(logits, dim=1), *stages)


def output_names(model: FamilyModel) -> list[str]:
    names = [feature_output(s) for s in model.stage_names]
    return names if model.kind == "feature_extractor" else [*CLASS_OUTPUTS, *names]


def to_onnx(model: FamilyModel) -> onnx.ModelProto:
    """Trace the model into an ONNX graph with a dynamic batch axis."""
    model = model.cpu().eval()
    names = output_names(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        torch.onnx.export(
            _GraphOutputs(model),
            (torch.zeros(2, *INPUT_SHAPE),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *names]},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Embed the model's metadata, so a lone model.onnx still says what it is."""
    proto.doc_string = f"cnnserve {metadata.get('model')}: {metadata.get('summary', '')}"
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True)


@dataclass
class Validation:
    """Measured agreement between PyTorch and ONNX Runtime, kept in the model's metadata."""

    images_compared: int
    max_probability_difference: float | None
    max_feature_difference: dict[str, float]
    pytorch_accuracy: float | None
    onnxruntime_accuracy: float | None
    accuracy_images: int = 0  # test images the two accuracies were measured on


def open_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """A quiet CPU session, the provider every exported model must run on."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@torch.no_grad()
def validate(
    model: FamilyModel,
    proto: onnx.ModelProto,
    data: FashionMNIST,
    accuracy_images: int | None = None,
) -> Validation:
    """Check the graph and compare it with PyTorch; raise ValidationError on any disagreement.

    Accuracy is compared on the whole test set unless `accuracy_images` says fewer (tests).
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ValidationError(f"{model.name}: onnx.checker rejected the graph: {error}") from error

    model = model.cpu().eval()
    names = output_names(model)
    session = open_session(proto)
    pixels = to_pixels(torch.tensor(data.test_images[:accuracy_images]))
    sample = pixels[:COMPARE_IMAGES]
    got = dict(zip(names, session.run(names, {INPUT_NAME: sample.numpy()}), strict=True))
    want = dict(zip(names, [t.numpy() for t in _GraphOutputs(model)(sample)], strict=True))

    problems: list[str] = []
    feature_diffs: dict[str, float] = {}
    for name in names:
        if got[name].shape != want[name].shape:
            problems.append(f"{name}: shape {got[name].shape} != PyTorch {want[name].shape}")
            continue
        diff = float(np.abs(got[name] - want[name]).max()) if got[name].size else 0.0
        if name.startswith("features."):
            feature_diffs[name] = diff
            scale = max(1.0, float(np.abs(want[name]).max()))
            if diff > 1e-4 * scale:
                problems.append(f"{name}: max difference {diff:.3g} exceeds {1e-4 * scale:.3g}")

    probability_diff = None
    pytorch_accuracy = onnxruntime_accuracy = None
    if model.kind == "classifier":
        probability_diff = float(np.abs(got["probabilities"] - want["probabilities"]).max())
        if probability_diff > PROBABILITY_TOLERANCE:
            problems.append(
                f"probabilities: max difference {probability_diff:.3g} > {PROBABILITY_TOLERANCE}"
            )
        mismatched = int((got["logits"].argmax(1) != want["logits"].argmax(1)).sum())
        if mismatched:
            problems.append(f"argmax differs from PyTorch on {mismatched} of {len(sample)} images")
        labels = data.test_labels[: len(pixels)]
        pytorch_accuracy = accuracy_of(
            predicted_classes(lambda x: model(torch.from_numpy(x)).numpy(), pixels), labels
        )
        onnxruntime_accuracy = accuracy_of(
            predicted_classes(session_logits(session), pixels), labels
        )
        if abs(pytorch_accuracy - onnxruntime_accuracy) > ACCURACY_TOLERANCE:
            problems.append(
                f"test accuracy {onnxruntime_accuracy:.4f} in ONNX Runtime vs "
                f"{pytorch_accuracy:.4f} in PyTorch"
            )
    if problems:
        raise ValidationError(
            f"{model.name}: ONNX export does not match PyTorch: " + "; ".join(problems)
        )
    return Validation(
        images_compared=len(sample),
        max_probability_difference=probability_diff,
        max_feature_difference=feature_diffs,
        pytorch_accuracy=pytorch_accuracy,
        onnxruntime_accuracy=onnxruntime_accuracy,
        accuracy_images=len(pixels),
    )


def session_logits(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    """The `logits` output of an ONNX Runtime session, as a function of a pixel batch."""
    return lambda x: session.run(["logits"], {INPUT_NAME: x})[0]


def predicted_classes(
    logits_of: Callable[[np.ndarray], np.ndarray], pixels: Tensor, batch: int = 1000
) -> np.ndarray:
    """The argmax class of every image, a batch at a time so memory stays flat."""
    classes = [
        np.asarray(logits_of(pixels[start : start + batch].numpy())).argmax(1)
        for start in range(0, len(pixels), batch)
    ]
    return np.concatenate(classes) if classes else np.zeros(0, np.int64)


def accuracy_of(predicted: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of images whose predicted class is their label (labels of the first N)."""
    return int(np.count_nonzero(predicted == labels[: len(predicted)])) / len(predicted)
