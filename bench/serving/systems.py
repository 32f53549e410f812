"""The systems the suite compares, by the keys the JSON uses, and their names in the report.

A key is the system, with `+spin` when our server ran with ONNX Runtime's thread spinning on
(`--allow-spinning both` measures it both ways).
"""

from __future__ import annotations

from typing import Any

NAMES = {
    "raw": "ONNX Runtime in-process (the limit)",
    "native": "cnnserve, native Classify",
    "oip": "cnnserve, Open Inference Protocol",
    "triton": "Triton (PyTriton, Python backend)",
    "naive": "naive grpc.aio server",
    "floor": "gRPC floor: grpc.aio (uvloop) answering a prebuilt reply",
    "floor-sync": "gRPC floor, synchronous: grpc.server (a thread pool) answering a prebuilt reply",
    "cnnserve": "cnnserve serve",
}
# The workload whose calls alternate between `probabilities` alone and with resnet's stage-1
# map (bench/serving/workload.py builds it; goals and tables read it by this name).
PAIRED = "resnet x1 ± layer1"
ORDER = ("native", "native+spin", "oip", "oip+spin", "triton", "naive", "floor", "floor-sync")


def name(system: str) -> str:
    base, _, spin = system.partition("+")
    return NAMES.get(base, base) + (" (spinning on)" if spin else "")


def measured(data: dict[str, Any]) -> list[str]:
    """The systems with points in the JSON, in a fixed order."""
    found = {p["system"] for p in data.get("points", [])}
    return [s for s in ORDER if s in found] + sorted(found - set(ORDER))
