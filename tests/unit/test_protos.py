"""The committed generated code in service/proto matches what protoc makes from protos/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "protos").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iservice/proto=protos",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            *protos,
        ],
        cwd=tmp_path,
        check=True,
    )
    generated = sorted(p.name for p in (tmp_path / "service" / "proto").iterdir())
    committed = sorted(p.name for p in (ROOT / "service" / "proto").glob("*_pb2*"))
    assert generated == committed
    for name in generated:
        fresh = (tmp_path / "service" / "proto" / name).read_text()
        assert fresh == (ROOT / "service" / "proto" / name).read_text(), (
            f"service/proto/{name} is stale: regenerate with `make protos`"
        )
