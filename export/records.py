"""The model table's memory: each row's metadata kept beside docs/MODELS.md, in git.

Why: the model repository holds gigabytes of checkpoints and ONNX files and is not in git, so a
model trained once on a borrowed GPU, or a family trained on another machine, would drop out of
the table the next time `cnnserve-export report` ran anywhere else. The report writes every
row's `model.json` here, and a model that is no longer in the repository keeps its row from
its record: its training figures stay, its speed columns say it was not measured here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUFFIX = ".json"
RUNS = "family-runs.json"  # the repository's .family-runs.json, kept with the rows it timed


def save(folder: Path, config: dict[str, Any], served: bool) -> Path:
    """Write one row's metadata (and whether the repository serves it) as NAME.json."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config['name']}{SUFFIX}"
    path.write_text(json.dumps({"served": served, "config": config}, indent=1) + "\n")
    return path


def load(folder: Path) -> list[tuple[dict[str, Any], bool]]:
    """Every record's (metadata, served), by name; [] when there is no such folder."""
    if not folder.is_dir():
        return []
    kept = []
    for path in sorted(p for p in folder.glob(f"*{SUFFIX}") if p.name != RUNS):
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError(f"{path}: expected {{'served': bool, 'config': {{...}}}}")
        kept.append((record["config"], bool(record.get("served", True))))
    return kept


def read_runs(path: Path) -> list[dict[str, Any]]:
    """A list of `cnnserve-export all` runs from `path`, oldest first ([] when it is absent).

    One reader for both copies: the repository's `.family-runs.json` and the one kept here.
    """
    if not path.exists():
        return []
    runs = json.loads(path.read_text())
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise ValueError(f"{path}: expected a list of runs")
    return runs


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """The kept `cnnserve-export all` runs ([] when none are kept)."""
    return read_runs(folder / RUNS)


def save_runs(folder: Path, runs: list[dict[str, Any]]) -> None:
    if runs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUNS).write_text(json.dumps(runs, indent=1) + "\n")


def merge_runs(*lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One list of runs, each once (a run is known by its start), oldest first."""
    by_start = {run["started"]: run for runs in lists for run in runs}
    return [by_start[start] for start in sorted(by_start)]
