"""Triton Inference Server, started through PyTriton from the benchmark's own environment.

`bench/.venv-triton` holds `nvidia-pytriton` (which ships a real `tritonserver`), ONNX Runtime
and the numpy PyTriton wants; `make bench` creates it (`make bench-triton-env`). The suite runs
`triton_app.py` with that environment's Python. What is measured is Triton with its Python
backend, which is what PyTriton runs: its C++ ONNX Runtime backend is not part of PyTriton and
cannot be installed here. When the environment is missing or Triton does not start, the suite
records why and goes on without it: no figure is ever made up.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.reliability.server import free_port
from bench.serving.processes import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / "bench" / ".venv-triton" / "bin" / "python"
APP = Path(__file__).with_name("triton_app.py")
PACKAGES = ("nvidia-pytriton", "onnxruntime", "numpy", "tritonclient")
BACKEND_NOTE = (
    "Triton with its Python backend (what PyTriton runs), ONNX Runtime inside the Python "
    "callable; Triton's C++ ONNX Runtime backend is not part of PyTriton and cannot be "
    "installed here"
)


def unavailable() -> str | None:
    """Why Triton cannot run here, or None when its environment is in place."""
    if not PYTHON.exists():
        return f"{PYTHON.relative_to(ROOT)} is missing: run `make bench-triton-env`"
    probe = subprocess.run(
        [str(PYTHON), "-c", "import pytriton.triton, onnxruntime"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return "PyTriton does not import: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None


def versions() -> dict[str, str]:
    """Package versions inside the Triton environment, and the bundled tritonserver's."""
    if not PYTHON.exists():
        return {}
    code = (
        "import json; from importlib import metadata as m\n"
        f"names = {list(PACKAGES)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    reply = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True)
    return json.loads(reply.stdout) if reply.returncode == 0 else {}


@dataclass
class TritonServer(ServerProcess):
    """PyTriton's Triton with one binding per entry of `bindings` (see triton_app.py)."""

    bindings: list[dict[str, Any]] = field(default_factory=list)
    workspace: Path | None = None
    threads: int = 0
    allow_spinning: bool = False

    def command(self) -> list[str]:
        spec = {
            "grpc_port": self.port,
            "http_port": free_port(),
            "metrics_port": free_port(),
            "threads": self.threads,
            "allow_spinning": self.allow_spinning,
            "workspace": str(self.workspace) if self.workspace else None,
            "models": self.bindings,
        }
        return [str(PYTHON), str(APP), json.dumps(spec)]


def bindings(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model bound with every output, as Triton's ONNX Runtime backend serves an ONNX
    file; resnet once more with only its probabilities, to show what the copies cost."""
    out = []
    for name, info in models.items():
        every = [*info["outputs"], *info["features"]]
        batching = info["batching"] or {}
        common = {
            "path": info["path"],
            "input": info["input"],
            "max_batch_size": int(batching.get("max_batch_size", 64)),
            "max_queue_delay_us": round(float(batching.get("max_queue_delay_ms", 1.0)) * 1000),
        }
        out.append({"name": name, "outputs": every, **common})
        if name == "resnet":
            probabilities = [o for o in info["outputs"] if o[0] == "probabilities"]
            out.append({"name": "resnet-probabilities", "outputs": probabilities, **common})
    return out
