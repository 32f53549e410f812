"""Triton Inference Server through PyTriton, serving the suite's ONNX files with ONNX Runtime.

Run by the benchmark's own environment (`bench/.venv-triton/bin/python`, which has
`nvidia-pytriton`), never by the project's: PyTriton pins its own numpy and ships a real
`tritonserver` binary, and neither belongs in the serving install. This file is a plain script
that imports nothing from the project, and takes one argument, a JSON spec:

    {"grpc_port": 8001, "http_port": 8000, "metrics_port": 8002, "threads": 2,
     "allow_spinning": false, "workspace": "/tmp/...",
     "models": [{"name": "resnet", "path": ".../model.onnx", "input": "image",
                 "outputs": [["probabilities", [10]], ["features.layer1", [16, 28, 28]]],
                 "max_batch_size": 64, "max_queue_delay_us": 2000}]}

Each model takes a UINT8 N x 28 x 28 tensor (what the load client sends every server), scales
it to float32 in [0, 1] as cnnserve does, and returns every output listed: a model bound with
all its outputs does what Triton's ONNX Runtime backend does, which copies every output of the
graph on every request. Triton's dynamic batcher gathers requests; `@batch` hands the callable
one stacked array and splits the result. SIGTERM or SIGINT stops Triton and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import sysconfig
import threading
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def session(path: str, threads: int, allow_spinning: bool) -> ort.InferenceSession:
    """Options as cnnserve sets them, so the two servers run the same graph the same way."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def callable_for(model: dict[str, Any], threads: int, allow_spinning: bool) -> Any:
    runner = session(model["path"], threads, allow_spinning)
    input_name = model["input"]
    names = [name for name, _ in model["outputs"]]
    scale = np.float32(1 / 255)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        pixels = image.astype(np.float32).reshape(len(image), 1, 28, 28)
        pixels *= scale
        values = runner.run(names, {input_name: pixels})
        return dict(zip(names, values, strict=True))

    return infer


def python_library_first() -> None:
    """Put this interpreter's libpython before the system's for Triton and its stubs.

    PyTriton's Python-backend stub links libpython3.11 by name; the system's copy is a
    different build from this interpreter's, and a model then fails to load with
    `'_thread.RLock' object has no attribute '_recursion_count'`. Children inherit the path.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        rest = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = libdir + (":" + rest if rest else "")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    python_library_first()
    logging.basicConfig(level=logging.WARNING)
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=spec["grpc_port"],
        http_address="127.0.0.1",
        http_port=spec["http_port"],
        metrics_port=spec["metrics_port"],
        allow_metrics=False,
        log_verbose=0,
    )
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with Triton(config=config, workspace=spec.get("workspace")) as triton:
        for model in spec["models"]:
            triton.bind(
                model_name=model["name"],
                infer_func=callable_for(model, spec["threads"], spec["allow_spinning"]),
                inputs=[Tensor(name="image", dtype=np.uint8, shape=(28, 28))],
                outputs=[
                    Tensor(name=name, dtype=np.float32, shape=tuple(shape))
                    for name, shape in model["outputs"]
                ],
                config=ModelConfig(
                    max_batch_size=model["max_batch_size"],
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=model["max_queue_delay_us"]
                    ),
                ),
                strict=False,
            )
        triton.run()
        print(f"triton ready pid {os.getpid()}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
