"""`cnnserve score --engine ray`: the same batch job on a Ray cluster, with no gRPC server.

`RayScorer` stands in for `StreamScorer`: it answers `GetModel` from the model repository's
`model.json` and yields every batch with a `ClassifyResponse`, so `command.run` reads the input,
resumes, writes and reports exactly as it does over gRPC. Inside, the items not yet scored go
into a Ray Data dataset (pixels of arrays and IDX files travel in the object store; image files
travel as paths and are read by the workers), and `map_batches` runs `BatchClassifier` in an
actor pool: one `ModelRuntime` per actor, images decoded by `service.preprocess` exactly as the
server decodes them, the top k picked as the servicer picks them. The model itself is shipped
with the job, so the cluster's nodes need cnnserve installed, not the model repository. Ray is
imported only when this engine runs, so the rest of the CLI stays light.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service import preprocess
from service.proto import cnnserve_pb2 as pb
from service.repository import CONFIG_FILE, MODEL_FILE, NAME, ModelVersion
from service.runtime import LoadError, ModelRuntime, RuntimeOptions
from service.scoring.inputs import InputItem
from service.scoring.stream import Batch, ScoreError

INSTALL_HINT = "--engine ray needs Ray: install the ray extra: pip install 'cnnserve[ray]'"
INVERT = {pb.INVERT_AUTO: "auto", pb.INVERT_YES: "yes", pb.INVERT_NO: "no"}
# One actor per CPU, each with one ONNX Runtime thread: the pool, not the session, is parallel.
ACTOR_OPTIONS = RuntimeOptions(device="cpu", intra_op_threads=1)
# Rows per dataset block: coarse enough that Ray's per-block cost stays small, fine enough that
# the progress bar moves and a killed run keeps most of its work.
BLOCK_ROWS = 256
CONNECT_TIMEOUT_S = 5.0


def find_model(root: Path, name: str, version: str = "") -> ModelVersion:
    """The asked (or newest) version of `name` under `root`, with its model.json read."""
    if not root.is_dir():
        raise ScoreError(
            f"model repository {root} does not exist; export models first or pass "
            "--model-repository"
        )
    folder = root / name
    versions = {}
    if NAME.match(name) and folder.is_dir():
        versions = {int(p.name): p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}
    if not versions:
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and NAME.match(p.name))
        raise ScoreError(f"no model {name!r} in {root}; found: {', '.join(found) or 'none'}")
    if version and (not version.isdigit() or int(version) not in versions):
        listed = ", ".join(str(v) for v in sorted(versions))
        raise ScoreError(f"model {name} has no version {version!r} in {root}; it has {listed}")
    number = int(version) if version else max(versions)
    try:
        config = json.loads((versions[number] / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ScoreError(f"{name} {number}: unreadable {CONFIG_FILE}: {error}") from None
    return ModelVersion(name, str(number), versions[number] / MODEL_FILE, config)


def model_info(entry: ModelVersion, provider: str) -> pb.ModelInfo:
    """What the server's GetModel says about a version, as far as the command uses it."""
    info = pb.ModelInfo(
        name=entry.name,
        version=entry.version,
        kind=entry.kind,
        summary=str(entry.config.get("summary", "")),
        labels=entry.labels,
        execution_provider=provider,
    )
    accuracy = (entry.config.get("accuracy") or {}).get("onnxruntime")
    if accuracy is not None:
        info.accuracy = float(accuracy)
    return info


class BatchClassifier:
    """The map_batches callable: one per actor, holding its own ONNX Runtime session.

    A batch is rows of `position` and either `pixels` (H x W uint8) or `path` (an image file).
    An image that cannot be read or decoded does not fail the task: its row carries the message
    in `error`, and the driver stops at it, naming the item, as the gRPC path does.
    """

    def __init__(self, model: bytes, classes: int, top_k: int, invert: str) -> None:
        folder = Path(tempfile.mkdtemp(prefix="cnnserve-ray-"))
        try:
            (folder / MODEL_FILE).write_bytes(model)
            self.runtime = ModelRuntime(folder / MODEL_FILE, ACTOR_OPTIONS)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.classes, self.top_k, self.invert = classes, top_k, preprocess.Invert(invert)

    def _decode(self, batch: dict[str, np.ndarray], row: int) -> np.ndarray:
        if "pixels" in batch:
            pixels = np.ascontiguousarray(batch["pixels"][row], dtype=np.uint8)
            height, width = pixels.shape
            return preprocess.from_pixels(height, width, pixels.tobytes(), self.invert)
        return preprocess.from_encoded(Path(str(batch["path"][row])).read_bytes(), self.invert)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["position"])
        field = "pixels" if "pixels" in batch else "encoded"
        images = np.zeros((count, 1, preprocess.SIZE, preprocess.SIZE), np.float32)
        errors = np.full(count, "", dtype=object)
        for row in range(count):
            try:
                images[row] = self._decode(batch, row)
            except preprocess.InvalidImage as error:
                errors[row] = f"{field}: {error}"
            except OSError as error:
                errors[row] = f"cannot read {batch['path'][row]}: {error.strerror or error}"
        good = errors == ""
        probabilities = np.zeros((count, self.classes), np.float32)
        if good.any():
            ran = self.runtime.run(images if good.all() else images[good], ["probabilities"])
            probabilities[good] = ran["probabilities"]
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
        return {
            "position": batch["position"],
            "top_index": order,
            "top_probability": np.take_along_axis(probabilities, order, axis=1),
            "error": errors,
        }


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ScoreError(INSTALL_HINT) from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in seconds on a wrong HOST:PORT, where `ray.init` retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # `auto`, `local` and the like: Ray itself knows what they mean
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ScoreError(f"cannot reach the Ray cluster at {address}: {error}") from None


