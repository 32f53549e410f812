"""Writing the versioned model repository that the service reads.

Layout: `<root>/<name>/<version>/model.onnx` plus `model.json` beside it (the per-model config
the service reads: kind, labels, input spec, outputs, batching defaults, and the measured
figures). Versions are whole numbers; a new export adds the next one. A version folder appears
only complete: it is written under a hidden temporary name and renamed into place, so a service
polling the repository never sees half a model. Training checkpoints live in `<root>/.checkpoints`,
which the service ignores like every hidden entry.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

MODEL_FILE = "model.onnx"
CONFIG_FILE = "model.json"
CHECKPOINTS = ".checkpoints"
# int8 variants measured and not served (slower or less accurate), kept for the model table,
# and candidates still being measured. Hidden, so the service never loads them.
REJECTED = ".rejected"
CANDIDATES = ".candidates"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Repository names are plain lowercase words, so they can never name a path elsewhere."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return name


def versions(root: Path, name: str) -> list[int]:
    folder = root / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def checkpoint_path(root: Path, name: str) -> Path:
    return root / CHECKPOINTS / f"{check_name(name)}.pt"


def write_model(root: Path, name: str, proto: onnx.ModelProto, config: dict[str, Any]) -> Path:
    """Write the next version of `name` atomically and return its folder."""
    check_name(name)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder))
    try:
        (staging / MODEL_FILE).write_bytes(data)
        version = (versions(root, name) or [0])[-1] + 1
        config = {
            **config,
            "name": name,
            "version": version,
            "file": {
                "name": MODEL_FILE,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        target = folder / str(version)
        staging.rename(target)  # fails if another writer took the version: nothing is overwritten
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_configs(root: Path) -> list[dict[str, Any]]:
    """Every version's model.json, sorted by name and version (hidden folders skipped)."""
    configs = []
    if not root.is_dir():
        return configs
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in versions(root, model_dir.name):
            path = model_dir / str(version) / CONFIG_FILE
            if path.is_file():
                configs.append(json.loads(path.read_text()))
    return configs
