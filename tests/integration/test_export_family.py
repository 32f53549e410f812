"""`cnnserve-export all --jobs 2` for real: members trained at once in worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from export import family  # noqa: E402
from export.pipeline import QUICK_SET  # noqa: E402


def export_all(repository: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "export.cli", "all", "--quick", "--jobs", "2"]
    command += ["--max-steps", "5", "--train-limit", "640", "--skip-existing"]
    command += ["--model-repository", str(repository), *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_two_jobs_train_the_quick_set_record_the_run_and_resume(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    first = export_all(repository, "--quantize", "int8")
    assert first.returncode == 0, first.stderr
    assert "2 at a time" in first.stdout and "longest first" in first.stdout
    for name in QUICK_SET:
        assert (repository / name / "1" / "model.onnx").is_file(), name
    classifiers = [n for n in QUICK_SET if n != "kirsch"]
    for name in classifiers:  # quantized after training, in the parent
        assert (repository / f"{name}-int8" / "1" / "model.onnx").is_file(), name
    (run,) = family.read_runs(repository)
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert (run["jobs"], run["threads"]) == (2, threads)
    assert run["trained"] == sorted(QUICK_SET) and run["failed"] == [] and run["seconds"] > 0
    config = json.loads((repository / "lenet5" / "1" / "model.json").read_text())
    assert config["training"]["steps"] == 5

    # Everything is there: the next run skips all of it and records no run.
    again = export_all(repository)
    assert again.returncode == 0, again.stderr
    assert all(f"skip {name}: already in" in again.stdout for name in QUICK_SET)
    assert len(family.read_runs(repository)) == 1
