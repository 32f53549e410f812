"""Restart after kill -9: seconds from launch to SERVING, and to the first correct answer.

Each round launches the server on the same port, waits for grpc health SERVING, asks a fixed
Classify and kills the process with SIGKILL (no drain, no clean-up: what a crash or an OOM kill
leaves). The first answer must equal the first round's, so a restart that serves but answers
differently (a half-loaded model, a wrong version) counts as a failure, not a success.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.reliability import stats
from bench.reliability.server import Server, free_port, wait_serving
from bench.reliability.workload import SOAK_MODELS, Builder, known_answer
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc

READY_GOAL_S = 5.0  # "ready again within a few seconds"
ANSWER_TIMEOUT_S = 30.0


def first_answer(address: str, request: pb.ClassifyRequest) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.InferenceStub(channel).Classify(request, timeout=ANSWER_TIMEOUT_S)
    return np.array([list(r.probabilities) for r in reply.results])


def run(repository: Path, logs: Path, builder: Builder, rounds: int) -> dict[str, Any]:
    request = known_answer(builder)
    port, metrics_port = free_port(), free_port()
    reference: np.ndarray | None = None
    attempts = []
    for attempt in range(1, rounds + 1):
        server = Server(
            repository,
            SOAK_MODELS,
            logs / "restart-server.log",
            port=port,
            metrics_port=metrics_port,
        )
        launched = server.launch()
        try:
            wait_serving(server.address, server, timeout=120, poll=0.02)
            serving = time.monotonic() - launched
            answer = first_answer(server.address, request)
            answered = time.monotonic() - launched
        finally:
            if server.alive():
                server.kill9()
        same = reference is None or bool(np.allclose(answer, reference, atol=1e-6))
        reference = answer if reference is None else reference
        attempts.append(
            {
                "attempt": attempt,
                "serving_s": round(serving, 3),
                "first_answer_s": round(answered, 3),
                "same_answer": same,
                "exit_signal": -server.process.returncode if server.process else None,
            }
        )
    serving_s = [a["serving_s"] for a in attempts]
    answer_s = [a["first_answer_s"] for a in attempts]
    worst = max(answer_s)
    return {
        "settings": {
            "rounds": rounds,
            "models": list(SOAK_MODELS),
            "images_per_check": len(request.images),
            "server_command": server.command(),
        },
        "attempts": attempts,
        "serving_s": _spread(serving_s),
        "first_answer_s": _spread(answer_s),
        "goals": [
            stats.goal(
                "ready again within a few seconds",
                f"every restart answers within {READY_GOAL_S:g} s of launch",
                f"slowest {worst:.2f} s",
                worst <= READY_GOAL_S,
            ),
            stats.goal(
                "same answers after kill -9",
                "each restart's first answer equals the first round's",
                f"{sum(a['same_answer'] for a in attempts)} of {len(attempts)}",
                all(a["same_answer"] for a in attempts),
            ),
        ],
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }
