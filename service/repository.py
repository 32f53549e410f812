"""The model repository as the service sees it: what is there, what is loaded, in what state.

Layout (written by `cnnserve-export`): `<root>/<name>/<version>/model.onnx` and `model.json`.
The newest version of each model is loaded; older ones are listed as unloaded. Client-supplied
names are only ever looked up in the dictionary of scanned models, never joined onto a path,
so no name can reach outside the repository. Sessions are created one at a time on a single
loader thread (session creation is not thread-safe), and each loaded version owns its batcher.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service import metrics
from service.batching import Batcher, BatchPolicy
from service.errors import InvalidArgument, NotFound, Unavailable
from service.runtime import ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "model.json"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class BatchOverrides:
    """CLI/environment values that replace the per-model batching defaults from model.json."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_images: int = 4096
    max_in_flight: int = 1
    inline_ms: float = 0.25  # batches predicted to take at most this long run on the loop
    coalesce_busy: float = 0.8  # the loop's busy fraction from which those wait to fill


@dataclass(eq=False)
class ModelVersion:
    """One version of one model: its config, state, and (when ready) runtime and batcher."""

    name: str
    version: str
    path: Path
    config: dict[str, Any]
    state: State = State.UNLOADED
    reason: str = ""
    runtime: ModelRuntime | None = None
    batcher: Batcher | None = None
    load_seconds: float | None = None
    feature_names: tuple[str, ...] = field(default=())
    # Class outputs, then feature outputs: every name a request may ask for, read once.
    output_names: tuple[str, ...] = field(default=())
    # Values per image of each output, and whether it is a feature map (sent at the dtype
    # asked for) or a class output (float32): what a reply's size is reckoned from.
    output_sizes: dict[str, tuple[int, bool]] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return self.runtime.provider if self.runtime else ""

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", "classifier"))

    @property
    def labels(self) -> list[str]:
        return list(self.config.get("labels") or [])

    def resolve_features(self, requested: Iterable[str], field_name: str) -> list[str]:
        """Output names from 'features.conv1' or 'conv1'; an unknown name lists the valid ones."""
        resolved = []
        for index, name in enumerate(requested):
            full = name if name.startswith("features.") else f"features.{name}"
            if full not in self.feature_names:
                valid = ", ".join(self.feature_names) or "none"
                raise InvalidArgument(
                    f"{field_name}[{index}]: model {self.name} has no feature output "
                    f"{name[:80]!r}; valid: {valid}"
                )
            resolved.append(full)
        return list(dict.fromkeys(resolved))


def _version_key(version: str) -> int:
    return int(version)


class ModelRepository:
    """Scans, loads and serves lookups; the servicers' only way to a model."""

    def __init__(
        self,
        root: Path,
        runtime_options: RuntimeOptions,
        batching: BatchOverrides,
        executor: Executor,
        only: Iterable[str] | None = None,
        on_change: Callable[[ModelVersion], None] | None = None,
    ) -> None:
        self.root = root
        self.runtime_options = runtime_options
        self.batching = batching
        self.executor = executor
        self.only = set(only) if only else None
        self.on_change = on_change
        self.models: dict[str, dict[str, ModelVersion]] = {}
        # Models a client unloaded (KServe's RepositoryModelUnload): not expected to be ready.
        self.unloaded_on_request: set[str] = set()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._lifecycle: asyncio.Lock | None = None  # one load/unload on request at a time

    # Scanning -----------------------------------------------------------------------------

    def scan(self) -> None:
        """Find every model version on disk (no loading); bad folders are reported, not fatal."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"model repository {self.root} does not exist; export models first "
                "(`make serve` does it, or `cnnserve-export all --quick`)"
            )
        for model_dir in sorted(self.root.iterdir()):
            name = model_dir.name
            if not model_dir.is_dir() or name.startswith(".") or not NAME.match(name):
                continue
            if self.only is not None and name not in self.only:
                continue
            for version_dir in sorted(model_dir.iterdir(), key=lambda p: p.name):
                if version_dir.is_dir() and version_dir.name.isdigit():
                    self._add(name, version_dir)
        if self.only:
            missing = self.only - set(self.models)
            if missing:
                raise FileNotFoundError(
                    f"models not in {self.root}: {', '.join(sorted(missing))}; "
                    f"found: {', '.join(sorted(self.models)) or 'none'}"
                )

    def _add(self, name: str, folder: Path) -> None:
        version = str(int(folder.name))
        if version in self.models.get(name, {}):
            return
        entry = ModelVersion(name, version, folder / MODEL_FILE, {})
        try:
            entry.config = json.loads((folder / CONFIG_FILE).read_text())
            entry.feature_names = tuple(f["name"] for f in entry.config.get("features", []))
            outputs = tuple(o["name"] for o in entry.config.get("outputs", []))
            entry.output_names = outputs + entry.feature_names
            for key, feature in (("outputs", False), ("features", True)):
                for spec in entry.config.get(key, []):
                    entry.output_sizes[spec["name"]] = (math.prod(spec["shape"]), feature)
        except (OSError, ValueError, KeyError, TypeError) as error:
            entry.state, entry.reason = State.FAILED, f"unreadable {CONFIG_FILE}: {error}"
        self.models.setdefault(name, {})[version] = entry

    # Loading ------------------------------------------------------------------------------

    def newest(self, name: str) -> ModelVersion:
        versions = self.models[name]
        return versions[max(versions, key=_version_key)]

    async def load_all(self) -> None:
        """Load the newest version of every model, one at a time."""
        for name in list(self.models):
            await self.load(self.newest(name))

    def batch_policy(self, entry: ModelVersion) -> BatchPolicy:
        """The batching limits the version runs (or would run) with."""
        return entry.batcher.policy if entry.batcher is not None else self._policy(entry)

    def _policy(self, entry: ModelVersion) -> BatchPolicy:
        defaults = entry.config.get("batching", {})
        size = self.batching.max_batch_size or int(defaults.get("max_batch_size", 64))
        delay_ms = self.batching.max_queue_delay_ms
        if delay_ms is None:
            delay_ms = float(defaults.get("max_queue_delay_ms", 1.0))
        return BatchPolicy(
            size,
            delay_ms / 1000.0,
            self.batching.max_queue_images,
            self.batching.max_in_flight,
            coalesce_busy=self.batching.coalesce_busy,
        )

    def _inline_images(self, runtime: ModelRuntime, limit: int) -> int:
        """The largest batch predicted (from the warm-up's timings) to stay within the inline
        budget; 0 when even one image would not."""
        budget = self.batching.inline_ms / 1000
        fits = 0
        for images in range(1, limit + 1):
            predicted = runtime.predicted_seconds(images, single=True)
            if predicted is None or predicted > budget:
                break
            fits = images
        return fits

    def _create(self, entry: ModelVersion, policy: BatchPolicy) -> ModelRuntime:
        runtime = ModelRuntime(entry.path, self.runtime_options)
        runtime.warm_up(policy.max_batch_size, self.batching.inline_ms / 1000)
        return runtime

    async def load(self, entry: ModelVersion) -> None:
        """Create the session, warm it up, start its batcher; failures are recorded, not raised."""
        if entry.state is State.FAILED and not entry.config:
            self._changed(entry)
            return
        entry.state, entry.reason = State.LOADING, ""
        self._changed(entry)
        started = time.perf_counter()
        policy = self._policy(entry)
        try:
            loop = asyncio.get_running_loop()
            entry.runtime = await loop.run_in_executor(self._loader, self._create, entry, policy)
        except Exception as error:  # noqa: BLE001 - a bad model must not stop the others
            entry.state, entry.reason = State.FAILED, str(error)
            log.error("model %s version %s failed to load: %s", entry.name, entry.version, error)
            self._changed(entry)
            return
        inline = self._inline_images(entry.runtime, policy.max_batch_size)
        entry.runtime.use_single_for(inline)
        policy = replace(policy, inline_images=inline)
        entry.batcher = Batcher(entry.name, entry.version, entry.runtime.run, policy, self.executor)
        entry.batcher.start()
        entry.load_seconds = time.perf_counter() - started
        entry.state = State.READY
        log.info(
            "model %s version %s ready on %s in %.2f s; batches of up to %d images run on the "
            "event loop (of up to %d on a one-thread session)",
            entry.name,
            entry.version,
            entry.provider,
            entry.load_seconds,
            inline,
            entry.runtime.single_images,
        )
        self._changed(entry)

    async def unload(self, entry: ModelVersion) -> None:
        """Finish the version's accepted requests, then drop its session."""
        batcher, entry.batcher = entry.batcher, None
        entry.state = State.UNLOADED
        self._changed(entry)
        if batcher is not None:
            await batcher.close()
        if entry.runtime is not None:
            entry.runtime.close()
        entry.runtime = None

    async def load_newest(self, name: str) -> ModelVersion:
        """Load a model's newest version on request, after a rescan picks up new versions.

        Once the newest version is ready, the older ones that were serving are unloaded (one
        version per model, as Triton's default policy). A version that fails to load leaves the
        older ones as they were, and raises UNAVAILABLE with the reason.
        """
        async with self._lock():
            self.scan()
            if name not in self.models:
                raise InvalidArgument(
                    f"model {name[:80]!r} is not in the model repository; available: "
                    f"{', '.join(sorted(self.models)) or 'none'}"
                )
            self.unloaded_on_request.discard(name)
            entry = self.newest(name)
            if entry.state is not State.READY:
                await self.load(entry)
            if entry.state is not State.READY:
                raise Unavailable(
                    f"model {name} version {entry.version} failed to load: {entry.reason}"
                )
            for other in self.models[name].values():
                if other is not entry and other.state is State.READY:
                    await self.unload(other)
            return entry

    async def unload_model(self, name: str) -> None:
        """Unload every loaded version of a model on request; accepted requests finish first."""
        async with self._lock():
            if name not in self.models:
                raise InvalidArgument(
                    f"model {name[:80]!r} is not in the model repository; available: "
                    f"{', '.join(sorted(self.models)) or 'none'}"
                )
            self.unloaded_on_request.add(name)
            for entry in self.models[name].values():
                if entry.state is State.READY:
                    await self.unload(entry)

    def _lock(self) -> asyncio.Lock:
        if self._lifecycle is None:  # created on the server's loop, at first use
            self._lifecycle = asyncio.Lock()
        return self._lifecycle

    async def close(self) -> None:
        for versions in self.models.values():
            for entry in versions.values():
                if entry.batcher is not None:
                    await entry.batcher.close()
        self._loader.shutdown(wait=False)

    def _changed(self, entry: ModelVersion) -> None:
        metrics.set_model_state(
            entry.name,
            entry.version,
            entry.state.value,
            provider=entry.provider or None,
            kind=entry.kind,
            load_seconds=entry.load_seconds,
        )
        if self.on_change is not None:
            self.on_change(entry)

    # Lookups ------------------------------------------------------------------------------

    def find(self, name: str, version: str = "") -> ModelVersion:
        """The named version, or else the newest ready one (the newest if none is ready).

        So while a new version loads, or after it failed to, the one before keeps serving.
        NOT_FOUND names what exists.
        """
        if name not in self.models:
            shown = name if len(name) <= 80 else name[:80] + "..."
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {shown!r} not found; available: {known}")
        versions = self.models[name]
        if not version:
            if len(versions) == 1:  # the usual case: whether ready or not, the one there is
                return next(iter(versions.values()))
            ready = [v for v in versions.values() if v.state is State.READY]
            return max(ready, key=lambda v: _version_key(v.version)) if ready else self.newest(name)
        key = version.strip()
        if key.isascii() and key.isdigit():  # not int(): '²' is a digit, and 5000 digits raise
            key = key.lstrip("0") or "0"
        if key not in versions:
            raise NotFound(
                f"model {name} has no version {version[:20]!r}; versions: "
                f"{', '.join(sorted(versions, key=_version_key))}"
            )
        return versions[key]

    def ready(self, name: str, version: str = "") -> ModelVersion:
        """Like find, but the version must be serving."""
        entry = self.find(name, version)
        if entry.state is not State.READY or entry.batcher is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(
                f"model {name} version {entry.version} is {entry.state.value}{detail}"
            )
        return entry

    def metric_labels(self, name: str, version: str) -> tuple[str, str]:
        """Labels for a call: only names the repository knows, so clients cannot grow the series."""
        if name not in self.models:
            return "", ""
        try:
            return name, self.find(name, version).version
        except NotFound:
            return name, ""

    def all_ready(self) -> bool:
        """Every model is serving a version, except those unloaded on request."""
        return all(
            self.find(name).state is State.READY
            for name in self.models
            if name not in self.unloaded_on_request
        )
