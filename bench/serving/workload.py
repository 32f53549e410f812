"""What the suite measures: its models (exported on first use) and the requests it sends.

A `Workload` is one kind of request (model, images per request, outputs wanted) and the
concurrencies it is measured at. Requests are built once, up front, from real Fashion-MNIST
test images: serialized `ClassifyRequest` bytes for our native API (and the gRPC floor,
which answers the same method), UINT8 N x 28 x 28 arrays for the stock `tritonclient` (our
Open Inference Protocol endpoint, Triton and the naive baseline all take the same tensor), so
the load process spends its CPU on the call, not on building it. Native requests carry raw
pixels, the native API's counterpart of a UINT8 tensor, so no system decodes a PNG the others
do not.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.reliability.workload import missing_models, model_config
from bench.serving.systems import PAIRED
from service.proto import cnnserve_pb2 as pb

VARIANTS = 8  # different requests per workload, each on different test images
MODELS = ("lenet5", "resnet")
QUICK_SET = ("logreg", "mlp", "lenet5", "kirsch")  # export/pipeline.py's quick set
FEATURE = "features.layer1"  # resnet's stage-1 output: 16 x 28 x 28 floats, 50 KiB an image
EXPORT_FLAGS = ("--max-steps", "3", "--train-limit", "512", "--no-progress")
SERVERS = ("native", "oip", "triton", "naive")
# The gRPC floor answers prebuilt replies: probabilities, and the stage-1 map when asked for.
WITH_FLOOR = (*SERVERS, "floor", "floor-sync")


@dataclass(frozen=True)
class Workload:
    """One kind of request, and where it is measured."""

    name: str
    model: str
    images: int  # per request
    outputs: tuple[str, ...]  # what the client asks for
    concurrencies: tuple[int, ...]
    triton_model: str = ""  # the Triton binding to call, when not the model's own name
    systems: tuple[str, ...] = SERVERS
    # Calls alternate between the outputs without the feature maps (even calls) and all of
    # them (odd calls), in one run: what a feature map costs is then the difference of two
    # latencies measured side by side, not of two runs apart.
    paired: bool = False

    @property
    def kinds(self) -> tuple[tuple[str, ...], ...]:
        """The outputs of each kind of call, in the order the calls take them."""
        if not self.paired:
            return (self.outputs,)
        return (tuple(o for o in self.outputs if not o.startswith("features.")), self.outputs)


def workloads(concurrencies: tuple[int, ...], quick: bool) -> list[Workload]:
    """Single images at every concurrency; batches of 32, feature maps and Triton's bindings
    at the concurrencies their goals are about."""
    probabilities = ("probabilities",)
    low = min(concurrencies)
    mid = 32 if 32 in concurrencies else max(concurrencies)
    return [
        Workload("lenet5 x1", "lenet5", 1, probabilities, concurrencies, systems=WITH_FLOOR),
        Workload(
            "lenet5 x32",
            "lenet5",
            32,
            probabilities,
            (low,) if quick else (low, 8),
            systems=WITH_FLOOR,
        ),
        Workload("resnet x1", "resnet", 1, probabilities, concurrencies, systems=WITH_FLOOR),
        Workload(
            PAIRED,
            "resnet",
            1,
            (*probabilities, FEATURE),
            (low, mid),
            systems=WITH_FLOOR,
            paired=True,
        ),
        Workload(
            "resnet x1, Triton bound to probabilities only",
            "resnet",
            1,
            probabilities,
            (mid,),
            triton_model="resnet-probabilities",
            systems=("triton",),
        ),
    ]


def export(repository: Path, models: tuple[str, ...], *, everything: bool = False) -> list[str]:
    """Export what is missing with a few training steps (timings do not depend on weights).

    Returns the commands run. `everything` exports the whole family (`cnnserve-export all`);
    a family member that fails to export is reported, not fatal: the memory figure then says
    which models it was taken with.
    """
    exporter = [sys.executable, "-m", "export.cli"]
    commands = []
    if everything:
        commands.append([*exporter, "all", "--skip-existing"])
    else:
        missing = missing_models(repository, models) if repository.is_dir() else list(models)
        commands += [[*exporter, "train", "--model", m] for m in missing]
    done = []
    for command in commands:
        full = [*command, *EXPORT_FLAGS, "--model-repository", str(repository)]
        print("exporting: " + " ".join(full[1:]), flush=True)
        code = subprocess.run(full, check=not everything).returncode
        done.append(
            " ".join(["cnnserve-export", *full[3:]]) + (f" (exit code {code})" if code else "")
        )
    return done


def newest(repository: Path, model: str) -> Path:
    """The newest version's folder, as the service picks it."""
    versions = [p for p in (repository / model).iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name))


def family(repository: Path) -> list[str]:
    """Every model in the repository with a servable version."""
    names = (
        sorted(p.name for p in repository.iterdir() if p.is_dir()) if repository.is_dir() else []
    )
    return [n for n in names if not missing_models(repository, (n,))]


def describe(repository: Path, model: str) -> dict:
    """What the report says about a model: size, cost, batching defaults, outputs."""
    config = model_config(repository, model)
    return {
        "path": str((newest(repository, model) / "model.onnx").resolve()),
        "params": config.get("params"),
        "mflops": config.get("mflops"),
        "batching": config.get("batching"),
        "input": config["input"]["name"],
        "outputs": [[o["name"], o["shape"]] for o in config.get("outputs", [])],
        "features": [[f["name"], f["shape"]] for f in config.get("features", [])],
    }


def pixels(images: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """VARIANTS arrays of n test images each (uint8, n x 28 x 28), all different."""
    rng = np.random.default_rng(seed)
    return [
        np.ascontiguousarray(images[rng.choice(len(images), n, replace=False)])
        for _ in range(VARIANTS)
    ]


def classify_requests(work: Workload, arrays: list[np.ndarray]) -> tuple[bytes, ...]:
    """Serialized native `Classify` calls: raw pixels, top-1, features as the workload asks;
    for a paired workload each array's calls of every kind in turn (request i is of kind
    i % kinds)."""
    return tuple(
        pb.ClassifyRequest(
            model=work.model,
            images=[
                pb.Image(pixels=pb.RawPixels(height=28, width=28, data=p.tobytes())) for p in batch
            ],
            top_k=1,
            features=[o for o in outputs if o.startswith("features.")],
            invert=pb.INVERT_NO,
        ).SerializeToString()
        for batch in arrays
        for outputs in work.kinds
    )
