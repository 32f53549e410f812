"""`cnnserve score` against real servers, on real Fashion-MNIST images.

Most runs call the CLI in-process against the session's server; the interrupted run is a real
subprocess killed with SIGKILL, and the retry tests start and stop servers on a fixed port.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.data import LABELS
from service.cli import main
from service.config import Settings
from service.proto import cnnserve_pb2 as pb
from tests.integration.conftest import RunningServer
from tests.prometheus import free_port

IDX = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
CNNSERVE = [sys.executable, "-m", "service.cli"]
MODEL = "lenet5"
REFERENCE_IMAGES = 256


def score(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main(["score", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as file:
            return list(csv.DictReader(file))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def ids_of(path: Path) -> list[str]:
    return [str(row["id"]) for row in read_rows(path)]


def model_json(repository: Path, name: str) -> dict:
    newest = max((repository / name).iterdir(), key=lambda p: int(p.name))
    return json.loads((newest / "model.json").read_text())


def start_on_port(repository: Path, port: int, **overrides) -> RunningServer:
    settings = dataclasses.replace(
        Settings(),
        model_repository=repository,
        models=(MODEL,),
        grpc_address="127.0.0.1",
        grpc_port=port,
        metrics_port=0,
        **overrides,
    )
    return RunningServer(settings)


@pytest.fixture(scope="module")
def reference(server, fmnist) -> dict[str, np.ndarray]:
    """What a plain `Classify` says about the first test images: labels and probabilities."""
    images = [
        pb.Image(pixels=pb.RawPixels(height=28, width=28, data=image.tobytes()))
        for image in fmnist.test_images[:REFERENCE_IMAGES]
    ]
    request = pb.ClassifyRequest(model=MODEL, images=images, top_k=10, invert=pb.INVERT_NO)
    results = server.stub.Classify(request, timeout=60).results
    return {
        "label": np.array([r.top_k[0].label for r in results]),
        "probability": np.array([r.top_k[0].probability for r in results]),
        "true": np.array([LABELS[i] for i in fmnist.test_labels[:REFERENCE_IMAGES]]),
    }


def check_against_reference(rows: list[dict], indices: list[int], reference: dict) -> None:
    assert [row["label"] for row in rows] == reference["label"][indices].tolist()
    probabilities = np.array([float(row["probability"]) for row in rows])
    np.testing.assert_allclose(probabilities, reference["probability"][indices], atol=2e-6)


# outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_output_format(server, capsys, tmp_path: Path, reference, suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    output = tmp_path / f"scores{suffix}"
    status, out, err = score(
        capsys,
        IDX,
        "--server",
        server.address,
        "--model",
        MODEL,
        "--output",
        output,
        "--limit",
        100,
        "--top-k",
        3,
        "--batch-size",
        7,
        "--window",
        3,
    )
    assert status == 0, err
    assert "scored 100 images" in out
    rows = read_rows(output)
    assert list(rows[0]) == ["id", "label", "probability", "top_k", "true_label"]
    assert [str(row["id"]) for row in rows] == [str(i) for i in range(100)]
    check_against_reference(rows, list(range(100)), reference)
    assert [row["true_label"] for row in rows] == reference["true"][:100].tolist()
    for row in rows:
        if suffix == ".csv":
            assert re.fullmatch(r"([^:|]+:\d\.\d{4})(\|[^:|]+:\d\.\d{4}){2}", row["top_k"])
            top = [
                (part.rsplit(":", 1)[0], float(part.rsplit(":", 1)[1]))
                for part in row["top_k"].split("|")
            ]
        else:
            assert isinstance(row["id"], int)
            top = [(entry["label"], entry["probability"]) for entry in row["top_k"]]
        assert len(top) == 3 and top[0][0] == row["label"]
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert not output.with_name(output.name + ".partial.jsonl").exists()


def test_existing_output_needs_resume_or_overwrite(server, capsys, tmp_path: Path) -> None:
    output = tmp_path / "scores.jsonl"
    args = [IDX, "--server", server.address, "--model", MODEL, "--output", output, "--limit", 10]
    assert score(capsys, *args)[0] == 0
    status, _, err = score(capsys, *args)
    assert status == 2 and "pass --resume to continue it or --overwrite" in err
    status, out, _ = score(capsys, *args, "--limit", 20, "--overwrite")
    assert status == 0 and "scored 20 images" in out and len(ids_of(output)) == 20
    status, out, _ = score(capsys, *args[:-2], "--limit", 30, "--resume")
    assert status == 0 and "scored 10 images" in out and "20 were already in" in out
    assert ids_of(output) == [str(i) for i in range(30)]
    status, _, err = score(capsys, *args[:-2], "--output", tmp_path / "scores.txt")
    assert status == 2 and ".csv, .jsonl, .parquet" in err


# inputs -------------------------------------------------------------------------------------


def test_folder_of_images(server, capsys, tmp_path: Path, fmnist, reference) -> None:
    root = tmp_path / "photos"
    folder_names = {0: "T-shirt_top", 9: "Ankle boot", 7: "7"}  # other classes: by their label
    expected = {}
    for i in range(40):
        label = int(fmnist.test_labels[i])
        folder = "misc" if i >= 35 else folder_names.get(label, LABELS[label].lower())
        relative = f"{folder}/item{i:03d}.png"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.test_images[i]).save(root / relative)
        expected[relative] = i
    output = tmp_path / "scores.csv"
    status, out, err = score(
        capsys, root, "--server", server.address, "--model", MODEL, "--output", output
    )
    assert status == 0, err
    rows = read_rows(output)
    assert [row["id"] for row in rows] == sorted(expected)
    indices = [expected[row["id"]] for row in rows]
    check_against_reference(rows, indices, reference)  # the server decodes the same pixels
    truth = [row["true_label"] for row in rows]
    assert truth == [
        "" if row["id"].startswith("misc/") else reference["true"][i]
        for row, i in zip(rows, indices, strict=True)
    ]
    assert re.search(r"^accuracy \d\.\d{4} \(\d+ of 35 images\)", out, re.M)  # misc/ left out


def test_npy_and_npz_arrays(server, capsys, tmp_path: Path, fmnist, reference) -> None:
    images, labels = fmnist.test_images[:50], fmnist.test_labels[:50]
    np.save(tmp_path / "images.npy", images)
    np.savez(tmp_path / "set.npz", x=(images / np.float32(255))[:, None], y=labels)
    for name in ("images.npy", "set.npz"):
        output = tmp_path / f"{name}.jsonl"
        status, out, err = score(
            capsys,
            tmp_path / name,
            "--server",
            server.address,
            "--model",
            MODEL,
            "--output",
            output,
        )
        assert status == 0, err
        rows = read_rows(output)
        assert [row["id"] for row in rows] == list(range(50))
        check_against_reference(rows, list(range(50)), reference)
        assert ("true_label" in rows[0]) == (name == "set.npz")
        assert ("accuracy" in out) == (name == "set.npz")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest(server, capsys, tmp_path: Path, fmnist, reference, suffix: str) -> None:
    order = [5, 3, 8, 1, 0, 13, 21, 2]
    paths = []
    for i in order:
        path = tmp_path / "files" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(fmnist.test_images[i]).save(path)
        paths.append(f"files/{i}.png")
    labels = [
        str(int(fmnist.test_labels[i])) if k % 2 else reference["true"][i]
        for k, i in enumerate(order)
    ]
    labels[-1] = ""  # unknown
    manifest = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        with manifest.open("w", newline="") as file:
            csv.writer(file).writerows([("path", "label"), *zip(paths, labels, strict=True)])
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"path": paths, "label": labels}), manifest)
    output = tmp_path / "scores.jsonl"
    status, out, err = score(
        capsys, manifest, "--server", server.address, "--model", MODEL, "--output", output
    )
    assert status == 0, err
    rows = read_rows(output)
    assert [row["id"] for row in rows] == paths
    check_against_reference(rows, order, reference)
    assert [row["true_label"] for row in rows] == [*reference["true"][order[:-1]].tolist(), None]
    assert "of 7 images" in out


# accuracy -----------------------------------------------------------------------------------


def parse_accuracy(out: str) -> tuple[float, int, int]:
    match = re.search(r"^accuracy (\d\.\d{4}) \((\d+) of (\d+) images\)", out, re.M)
    assert match, out
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


def check_accuracy_run(
    capsys, address: str, repository: Path, model: str, output: Path, *extra
) -> None:
    status, out, err = score(
        capsys, IDX, "--server", address, "--model", model, "--output", output, *extra
    )
    assert status == 0, err
    accuracy, correct, total = parse_accuracy(out)
    exported = model_json(repository, model)["accuracy"]["onnxruntime"]
    assert correct / total == pytest.approx(exported, abs=1e-12)
    assert f"the export measured {exported:.4f}" in out
    rows = read_rows(output)
    assert len(rows) == total
    assert sum(row["label"] == row["true_label"] for row in rows) == correct
    # The printed matrix agrees with the rows: its diagonal is the number correct.
    matrix = [
        list(map(int, line.split()[-10:])) for line in out.splitlines() if re.match(r"^ ?\d ", line)
    ]
    assert len(matrix) == 10 and sum(matrix[i][i] for i in range(10)) == correct
    assert sum(map(sum, matrix)) == total
    picture = Image.open(output.with_name(output.name + ".confusion.png"))
    assert picture.mode == "RGB" and picture.width > 500 and picture.height > 500
    assert len(picture.getcolors(1 << 16) or []) > 20  # a colour scale, not a blank page


@pytest.mark.parametrize("model", ["lenet5", "mlp"])
def test_accuracy_on_512_test_images_equals_the_export(
    server, capsys, tmp_path: Path, tiny_repository: Path, model: str
) -> None:
    """The tiny repository measured its accuracy on the first 512 test images."""
    output = tmp_path / "scores.csv"
    check_accuracy_run(capsys, server.address, tiny_repository, model, output, "--limit", 512)


@pytest.mark.slow
def test_accuracy_on_the_10000_test_images_equals_the_export(
    capsys, tmp_path: Path, fmnist
) -> None:
    pytest.importorskip("torch")
    from export.pipeline import ExportRequest, export_model

    repository = tmp_path / "models"
    export_model(
        ExportRequest(model=MODEL, max_steps=20, train_limit=2048, progress=False),
        fmnist,
        repository,
    )
    running = start_on_port(repository, 0)
    try:
        check_accuracy_run(capsys, running.address, repository, MODEL, tmp_path / "scores.parquet")
    finally:
        running.stop()


@pytest.mark.slow
def test_accuracy_of_every_classifier_in_the_tiny_repository(
    server, capsys, tmp_path: Path, tiny_repository: Path
) -> None:
    for directory in sorted(tiny_repository.iterdir()):
        if (
            directory.name.startswith(".")
            or model_json(tiny_repository, directory.name)["kind"] != "classifier"
        ):
            continue
        output = tmp_path / f"{directory.name}.jsonl"
        check_accuracy_run(
            capsys, server.address, tiny_repository, directory.name, output, "--limit", 512
        )


# resume -------------------------------------------------------------------------------------


def wait_for_rows(path: Path, rows: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= rows:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {rows} rows")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_resume_after_a_kill_loses_nothing_and_repeats_nothing(
    server, capsys, tmp_path: Path, reference, suffix: str
) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    total = 3000
    output = tmp_path / f"scores{suffix}"
    written = output.with_name(output.name + ".partial.jsonl") if suffix == ".parquet" else output
    process = subprocess.Popen(
        [
            *CNNSERVE,
            "score",
            str(IDX),
            "--server",
            server.address,
            "--model",
            MODEL,
            "--output",
            str(output),
            "--limit",
            str(total),
            "--batch-size",
            "4",
            "--window",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_rows(written, 200, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert process.returncode == -signal.SIGKILL  # killed midway, not finished
    done = written.read_bytes().count(b"\n") - (suffix == ".csv")
    assert 200 <= done < total
    with written.open("a") as file:  # a write torn by the kill: half a row, no newline
        file.write("2999,Sneak" if suffix == ".csv" else '{"id": 2999, "label": "Sne')

    status, out, err = score(
        capsys,
        IDX,
        "--server",
        server.address,
        "--model",
        MODEL,
        "--output",
        output,
        "--limit",
        total,
        "--resume",
    )
    assert status == 0, err
    kept = int(re.search(r"; (\d+) were already in", out).group(1))
    assert kept >= done - 1 and f"scored {total - kept} images" in out
    rows = read_rows(output)
    assert [str(row["id"]) for row in rows] == [str(i) for i in range(total)]
    check_against_reference(rows[:REFERENCE_IMAGES], list(range(REFERENCE_IMAGES)), reference)
    assert parse_accuracy(out)[2] == total  # the report covers the resumed rows too
    assert not written.exists() or suffix != ".parquet"


# errors and retries -------------------------------------------------------------------------


def test_bad_item_stops_the_run_and_names_it(server, capsys, tmp_path: Path, fmnist) -> None:
    root = tmp_path / "photos"
    for i in range(30):
        path = root / LABELS[int(fmnist.test_labels[i])] / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.test_images[i]).save(path)
    bad = root / "Coat" / "15-broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    output = tmp_path / "scores.csv"
    args = [root, "--server", server.address, "--model", MODEL, "--output", output]
    status, _, err = score(capsys, *args, "--batch-size", 4)
    assert status == 1
    assert "item Coat/15-broken.png: INVALID_ARGUMENT: encoded:" in err
    assert "rerun with --resume" in err and "Traceback" not in err
    before = ids.index("Coat/15-broken.png") // 4 * 4  # the batches before the bad one
    assert ids_of(output) == ids[:before]

    bad.unlink()
    ids.remove("Coat/15-broken.png")
    status, out, err = score(capsys, *args, "--resume")
    assert status == 0, err
    assert ids_of(output) == ids and f"{before} were already in" in out

    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path\nphotos/{ids[0]}\nphotos/gone.png\n")
    status, _, err = score(capsys, manifest, *args[1:-1], tmp_path / "m.csv")
    assert status == 1 and "item photos/gone.png: cannot read" in err


def test_unknown_model_and_feature_extractor(server, capsys, tmp_path: Path) -> None:
    output = tmp_path / "scores.csv"
    status, _, err = score(
        capsys, IDX, "--server", server.address, "--model", "nope", "--output", output
    )
    assert status == 1 and "NOT_FOUND: model 'nope' not found" in err
    status, _, err = score(
        capsys, IDX, "--server", server.address, "--model", "kirsch", "--output", output
    )
    assert status == 2 and "kirsch is a feature_extractor" in err
    assert not output.exists()


def test_retries_until_a_late_server_starts(capsys, tmp_path: Path, tiny_repository: Path) -> None:
    port = free_port()
    started: list[RunningServer] = []
    timer = threading.Timer(1.5, lambda: started.append(start_on_port(tiny_repository, port)))
    timer.start()
    output = tmp_path / "scores.csv"
    try:
        status, out, err = score(
            capsys,
            IDX,
            "--server",
            f"127.0.0.1:{port}",
            "--model",
            MODEL,
            "--output",
            output,
            "--limit",
            100,
            "--retries",
            10,
            "--retry-backoff",
            0.2,
        )
    finally:
        timer.join()
        for running in started:
            running.stop()
    assert status == 0, err
    assert "UNAVAILABLE" in err and "retry 1 of 10" in err
    assert ids_of(output) == [str(i) for i in range(100)]


def test_retries_when_the_server_restarts_midway(tmp_path: Path, tiny_repository: Path) -> None:
    port = free_port()
    first = start_on_port(tiny_repository, port)
    output = tmp_path / "scores.jsonl"
    total = 3000
    process = subprocess.Popen(
        [
            *CNNSERVE,
            "score",
            str(IDX),
            "--server",
            f"127.0.0.1:{port}",
            "--model",
            MODEL,
            "--output",
            str(output),
            "--limit",
            str(total),
            "--batch-size",
            "4",
            "--window",
            "2",
            "--retries",
            "10",
            "--retry-backoff",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = None
    try:
        wait_for_rows(output, 300, process)
        first.stop(grace=0)
        second = start_on_port(tiny_repository, port)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        if second is not None:
            second.stop()
    assert process.returncode == 0, stderr
    assert "retry 1 of 10" in stderr and f"scored {total} images" in stdout
    assert ids_of(output) == [str(i) for i in range(total)]


def test_items_refused_by_a_full_queue_are_sent_again(
    capsys, tmp_path: Path, tiny_repository: Path
) -> None:
    """A queue of 8 images and 4 requests of 8 in flight: the server refuses some inline.

    Inference stays in the thread pool (no inline batches), so requests queue while a batch
    runs: run on the event loop, a tiny model's batches would finish before the next request
    is even read, and the queue would never fill.
    """
    running = start_on_port(
        tiny_repository, 0, max_batch_size=8, max_queue_images=8, inline_inference_ms=0.0
    )
    output = tmp_path / "scores.csv"
    try:
        status, _, err = score(
            capsys,
            IDX,
            "--server",
            running.address,
            "--model",
            MODEL,
            "--output",
            output,
            "--limit",
            400,
            "--batch-size",
            8,
            "--window",
            4,
            "--retry-backoff",
            0.01,
        )
    finally:
        running.stop()
    assert status == 0, err
    assert "RESOURCE_EXHAUSTED: " in err and "retry 1 of 5" in err
    assert ids_of(output) == [str(i) for i in range(400)]


def test_gives_up_after_the_retries(capsys, tmp_path: Path) -> None:
    status, _, err = score(
        capsys,
        IDX,
        "--server",
        f"127.0.0.1:{free_port()}",
        "--model",
        MODEL,
        "--output",
        tmp_path / "scores.csv",
        "--retries",
        2,
        "--retry-backoff",
        0.05,
    )
    assert status == 1
    assert "gave up after 3 attempts: UNAVAILABLE" in err and "Traceback" not in err


def test_raw_idx_and_labels_beside_it(server, capsys, tmp_path: Path, reference) -> None:
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(IDX.read_bytes()))
    output = tmp_path / "scores.csv"
    status, out, err = score(
        capsys, raw, "--server", server.address, "--model", MODEL, "--output", output, "--limit", 40
    )
    assert status == 0, err
    rows = read_rows(output)
    assert "true_label" not in rows[0] and "accuracy" not in out  # no labels file beside it
    check_against_reference(rows, list(range(40)), reference)
