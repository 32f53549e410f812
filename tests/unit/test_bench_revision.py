"""The commit a benchmark names: git's, or $CNNSERVE_REVISION where git's is not the tree's."""

from __future__ import annotations

import subprocess

import pytest

from bench.reliability.runner import revision


def test_the_revision_is_gits_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNNSERVE_REVISION", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert revision().rstrip("+") == head.stdout.strip()


def test_a_named_revision_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSERVE_REVISION", "e48583e")
    assert revision() == "e48583e"
