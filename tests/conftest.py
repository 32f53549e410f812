"""Shared fixtures: the real Fashion-MNIST data, and a tiny model repository exported once.

The repository holds every family member trained for a few steps on a small subset: untrained
weights run the same graphs at the same cost, and exporting them all takes well under a minute.
Export needs torch; where it is missing (a serving-only install), tests that need models skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_STEPS = 3
TINY_TRAIN_IMAGES = 512


@pytest.fixture(scope="session")
def fmnist():
    from export.data import load_fashion_mnist

    return load_fashion_mnist(download=False)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, fmnist) -> Path:
    """Every family member, trained for a handful of steps, exported and validated."""
    pytest.importorskip("torch")
    from export.pipeline import ExportRequest, export_model
    from export.registry import list_models

    # CNNSERVE_TEST_REPOSITORY keeps the repository between runs during development (delete
    # the folder after changing a model); CI and a plain `make test` always build a fresh one.
    kept = os.environ.get("CNNSERVE_TEST_REPOSITORY")
    if kept and (Path(kept) / list_models()[-1]).is_dir():
        return Path(kept)
    root = Path(kept) if kept else tmp_path_factory.mktemp("models")
    for name in list_models():
        request = ExportRequest(
            model=name,
            max_steps=TINY_STEPS,
            train_limit=TINY_TRAIN_IMAGES,
            test_limit=TINY_TRAIN_IMAGES,
            progress=False,
        )
        export_model(request, fmnist, root)
    return root
