"""New model versions dropped into the repository under load: swapped in, no call fails.

The server polls its repository (`--repository-poll-seconds`). Clients keep classifying while a
new version appears (it must take over without one failed call) and then a broken one (it must
be reported FAILED with its reason while the version before it keeps serving).
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from PIL import Image

from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc
from service.servicer import DECODE_IN_THREAD_BYTES
from tests.integration.conftest import start_server

CLIENTS = 4
BIG_BATCH = 128
POLL_SECONDS = 0.2
WAIT_SECONDS = 30.0


def _png(pixels, size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _drop_version(source: Path, target: Path, broken: bool = False) -> None:
    """Write a version folder the way the exporter does: complete, then renamed into place."""
    staging = target.parent / f".incoming-{target.name}"
    shutil.copytree(source, staging)
    if broken:
        (staging / "model.onnx").write_bytes(b"this is not an ONNX file")
    staging.rename(target)


class Load:
    """Client threads classifying one image until stopped; every outcome is counted."""

    def __init__(self, address: str, requests: list[pb.ClassifyRequest]) -> None:
        self.address = address
        self.requests = requests
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (status, version that answered)
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._client, args=(requests[i % len(requests)],))
            for i in range(CLIENTS)
        ]

    def _client(self, request: pb.ClassifyRequest) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while not self.stopping.is_set():
                try:
                    reply = stub.Classify(request, timeout=10)
                    outcome = ("OK", reply.version)
                except grpc.RpcError as error:
                    outcome = (error.code().name, "")
                    with self.lock:
                        self.errors.append(f"{error.code().name}: {error.details()}")
                with self.lock:
                    self.outcomes[outcome] += 1

    def versions_seen(self) -> set[str]:
        with self.lock:
            return {version for (status, version) in self.outcomes if status == "OK"}

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_SECONDS:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_new_version_swaps_in_under_load_and_a_broken_one_changes_nothing(
    tiny_repository: Path, tmp_path: Path, fmnist
) -> None:
    shutil.copytree(tiny_repository / "lenet5", tmp_path / "lenet5")
    running = start_server(tmp_path, repository_poll_seconds=POLL_SECONDS)
    # Single images, and batches big enough to be decoded on a worker thread: the server yields
    # while decoding them, the moment a swap can slip in.
    big = [pb.Image(encoded=_png(pixels, 112)) for pixels in fmnist.test_images[:BIG_BATCH]]
    assert sum(len(image.encoded) for image in big) >= DECODE_IN_THREAD_BYTES
    requests = [
        pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=_png(fmnist.test_images[0]))]),
        pb.ClassifyRequest(model="lenet5", images=big, top_k=1),
    ]
    try:
        with Load(running.address, requests) as load:
            _wait_for(lambda: sum(load.outcomes.values()) >= 20, "the first answers")
            # Version 2: another network (cnn) under the same name, so answers show the swap.
            _drop_version(tiny_repository / "cnn" / "1", tmp_path / "lenet5" / "2")
            _wait_for(lambda: "2" in load.versions_seen(), "version 2 to answer")
            answered_by_2 = load.outcomes[("OK", "2")]
            _wait_for(lambda: load.outcomes[("OK", "2")] >= answered_by_2 + 20, "more answers")

            _drop_version(tiny_repository / "cnn" / "1", tmp_path / "lenet5" / "3", broken=True)

            def failed() -> bool:
                info = running.stub.GetModel(pb.GetModelRequest(model="lenet5"), timeout=10)
                states = {v.version: v for v in info.versions}
                return "3" in states and states["3"].state == pb.MODEL_STATE_FAILED

            _wait_for(failed, "version 3 to be reported failed")
            after_broken = load.outcomes[("OK", "2")]
            _wait_for(lambda: load.outcomes[("OK", "2")] >= after_broken + 20, "version 2 to go on")
        info = running.stub.GetModel(pb.GetModelRequest(model="lenet5"), timeout=10)
    finally:
        running.stop()

    assert load.errors == [], load.errors[:5]
    assert set(load.outcomes) == {("OK", "1"), ("OK", "2")}, load.outcomes
    states = {v.version: v for v in info.versions}
    assert states["2"].state == pb.MODEL_STATE_READY
    assert states["1"].state == pb.MODEL_STATE_UNLOADED
    assert states["3"].state == pb.MODEL_STATE_FAILED and states["3"].reason
