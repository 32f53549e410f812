"""`cnnserve score --engine ray` on a local Ray instance, checked against the gRPC path.

Starting Ray is the slow part on a small machine, so the module starts one instance (two CPUs)
and every in-process run joins it; the engine must leave a Ray it did not start running. One
run is a real subprocess that starts (and must stop) its own Ray, as the CLI does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.data import LABELS
from tests.integration.test_score import (
    IDX,
    MODEL,
    model_json,
    parse_accuracy,
    read_rows,
    score,
)
from tests.prometheus import free_port

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed: pip install 'cnnserve[ray]'"
)

CNNSERVE = [sys.executable, "-m", "service.cli"]
IMAGES = 512  # the tiny repository measured its accuracy on the first 512 test images


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_both(capsys, server, repository: Path, source: Path, output: Path, *extra) -> tuple:
    """The same job through the server and through Ray: (gRPC rows, Ray rows, both stdouts)."""
    grpc_output = output.with_name("grpc-" + output.name)
    common = ["--model", MODEL, *extra]
    status, grpc_out, err = score(
        capsys, source, *common, "--server", server.address, "--output", grpc_output
    )
    assert status == 0, err
    ray_engine = ["--engine", "ray", "--model-repository", repository]
    status, ray_out, err = score(capsys, source, *common, *ray_engine, "--output", output)
    assert status == 0, err
    return read_rows(grpc_output), read_rows(output), grpc_out, ray_out


def as_json(row: dict) -> dict:
    """A CSV row in the JSON Lines form: numbers, a top-k list, None for no label."""
    if not isinstance(row["top_k"], str):
        return row
    top_k = []
    for part in row["top_k"].split("|"):
        label, probability = part.rsplit(":", 1)
        top_k.append({"label": label, "probability": float(probability)})
    return {
        **row,
        "probability": float(row["probability"]),
        "top_k": top_k,
        "true_label": row.get("true_label") or None,
    }


def assert_same_rows(expected: list[dict], rows: list[dict], top_k_decimals: int = 6) -> None:
    """Six decimals in the file (four in CSV's top k): values within 1e-6 may round apart."""
    assert list(rows[0]) == list(expected[0])  # same columns, same order
    expected, rows = [as_json(row) for row in expected], [as_json(row) for row in rows]
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    assert [row["label"] for row in rows] == [row["label"] for row in expected]
    assert [row.get("true_label") for row in rows] == [row.get("true_label") for row in expected]
    np.testing.assert_allclose(
        [row["probability"] for row in rows], [row["probability"] for row in expected], atol=1.1e-6
    )
    for ours, theirs in zip(rows, expected, strict=True):
        assert [e["label"] for e in ours["top_k"]] == [e["label"] for e in theirs["top_k"]]
        np.testing.assert_allclose(
            [e["probability"] for e in ours["top_k"]],
            [e["probability"] for e in theirs["top_k"]],
            atol=1.1 * 10.0**-top_k_decimals,
        )


def ray_processes() -> dict[int, str]:
    """Live Ray processes by pid: the GCS, raylet and helpers, and the `ray::` workers."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if command.startswith("ray::") or "site-packages/ray/" in command:
            found[int(entry.name)] = command
    return found


def test_own_local_ray_in_a_subprocess_is_stopped(tiny_repository: Path, tmp_path: Path) -> None:
    """The CLI as users run it: it starts a local Ray, scores, and leaves no Ray behind."""
    output = tmp_path / "scores.jsonl"
    before = set(ray_processes())
    command = [*CNNSERVE, "score", str(IDX), "--engine", "ray", "--model", MODEL]
    command += ["--model-repository", str(tiny_repository), "--output", str(output)]
    command += ["--limit", "64", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "scored 64 images" in out and "Traceback" not in err
    assert [row["id"] for row in read_rows(output)] == list(range(64))
    deadline = time.monotonic() + 10
    while (left := {p: c for p, c in ray_processes().items() if p not in before}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not left, f"Ray processes left running: {left}"


def test_idx_matches_the_grpc_path(
    local_ray, server, capsys, tmp_path: Path, tiny_repository: Path
) -> None:
    output = tmp_path / "scores.jsonl"
    expected, rows, grpc_out, ray_out = run_both(
        capsys, server, tiny_repository, IDX, output, "--limit", IMAGES, "--batch-size", 50
    )
    assert [row["id"] for row in rows] == list(range(IMAGES))
    assert_same_rows(expected, rows)
    accuracy = parse_accuracy(ray_out)
    assert accuracy == parse_accuracy(grpc_out)
    exported = model_json(tiny_repository, MODEL)["accuracy"]["onnxruntime"]
    assert accuracy[1] / accuracy[2] == pytest.approx(exported, abs=1e-12)
    assert f"the export measured {exported:.4f}" in ray_out
    assert (tmp_path / "scores.jsonl.confusion.png").is_file()
    assert ray.is_initialized()  # the caller's Ray is left running


def test_folder_of_pngs_matches_the_grpc_path(
    local_ray, server, capsys, tmp_path: Path, tiny_repository: Path, fmnist
) -> None:
    """Files are decoded on the workers exactly as the server decodes them, inversion too."""
    root = tmp_path / "photos"
    for i in range(60):
        label = LABELS[int(fmnist.test_labels[i])]
        folder = root / ("misc" if i >= 55 else label.replace("/", "_"))
        folder.mkdir(parents=True, exist_ok=True)
        image = fmnist.test_images[i]
        if i % 3 == 0:  # dark on light: --invert auto turns it back
            Image.fromarray(255 - image).resize((56, 56)).save(folder / f"{i:03d}.png")
        else:
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    expected, rows, grpc_out, ray_out = run_both(
        capsys, server, tiny_repository, root, tmp_path / "scores.csv", "--batch-size", 8
    )
    assert len(rows) == 60 and [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    assert_same_rows(expected, rows, top_k_decimals=4)
    assert parse_accuracy(ray_out) == parse_accuracy(grpc_out)
    assert parse_accuracy(ray_out)[2] == 55  # misc/ has no label


def test_resume_and_a_bad_item(
    local_ray, server, capsys, tmp_path: Path, tiny_repository: Path, fmnist
) -> None:
    root = tmp_path / "photos"
    for i in range(24):
        path = root / LABELS[int(fmnist.test_labels[i])].replace("/", "_") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.test_images[i]).save(path)
    bad = root / "Coat" / "15-broken.png"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    output = tmp_path / "scores.jsonl"
    args = [root, "--engine", "ray", "--model-repository", tiny_repository, "--model", MODEL]
    status, _, err = score(capsys, *args, "--output", output, "--batch-size", 4)
    assert status == 1
    assert "item Coat/15-broken.png: encoded: truncated or corrupt PNG" in err
    assert "rerun with --resume" in err and "Traceback" not in err
    before = ids.index("Coat/15-broken.png") // 4 * 4  # the batches before the bad one
    assert [row["id"] for row in read_rows(output)] == ids[:before]

    bad.unlink()
    ids.remove("Coat/15-broken.png")
    status, out, err = score(capsys, *args, "--output", output, "--resume")
    assert status == 0, err
    assert f"scored {len(ids) - before} images" in out and f"{before} were already in" in out
    rows = read_rows(output)
    assert [row["id"] for row in rows] == ids

    fresh = tmp_path / "fresh.jsonl"
    assert score(capsys, *args, "--output", fresh)[0] == 0
    assert_same_rows(read_rows(fresh), rows)


def test_errors_before_ray_starts(capsys, tmp_path: Path, tiny_repository: Path, monkeypatch):
    output = tmp_path / "scores.csv"
    args = [IDX, "--engine", "ray", "--output", output, "--limit", 10]
    status, _, err = score(capsys, *args, "--model", "nope", "--model-repository", tiny_repository)
    assert status == 1 and "no model 'nope' in" in err and "lenet5" in err
    status, _, err = score(
        capsys, *args, "--model", "kirsch", "--model-repository", tiny_repository
    )
    assert status == 2 and "kirsch is a feature_extractor with no class output" in err
    status, _, err = score(capsys, *args, "--model", MODEL, "--model-repository", tmp_path / "x")
    assert status == 1 and "does not exist" in err
    status, _, err = score(
        capsys, *args, "--model", MODEL, "--model-repository", tiny_repository, "--version", "99"
    )
    assert status == 1 and "has no version '99'" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    status, _, err = score(capsys, *args, "--model", MODEL)
    assert status == 2
    assert err.strip().splitlines() == [
        "cnnserve score: --engine ray needs Ray: install the ray extra: pip install 'cnnserve[ray]'"
    ]
    assert not output.exists()


def test_an_unreachable_cluster_fails_in_seconds() -> None:
    """`ray.init` retries a wrong address for minutes; the engine checks it first."""
    from service.scoring.ray_engine import check_reachable
    from service.scoring.stream import ScoreError

    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ScoreError, match=f"cannot reach the Ray cluster at {address}"):
        check_reachable(address)
    with pytest.raises(ScoreError, match="cannot reach"):
        check_reachable(f"ray://{address}")
    check_reachable("auto")  # Ray's own names are left to Ray
    assert time.monotonic() - started < 10
