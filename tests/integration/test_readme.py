"""The README's Python example runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs_as_written(
    server, fmnist, tmp_path: Path, capsys, monkeypatch
) -> None:
    (example,) = [b for b in code_blocks("python") if "InferenceStub" in b]
    (tmp_path / "samples").mkdir()
    Image.fromarray(fmnist.test_images[0]).save(tmp_path / "samples" / "00000-ankle-boot.png")
    monkeypatch.chdir(tmp_path)
    assert "127.0.0.1:8001" in example
    exec(compile(example.replace("127.0.0.1:8001", server.address), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[('") and lines[1] == "features.c1 (6, 28, 28)"
