"""bench.gpu_shapes measures every way for every model, and refuses a model it cannot find."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_shapes


def test_every_way_is_measured_and_recorded(tiny_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "shapes.json"
    argv = ["--device", "cpu", "--cycles", "1", "--models", "lenet5"]
    assert (
        gpu_shapes.main([*argv, "--model-repository", str(tiny_repository), "--out", str(out)]) == 0
    )
    record = json.loads(out.read_text())
    ways = record["models"]["lenet5"]
    assert set(ways) == {*gpu_shapes.SEARCHES, "session per size", "steady"}
    for label, figures in ways.items():
        assert 0 < figures["median_ms"] <= figures["max_ms"], label
    assert record["device"] == "cpu" and record["cycle"] == list(gpu_shapes.CYCLE)


def test_a_missing_model_is_refused(tmp_path: Path, capsys) -> None:
    argv = ["--device", "cpu", "--models", "nothing", "--model-repository", str(tmp_path)]
    assert gpu_shapes.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    assert "no " in capsys.readouterr().err and not (tmp_path / "x.json").exists()
