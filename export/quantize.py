"""int8 static quantization: the newest `<name>` in the repository in, `<name>-int8` beside it.

ONNX Runtime's quantizer rewrites the float32 graph into QDQ form (QuantizeLinear and
DequantizeLinear around each quantizable operator, which ONNX Runtime's CPU provider fuses into
integer kernels), with activation ranges calibrated on a seeded random sample of training
images, never test images, so the test accuracy stays an honest measurement. The int8 graph
keeps the float32 interface (input and output names, float32 tensors), so clients and the
service use it like any other model. Its `model.json` is the float32 one's with the accuracy
measured again by ONNX Runtime on the whole test set and a `quantization` block saying how it
was made, from which version, and what it cost in accuracy. The float32 model is only read.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from export import convert, repository, speed
from export.data import FashionMNIST
from export.train import to_pixels

SUFFIX = "-int8"
CALIBRATION_IMAGES = 1024
CALIBRATION_BATCH = 64
ACCURACY_DROP_GOAL = 0.01  # the goal: at most one accuracy point lost
# int8 must beat float32 by this factor at both batch sizes to be served. Repeated measurements of
# one model differ by a few percent, so a bare "faster" flipped between runs for models whose
# two variants run equally fast (mlp: served in one run, rejected in the next at 0.03 ms each).
MIN_SPEEDUP = 1.05

# Activations uint8 (asymmetric, per tensor), weights int8 (symmetric, per output channel) with
# a 7-bit range. ONNX Runtime's CPU kernels on x86-64 are U8S8. Its docs name S8S8 QDQ as the
# default, but with onnxruntime 1.32 on an AVX2 machine S8S8 graphs kept Conv in float32 and
# ran 1.2-1.8x slower than float32, while U8S8 fused to QLinearConv/QGemm and ran 1.3-1.5x
# faster (cnn, resnet). On AVX2 and AVX-512 CPUs without VNNI the U8S8 kernels use VPMADDUBSW,
# whose 16-bit sums saturate; ONNX Runtime's FAQ asks for reduce_range with per-channel
# weights there, and without it a randomly initialised cnn's argmax agreed with float32 on 92%
# of test images instead of 98.5%. The file must run well wherever the service runs, so we pay
# the seventh bit everywhere rather than depend on the serving CPU having VNNI.
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
REDUCE_RANGE = True

# MinMax: ONNX Runtime's default and the usual choice for ReLU CNNs whose inputs are bounded
# ([0, 1] pixels). Its calibrator reduces every tensor to a min and max inside the graph, so
# calibrating the biggest family member stays cheap; the histogram methods (entropy,
# percentile) keep every activation of every calibration batch in memory.
CALIBRATION_METHOD = CalibrationMethod.MinMax

# Softmax stays float32: `probabilities` then sum to one and keep their resolution, for the cost
# of ten exponentials per image. Its input, the int8 head's `logits`, is quantized like any output.
FLOAT_OPS = ("Softmax",)


class NotQuantizableError(ValueError):
    """The model is not one we quantize: a feature extractor, or already an int8 variant."""


class QuantizationError(RuntimeError):
    """The quantized graph does not keep the float32 model's interface; nothing was written."""


def int8_name(name: str) -> str:
    return repository.check_name(f"{name}{SUFFIX}")


def newest_config(root: Path, name: str) -> dict[str, Any]:
    """The model.json of the newest version of `name`; FileNotFoundError when there is none."""
    found = repository.versions(root, repository.check_name(name))
    if not found:
        raise FileNotFoundError(f"no model {name!r} in {root}")
    path = root / name / str(found[-1]) / repository.CONFIG_FILE
    return json.loads(path.read_text())


