"""The calls the scenarios send: real Fashion-MNIST test images, serialized once, up front.

A `Call` is one kind of request (API, model, batch size, features) with a few variants on
different images; the load process sends the bytes as they are, so the client spends its CPU on
gRPC, not on building protobufs. Feature names come from each model's `model.json`, as the
service learns them, so a renamed stage does not break the benchmark.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.proto import cnnserve_pb2 as pb
from service.proto import grpc_service_pb2 as oip

CLASSIFY = "/cnnserve.v1.Inference/Classify"
FEATURE_MAPS = "/cnnserve.v1.Inference/FeatureMaps"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SOAK_MODELS = ("lenet5", "mlp", "kirsch")
VARIANTS = 8  # requests per kind, each on different test images


@dataclass(frozen=True)
class Call:
    """One kind of request: its gRPC method, serialized variants and how to check a reply."""

    name: str
    method: str
    payloads: tuple[bytes, ...]
    images: int
    weight: float
    check: str  # classify | features | infer: what a sampled reply must contain


def test_images() -> np.ndarray:
    """The Fashion-MNIST test set (uint8, N x 28 x 28); `export` finds or downloads it."""
    from export.data import load_fashion_mnist

    return load_fashion_mnist().test_images


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def model_config(repository: Path, model: str) -> dict:
    """The newest version's model.json, as the service would load it."""
    versions = [p for p in (repository / model).iterdir() if p.name.isdigit()]
    newest = max(versions, key=lambda p: int(p.name))
    return json.loads((newest / "model.json").read_text())


def missing_models(repository: Path, models: tuple[str, ...] = SOAK_MODELS) -> list[str]:
    def has_version(model: str) -> bool:
        folder = repository / model
        return folder.is_dir() and any(
            (p / "model.onnx").is_file() for p in folder.iterdir() if p.name.isdigit()
        )

    return [m for m in models if not has_version(m)]


class Builder:
    """Draws test images and serializes requests for either API."""

    def __init__(self, images: np.ndarray, repository: Path, seed: int = 0) -> None:
        self.images = images
        self.repository = repository
        self.rng = np.random.default_rng(seed)

    def _pick(self, n: int) -> np.ndarray:
        return self.images[self.rng.choice(len(self.images), n, replace=False)]

    def _encoded(self, n: int) -> list[pb.Image]:
        return [pb.Image(encoded=png(p)) for p in self._pick(n)]

    def features(self, model: str) -> list[str]:
        return [f["name"] for f in model_config(self.repository, model).get("features", [])]

    def classify(self, model: str, n: int, weight: float, features: tuple[str, ...] = ()) -> Call:
        payloads = tuple(
            pb.ClassifyRequest(
                model=model, images=self._encoded(n), top_k=3, features=features
            ).SerializeToString()
            for _ in range(VARIANTS)
        )
        name = f"Classify {model} x{n}" + (" +features" if features else "")
        return Call(name, CLASSIFY, payloads, n, weight, "classify")

    def feature_maps(self, model: str, n: int, weight: float, features: tuple[str, ...]) -> Call:
        payloads = tuple(
            pb.FeatureMapsRequest(
                model=model, images=self._encoded(n), features=features
            ).SerializeToString()
            for _ in range(VARIANTS)
        )
        shown = ",".join(f.removeprefix("features.") for f in features) or "all"
        return Call(
            f"FeatureMaps {model} x{n} ({shown})", FEATURE_MAPS, payloads, n, weight, "features"
        )

    def model_infer(self, model: str, n: int, weight: float) -> Call:
        spec = model_config(self.repository, model)["input"]
        payloads = []
        for _ in range(VARIANTS):
            pixels = self._pick(n)
            request = oip.ModelInferRequest(
                model_name=model,
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name=spec["name"], datatype="UINT8", shape=[n, 28, 28]
                    )
                ],
                outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
                raw_input_contents=[np.ascontiguousarray(pixels).tobytes()],
            )
            payloads.append(request.SerializeToString())
        return Call(
            f"KServe ModelInfer {model} x{n}", MODEL_INFER, tuple(payloads), n, weight, "infer"
        )


def soak_mix(builder: Builder) -> list[Call]:
    """Both APIs, single images and small batches, classes and feature maps (weights: share)."""
    lenet5 = builder.features("lenet5")
    return [
        builder.classify("lenet5", 1, 22),
        builder.classify("lenet5", 8, 12),
        builder.classify("mlp", 1, 14),
        builder.classify("mlp", 16, 8),
        builder.classify("lenet5", 1, 8, features=tuple(lenet5[:2])),
        builder.feature_maps("kirsch", 1, 10, ()),
        builder.feature_maps("lenet5", 2, 6, tuple(lenet5[-1:])),
        builder.model_infer("mlp", 4, 10),
        builder.model_infer("lenet5", 1, 10),
    ]


def known_answer(builder: Builder, model: str = "lenet5", n: int = 4) -> pb.ClassifyRequest:
    """A fixed request whose reply a restarted server must repeat."""
    return pb.ClassifyRequest(model=model, images=builder._encoded(n), top_k=1)