def _quiet_ray_data() -> None:
    """Ray Data tells the console about every execution and that its progress bars are off;
    the command prints its own progress and summary. Its log file keeps everything."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _root_message(error: BaseException) -> str:
    """The last line of a Ray error: the worker's own exception, not Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class RayScorer:
    """Scores batches with one model on Ray; yields each batch with its results, in order."""

    def __init__(
        self,
        repository: Path,
        model: str,
        version: str = "",
        address: str | None = None,
        batch_size: int = 32,
        top_k: int = 5,
        invert: int = pb.INVERT_AUTO,
    ) -> None:
        self.ray = _import_ray()
        self.repository, self.model, self.version = repository, model, version
        self.address = address
        self.batch_size, self.top_k, self.invert = batch_size, top_k, invert
        self.entry: ModelVersion | None = None
        self.started = False  # this scorer started Ray, so it shuts it down

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        """`GetModel`, the one call the command makes, answered from the repository. The
        model is loaded once here, so a broken file fails now rather than in every actor."""
        if method != "GetModel":
            raise NotImplementedError(f"the ray engine answers GetModel only, not {method}")
        entry = find_model(self.repository, self.model, self.version)
        try:
            runtime = ModelRuntime(entry.path, ACTOR_OPTIONS)
        except LoadError as error:
            raise ScoreError(f"{entry.name} {entry.version}: {error}") from None
        if entry.kind == "classifier" and "probabilities" not in runtime.output_names:
            raise ScoreError(f"{entry.name} {entry.version}: the model has no probabilities")
        self.entry = entry
        return model_info(entry, runtime.provider)

    def _start(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return  # a caller's Ray (a test, a notebook): use it and leave it running
        try:
            if self.address:
                check_reachable(self.address)
                ray.init(address=self.address, logging_level=logging.WARNING)
            else:
                ray.init(
                    include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
                )
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = self.address or "a local instance"
            raise ScoreError(f"cannot start Ray ({where}): {_root_message(error)}") from None
        self.started = True

    def _dataset(self, items: list[InputItem]) -> Any:
        ray = self.ray
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = False  # the command draws its own
        context.print_on_execution_start = False
        _quiet_ray_data()
        if items[0].pixels is not None:
            rows = [{"position": i, "pixels": item.pixels} for i, item in enumerate(items)]
        else:  # absolute: a worker's working folder is not the driver's
            rows = [
                {"position": i, "path": str(Path(str(item.path)).resolve())}
                for i, item in enumerate(items)
            ]
        blocks = max(1, -(-len(rows) // max(BLOCK_ROWS, self.batch_size)))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)
        assert self.entry is not None
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return dataset.map_batches(
            BatchClassifier,
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_cpus=1,
            fn_constructor_kwargs={
                "model": self.entry.path.read_bytes(),
                "classes": len(self.entry.labels),
                "top_k": self.top_k,
                "invert": INVERT[self.invert],
            },
        )

    def score(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, pb.ClassifyResponse]]:
        if self.entry is None:
            raise ScoreError("call GetModel before score")
        pending = collections.deque(batches)
        items = [item for batch in pending for item in batch.items]
        if not items:
            return
        self._start()
        rows: collections.deque[tuple[np.ndarray, np.ndarray, str]] = collections.deque()
        seen = 0
        try:
            for block in self._dataset(items).iter_batches(batch_size=None, batch_format="numpy"):
                positions = block["position"]
                if not np.array_equal(positions, np.arange(seen, seen + len(positions))):
                    raise ScoreError("Ray Data returned the rows out of order")
                seen += len(positions)
                columns = (block["top_index"], block["top_probability"], block["error"])
                rows.extend(zip(*columns, strict=True))
                while pending and len(rows) >= len(pending[0].items):
                    batch = pending.popleft()
                    yield batch, self._response(batch, [rows.popleft() for _ in batch.items])
        except self.ray.exceptions.RayError as error:
            raise ScoreError(f"the Ray job failed: {_root_message(error)}") from None
        if pending:
            raise ScoreError(f"Ray returned {seen} of {len(items)} rows")

    def _response(
        self, batch: Batch, rows: list[tuple[np.ndarray, np.ndarray, str]]
    ) -> pb.ClassifyResponse:
        assert self.entry is not None
        labels = self.entry.labels
        results = []
        for item, (indices, probabilities, error) in zip(batch.items, rows, strict=True):
            if error:
                raise ScoreError(f"item {item.id}: {error}")
            scores = [
                pb.ClassScore(index=int(c), label=labels[c], probability=float(p))
                for c, p in zip(indices, probabilities, strict=True)
            ]
            results.append(pb.Classification(top_k=scores))
        return pb.ClassifyResponse(
            model=self.entry.name, version=self.entry.version, results=results
        )

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
