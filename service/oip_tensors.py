"""Tensors of the Open Inference Protocol: model specs as KServe names them, and the
classification extension's BYTES output. Pure translation helpers for `oip.py`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from service.errors import InvalidArgument
from service.proto import grpc_service_pb2 as pb
from service.repository import ModelVersion

DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}


class Tensor(NamedTuple):
    """A tensor as model.json describes it: name, datatype, shape per image."""

    name: str
    datatype: str
    shape: list[int]


class Requested(NamedTuple):
    """One requested output: its name, and the top-k asked for by `classification` (0: none)."""

    name: str
    classes: int = 0


def model_input(entry: ModelVersion) -> Tensor:
    spec = entry.config.get("input") or {}
    dtype = DATATYPES.get(str(spec.get("dtype", "float32")), "FP32")
    return Tensor(str(spec.get("name", "image")), dtype, list(spec.get("shape", [1, 28, 28])))


def model_outputs(entry: ModelVersion) -> list[Tensor]:
    """Class outputs first, then every feature output, as model.json lists them."""
    specs = [*entry.config.get("outputs", []), *entry.config.get("features", [])]
    return [
        Tensor(s["name"], DATATYPES.get(str(s.get("dtype", "float32")), "FP32"), list(s["shape"]))
        for s in specs
    ]


def integer_parameter(parameter: pb.InferParameter, where: str) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{where}: expected an integer (int64_param or uint64_param)")
    value = int(getattr(parameter, kind))
    if value < 0:
        raise InvalidArgument(f"{where}: must be >= 0, got {value}")
    return value


def classification(values: np.ndarray, k: int, labels: list[str]) -> tuple[bytes, int]:
    """Triton's classification output: per image the top k as 'score:index[:label]' strings.

    Serialized as a BYTES tensor: each element a 4-byte little-endian length and its bytes.
    """
    flat = values.reshape(len(values), -1)
    k = min(k, flat.shape[1])
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    parts = []
    for row, top in zip(flat, order, strict=True):
        for index in top:
            label = labels[index] if index < len(labels) else ""
            text = f"{float(row[index]):f}:{index}" + (f":{label}" if label else "")
            encoded = text.encode()
            parts.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(parts), k
