"""First-layer weights read straight from a repository's `model.onnx`, without torch.

"The first layer" is found in the graph, not assumed from the model's name: the first Gemm,
MatMul or Conv node that data from the input `image` reaches (after the in-graph
normalisation's Sub and Div, a Flatten or a Pad), and its weight, an initializer or a Constant.
Weights come back one row per unit: Gemm's B is [out, in] when transB=1 (torch's Linear) and
[in, out] otherwise, MatMul's is [in, out]; Conv's are [out, in, kh, kw] already. A dense
unit's input vector is reshaped to the model's input image (1 x 28 x 28), so a `logreg` class
or an `mlp` hidden unit becomes the 28 x 28 picture of what it looks for.

The file is read by `onnxfile`, a small reader of the protobuf wire format: the serving
install has no `onnx` package, and this needs only the graph's nodes and constant tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.pictures.onnxfile import Node, OnnxFileError, Tensor, read_graph

FIRST_LAYER_OPS = ("Gemm", "MatMul", "Conv")


class WeightsError(ValueError):
    """The model's file or graph cannot give first-layer weights; the message says why."""


@dataclass(frozen=True)
class FirstLayer:
    op: str  # Gemm, MatMul or Conv
    node: str  # the node's name in the graph
    weight: str  # the initializer's name
    units: np.ndarray  # one row per unit: [out, in] for dense layers, [out, in, kh, kw] for conv
    output: str  # the node's output tensor
    input_shape: tuple[int, ...]  # the model input per image, e.g. (1, 28, 28)

    def tiles(self) -> np.ndarray:
        """2-D pictures, one per unit (and per input channel for a multi-channel conv)."""
        if self.op == "Conv":
            out, channels, kh, kw = self.units.shape
            return self.units.reshape(out * channels, kh, kw)
        size = int(np.prod(self.input_shape))
        if self.units.shape[1] != size:
            raise WeightsError(
                f"{self.op} {self.node!r} takes {self.units.shape[1]} inputs, not the "
                f"{size} pixels of the input {list(self.input_shape)}"
            )
        channels, height, width = (
            self.input_shape[-3:] if len(self.input_shape) >= 3 else (1, *self.input_shape)
        )
        return self.units.reshape(-1, channels, height, width).reshape(-1, height, width)


def model_folder(repository: Path, name: str, version: str = "") -> Path:
    """The version folder of `name` (the newest numeric one by default) holding model.onnx."""
    if not repository.is_dir():
        raise WeightsError(f"model repository {repository} does not exist")
    models = sorted(
        p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if name not in models:
        raise WeightsError(
            f"model {name!r} not found in {repository}; available: {', '.join(models) or 'none'}"
        )
    versions = sorted(
        (p for p in (repository / name).iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    if version:
        chosen = [p for p in versions if int(p.name) == int(version)] if version.isdigit() else []
        if not chosen:
            found = ", ".join(p.name for p in versions) or "none"
            raise WeightsError(f"model {name!r} has no version {version!r}; versions: {found}")
        return chosen[0]
    if not versions:
        raise WeightsError(f"model {name!r} in {repository} has no numbered version folder")
    return versions[-1]


def read_config(folder: Path) -> dict[str, Any]:
    """The model.json beside the model (labels, model family, options); {} when unreadable."""
    try:
        return json.loads((folder / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def first_layer(path: Path) -> FirstLayer:
    """The first Gemm/MatMul/Conv reachable from the graph's input, and its weight."""
    try:
        graph = read_graph(path)
    except OnnxFileError as error:
        raise WeightsError(str(error)) from None
    constants = dict(graph.initializers)
    for node in graph.nodes:
        if node.op_type == "Constant" and "value" in node.tensors:
            constants[node.outputs[0]] = node.tensors["value"]
    inputs = [(name, dims) for name, dims in graph.inputs if name not in constants]
    if not inputs:
        raise WeightsError(f"{path}: the graph has no input")
    name, dims = next((i for i in inputs if i[0] == "image"), inputs[0])
    input_shape = tuple(dims[1:]) or (1, 28, 28)

    reached = {name}
    for node in graph.nodes:  # ONNX keeps nodes in topological order
        data = [n for n in node.inputs if n in reached]
        if not data:
            continue
        if node.op_type in FIRST_LAYER_OPS:
            units = _units(node, data[0], constants, path.parent)
            return FirstLayer(
                node.op_type, node.name, node.inputs[1], units, node.outputs[0], input_shape
            )
        reached.update(node.outputs)
    raise WeightsError(f"{path}: no Gemm, MatMul or Conv node is reached from {name!r}")


def _units(node: Node, data: str, constants: dict[str, Tensor], folder: Path) -> np.ndarray:
    """The node's weight as one row per output unit."""
    if len(node.inputs) < 2 or node.inputs[0] != data or node.inputs[1] not in constants:
        raise WeightsError(
            f"{node.op_type} {node.name!r}: expected the data as its first input and a constant "
            "weight as its second"
        )
    try:
        weight = constants[node.inputs[1]].array(folder)
    except (OnnxFileError, OSError) as error:
        raise WeightsError(f"{node.op_type} {node.name!r}: {error}") from None
    if node.op_type == "Conv":
        if weight.ndim != 4:
            raise WeightsError(f"Conv {node.name!r}: weight of shape {list(weight.shape)}")
        return weight
    if weight.ndim != 2:
        raise WeightsError(f"{node.op_type} {node.name!r}: weight of shape {list(weight.shape)}")
    transposed = node.op_type == "Gemm" and node.ints.get("transB", 0) == 1
    return weight if transposed else weight.T