def check_quantizable(config: dict[str, Any]) -> None:
    """Only classifiers: their accuracy is how we judge the int8 graph, and a fixed-filter
    feature extractor such as kirsch is its exact feature maps, which int8 would blur."""
    if "quantization" in config:
        raise NotQuantizableError(f"{config['name']} is already an int8 variant")
    if config.get("kind") != "classifier":
        raise NotQuantizableError(
            f"{config['name']} is a {str(config.get('kind')).replace('_', ' ')}, not a classifier: "
            "only classifiers are quantized (their accuracy measures the int8 graph)"
        )


class TrainingSample(CalibrationDataReader):
    """Batches of a seeded random sample of training images, in the model's input format."""

    def __init__(self, data: FashionMNIST, images: int, seed: int) -> None:
        if not 0 < images <= len(data.train_images):
            raise ValueError(
                f"calibration images must be 1 to {len(data.train_images)}; got {images}"
            )
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(len(data.train_images), size=images, replace=False))
        pixels = to_pixels(torch.from_numpy(data.train_images[index])).numpy()
        self._batches = iter(
            [
                {convert.INPUT_NAME: pixels[start : start + CALIBRATION_BATCH]}
                for start in range(0, len(pixels), CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_proto(proto: onnx.ModelProto, calibration: CalibrationDataReader) -> onnx.ModelProto:
    """The QDQ int8 graph of a float32 one (the quantizer works on files, so a temp folder)."""
    with tempfile.TemporaryDirectory(prefix="cnnserve-quantize-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference and graph optimisation first, as ONNX Runtime recommends: the
        # quantizer needs every tensor's shape to place QDQ pairs well.
        quant_pre_process(proto, prepared)
        graph = onnx.load(str(prepared))
        for index, node in enumerate(graph.graph.node):
            if node.op_type in FLOAT_OPS and not node.name:
                node.name = f"{node.op_type}_{index}"  # nodes_to_exclude goes by name
        onnx.save(graph, str(prepared))
        quantize_static(
            prepared,
            quantized,
            calibration,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            activation_type=ACTIVATION_TYPE,
            weight_type=WEIGHT_TYPE,
            calibrate_method=CALIBRATION_METHOD,
            nodes_to_exclude=[n.name for n in graph.graph.node if n.op_type in FLOAT_OPS],
        )
        return onnx.load(str(quantized))


def _interface(values: Any) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in values]


def check_interface(float32: onnx.ModelProto, int8: onnx.ModelProto) -> None:
    """Clients call the int8 graph exactly like the float32 one: same names, float32 tensors."""
    try:
        onnx.checker.check_model(int8, full_check=True)
    except onnx.checker.ValidationError as error:
        raise QuantizationError(f"onnx.checker rejected the int8 graph: {error}") from error
    for part in ("input", "output"):
        want = _interface(getattr(float32.graph, part))
        got = _interface(getattr(int8.graph, part))
        if got != want or any(dtype != onnx.TensorProto.FLOAT for _, dtype in got):
            raise QuantizationError(f"int8 graph {part}s {got} differ from float32 {want}")
    if not any(node.op_type == "QuantizeLinear" for node in int8.graph.node):
        raise QuantizationError("the quantizer inserted no QuantizeLinear node")


def quantize_int8(
    root: Path,
    name: str,
    data: FashionMNIST,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    target_root: Path | None = None,
) -> Path:
    """Write the next version of `<name>-int8`, quantized from the newest `name`; its folder.

    It goes into `target_root` when given (a hidden candidates folder, while `auto` decides).
    """
    base = newest_config(root, name)
    check_quantizable(base)
    target = int8_name(name)
    calibration = TrainingSample(data, calibration_images, seed)
    float32 = onnx.load(str(root / name / str(base["version"]) / repository.MODEL_FILE))
    int8 = quantize_proto(float32, calibration)
    check_interface(float32, int8)

    # Both graphs on every test image in ONNX Runtime, so the drop compares like with like
    # (the float32 model.json may hold an accuracy measured on fewer images).
    pixels = to_pixels(torch.tensor(data.test_images))
    float32_classes = convert.predicted_classes(
        convert.session_logits(convert.open_session(float32)), pixels
    )
    int8_classes = convert.predicted_classes(
        convert.session_logits(convert.open_session(int8)), pixels
    )
    float32_accuracy = convert.accuracy_of(float32_classes, data.test_labels)
    int8_accuracy = convert.accuracy_of(int8_classes, data.test_labels)

    kept = {k: v for k, v in base.items() if k not in ("name", "version", "file", "validation")}
    config = {
        **kept,
        "accuracy": {"onnxruntime": int8_accuracy, "pytorch": None},
        "quantization": {
            "scheme": "int8",
            "format": "QDQ",
            "weights": {
                "dtype": "int8",
                "granularity": "per-channel",
                "symmetric": True,
                "reduce_range": REDUCE_RANGE,
            },
            "activations": {"dtype": "uint8", "granularity": "per-tensor", "symmetric": False},
            "float_ops": list(FLOAT_OPS),
            "calibration": {
                "images": calibration_images,
                "source": "training set",
                "seed": seed,
                "method": CALIBRATION_METHOD.name.lower(),
            },
            "base": {
                "name": name,
                "version": base["version"],
                "sha256": base["file"]["sha256"],
                "accuracy": float32_accuracy,
            },
            "test_images": len(pixels),
            "accuracy_drop": round(float32_accuracy - int8_accuracy, 6),
            "argmax_agreement": float(np.mean(float32_classes == int8_classes)),
            "onnxruntime": ort.__version__,
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    convert.set_metadata(int8, config)
    return repository.write_model(target_root or root, target, int8, config)


def verdict(drop: float, int8: speed.Speed, float32: speed.Speed) -> list[str]:
    """Why an int8 variant is not worth serving; empty when it is accurate and clearly faster."""
    reasons = []
    if drop > ACCURACY_DROP_GOAL:
        reasons.append("loses more than 1 point")
    margin = f"{(MIN_SPEEDUP - 1) * 100:.0f}%"
    if int8.throughput < float32.throughput * MIN_SPEEDUP:
        reasons.append(f"not {margin} faster at batch 256")
    if int8.latency_ms * MIN_SPEEDUP > float32.latency_ms:
        reasons.append(f"not {margin} faster at batch 1")
    return reasons


def quantize_auto(
    root: Path,
    name: str,
    data: FashionMNIST,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    seconds: float = 1.0,
) -> tuple[Path, list[str]]:
    """Quantize, measure int8 against float32 here, and serve it only if it is worth it.

    The candidate is written to a hidden folder the service never loads; it then moves into the
    repository, or into `.rejected` with the reasons (so the model table can show them).
    """
    candidates = root / repository.CANDIDATES
    candidate = quantize_int8(root, name, data, calibration_images, seed, target_root=candidates)
    config = json.loads((candidate / repository.CONFIG_FILE).read_text())
    base = root / name / str(config["quantization"]["base"]["version"]) / repository.MODEL_FILE
    images = (data.test_images[: speed.THROUGHPUT_BATCH, None] / 255.0).astype(np.float32)
    float32_speed, int8_speed = speed.compare(
        base, candidate / repository.MODEL_FILE, ["probabilities"], images, seconds
    )
    reasons = verdict(config["quantization"]["accuracy_drop"], int8_speed, float32_speed)
    config = {k: v for k, v in config.items() if k not in ("name", "version", "file")}
    config["selection"] = {
        "served": not reasons,
        "reasons": reasons,
        "int8": int8_speed.to_dict(),
        "float32": float32_speed.to_dict(),
    }
    proto = onnx.load(str(candidate / repository.MODEL_FILE))
    convert.set_metadata(proto, config)
    destination = root if not reasons else root / repository.REJECTED
    folder = repository.write_model(destination, int8_name(name), proto, config)
    shutil.rmtree(candidate)
    for empty in (candidate.parent, candidates):  # leave no empty folders behind
        if not any(empty.iterdir()):
            empty.rmdir()
    return folder, reasons
