"""Just enough of an ONNX file to find a layer's weights: a reader of the protobuf wire format.

The serving install has neither torch nor the `onnx` package (the runtime image keeps to what
serving needs, and `tests/unit/test_deploy.py` holds it there), and `show weights` needs only
the graph's inputs, its nodes (name, op type, inputs, outputs, attributes) and its constant
tensors. The protobuf wire format is five rules, and ONNX's field numbers are frozen by its
compatibility promise, so about a hundred lines read them, decoding a tensor only when it is
asked for. Field numbers are those of onnx/onnx.proto (ModelProto.graph = 7, and so on).
Unknown fields are skipped, as protobuf itself does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# TensorProto.DataType values this reader decodes, to numpy dtypes.
DTYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2"), 11: np.dtype("<f8")}
TYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 10: "FLOAT16"}
TYPE_NAMES |= {11: "DOUBLE", 16: "BFLOAT16"}


class OnnxFileError(ValueError):
    """The file is not an ONNX model this reader can take apart; the message says why."""


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if at >= len(data):
            raise OnnxFileError("truncated varint")
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at
        shift += 7
        if shift > 63:
            raise OnnxFileError("varint longer than 10 bytes")


def fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message: an int, or a memoryview of the bytes."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = int.from_bytes(data[at : at + 8], "little"), at + 8
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at : at + length], at + length
        elif wire == 5:
            value, at = int.from_bytes(data[at : at + 4], "little"), at + 4
        else:
            raise OnnxFileError(f"unsupported protobuf wire type {wire} (field {number})")
        if at > len(data):
            raise OnnxFileError(f"truncated field {number}")
        yield number, wire, value


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", errors="replace")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated integer field's values, packed (wire type 2) or not."""
    if wire != 2:
        return [_int64(value)]
    out, at = [], 0
    while at < len(value):
        number, at = _varint(value, at)
        out.append(_int64(number))
    return out


@dataclass
class Tensor:
    """A TensorProto, kept as its fields until `array()` decodes it."""

    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    raw: bytes | None = None
    packed: dict[int, list[Any]] = field(default_factory=dict)  # float_data etc., by field
    external: dict[str, str] = field(default_factory=dict)

    def array(self, folder: Path | None = None) -> np.ndarray:
        dtype = DTYPES.get(self.data_type)
        if dtype is None:
            kind = TYPE_NAMES.get(self.data_type, str(self.data_type))
            raise OnnxFileError(f"tensor {self.name!r} holds {kind}; only floats are read")
        raw = self.raw
        if self.external:
            if folder is None or "location" not in self.external:
                raise OnnxFileError(f"tensor {self.name!r}: external data without a location")
            with (folder / self.external["location"]).open("rb") as file:
                file.seek(int(self.external.get("offset", 0)))
                length = self.external.get("length")
                raw = file.read(int(length) if length else -1)
        if raw is not None:
            values = np.frombuffer(raw, dtype=dtype)
        elif self.data_type == 1:  # float_data, packed little-endian floats
            values = np.frombuffer(b"".join(self.packed.get(4, [])), dtype="<f4")
        elif self.data_type == 11:  # double_data
            values = np.frombuffer(b"".join(self.packed.get(10, [])), dtype="<f8")
        else:  # float16 bit patterns in int32_data
            values = np.array(self.packed.get(5, []), dtype=np.uint16).view("<f2")
        size = int(np.prod(self.dims)) if self.dims else 1
        if values.size != size:
            raise OnnxFileError(f"tensor {self.name!r}: {values.size} values for dims {self.dims}")
        return values.astype(np.float32).reshape(self.dims)


def _tensor(data: memoryview) -> Tensor:
    tensor = Tensor()
    for number, wire, value in fields(data):
        if number == 1:
            tensor.dims += _ints(wire, value)
        elif number == 2:
            tensor.data_type = value
        elif number == 8:
            tensor.name = _text(value)
        elif number == 9:
            tensor.raw = bytes(value)
        elif number in (4, 10):  # float_data, double_data: packed fixed-width, or one value
            width = 4 if number == 4 else 8
            chunk = bytes(value) if wire == 2 else value.to_bytes(width, "little")
            tensor.packed.setdefault(number, []).append(chunk)
        elif number == 5:  # int32_data
            tensor.packed.setdefault(5, []).extend(_ints(wire, value))
        elif number == 13:  # external_data: StringStringEntryProto {key = 1, value = 2}
            entry = {n: _text(v) for n, _, v in fields(value)}
            tensor.external[entry.get(1, "")] = entry.get(2, "")
    return tensor


@dataclass
class Node:
    name: str = ""
    op_type: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    ints: dict[str, int] = field(default_factory=dict)  # integer attributes (transB, group...)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # tensor attributes (Constant)


def _node(data: memoryview) -> Node:
    node = Node()
    for number, _, value in fields(data):
        if number == 1:
            node.inputs.append(_text(value))
        elif number == 2:
            node.outputs.append(_text(value))
        elif number == 3:
            node.name = _text(value)
        elif number == 4:
            node.op_type = _text(value)
        elif number == 5:  # AttributeProto {name = 1, i = 3, t = 5}
            name, integer, tensor = "", None, None
            for n, _, v in fields(value):
                if n == 1:
                    name = _text(v)
                elif n == 3:
                    integer = _int64(v)
                elif n == 5:
                    tensor = _tensor(v)
            if integer is not None:
                node.ints[name] = integer
            if tensor is not None:
                node.tensors[name] = tensor
    return node


def _value_info(data: memoryview) -> tuple[str, list[int]]:
    """ValueInfoProto: the name and the shape (0 for a symbolic dimension such as the batch)."""
    name, dims = "", []
    for number, _, value in fields(data):
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto.tensor_type (1) -> shape (2) -> dim (1) -> dim_value (1)
            for shape in _submessages(value, 1, 2):
                for dim in _submessages(shape, 1):
                    values = [v for d, _, v in fields(dim) if d == 1]
                    dims.append(_int64(values[0]) if values else 0)
    return name, dims


def _submessages(data: memoryview, *path: int) -> Iterator[memoryview]:
    """The messages at a path of field numbers below `data` (each step may repeat)."""
    for number, wire, value in fields(data):
        if number == path[0] and wire == 2:
            if len(path) == 1:
                yield value
            else:
                yield from _submessages(value, *path[1:])


@dataclass
class Graph:
    inputs: list[tuple[str, list[int]]]
    nodes: list[Node]  # in the file's (topological) order
    initializers: dict[str, Tensor]


def read_graph(path: Path) -> Graph:
    """The main graph of the ONNX model at `path`."""
    try:
        data = memoryview(path.read_bytes())
    except OSError as error:
        raise OnnxFileError(f"{path}: {error.strerror or error}") from None
    try:
        graphs = [value for number, wire, value in fields(data) if number == 7 and wire == 2]
        if not graphs:
            raise OnnxFileError("no graph in the file")
        inputs, nodes, initializers = [], [], {}
        for number, _, value in fields(graphs[-1]):
            if number == 1:
                nodes.append(_node(value))
            elif number == 5:
                tensor = _tensor(value)
                initializers[tensor.name] = tensor
            elif number == 11:
                inputs.append(_value_info(value))
    except (ValueError, AttributeError, IndexError, TypeError, OverflowError) as error:
        raise OnnxFileError(f"{path}: not a readable ONNX model ({error})") from None
    return Graph(inputs, nodes, initializers)
