"""Dynamic batching: concurrent requests for one model version merged into one session.run.

The contract, one batcher per loaded model version:
- `submit()` never blocks: a full queue raises `Overloaded` at once (RESOURCE_EXHAUSTED).
- One collector task takes the oldest request and gathers what else is queued, up to
  `max_batch_size` images. With no batch running it sends the batch at once: a lone request
  never waits for company, and requests that arrive while a batch runs wait for the next one,
  so under load batches fill by themselves. At most `max_in_flight` batches run at once;
  while one runs and a slot is free, the next batch waits up to `max_queue_delay` (from its
  oldest request's arrival) to fill, Triton's dynamic batching delay.
- Small batches that run on the event loop (below) never fill by themselves: each runs before
  the loop reads the next call. So when the loop's thread has lately been busier than
  `coalesce_busy` (`loops.Busyness`), a small request waits up to `max_queue_delay` for others
  to share its inference: its call would queue behind the loop's other work anyway, and one
  inference for several requests frees the loop for more. An idle loop never makes one wait.
- A request is never split across batches; one larger than `max_batch_size` runs on its own.
- Priorities follow Triton: 1 is the highest level, 2 the next, and so on; 0 (the default) is
  below every explicit level. The collector always takes from the highest non-empty level, in
  arrival order within a level, so urgent requests overtake waiting ones but never a running
  batch.
- Requests whose deadline has passed or whose caller has gone are dropped before they cost
  inference.
- The batch runs in a thread pool (ONNX Runtime releases the GIL), or on the loop itself when
  it holds at most `inline_images` images (a tiny model's small batch takes less time than the
  hop to a thread and back); such a request reaching an idle batcher (nothing queued, no
  batch running) runs inside `submit()`, without the trip through the collector task, and
  the collector runs a small batch itself, without a task of its own. Only the union of the
  outputs its requests asked for is fetched.
  Outputs are split back by each request's size, and the sizes must add up. A failing batch
  fails its own requests, and only those.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidArgument,
    Overloaded,
    ServiceError,
    Unavailable,
)
from service.loops import Busyness, Wakeup

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray, Sequence[str]], dict[str, np.ndarray]]

DEFAULT_PRIORITY = 0
_DEFAULT_LEVEL = sys.maxsize  # priority 0 queues after every explicit level
# Small batches that waited on a busy loop and found no company this many times in a row stop
# waiting for a pause, doubled each time it ends in no company again, up to the longest: a lone
# client can keep the loop busy too, and must not pay the delay on every call.
LONE_WAITS = 3
PAUSE_S = (0.02, 2.0)


def _level(priority: int) -> int:
    """Queue order of a priority: smaller is served first."""
    if priority < 0:
        raise InvalidArgument(f"priority must be >= 0 (1 is the highest), got {priority}")
    return priority or _DEFAULT_LEVEL


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    max_queue_delay_s: float = 0.001
    max_queue_images: int = 4096  # images waiting, across requests, before RESOURCE_EXHAUSTED
    max_in_flight: int = 1  # batches of one model running at once
    # Batches of at most this many images run on the event loop: for them the hop to the
    # thread pool and back costs more than the inference (0: always the pool).
    inline_images: int = 0
    # The event loop's busy fraction from which such batches wait to fill (1 or more: never)
    coalesce_busy: float = 0.8


@dataclass(eq=False)
class _Pending:
    images: np.ndarray
    outputs: tuple[str, ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float | None  # loop.time() by which the caller needs the answer
    enqueued: float = field(default_factory=time.perf_counter)

    def expired(self, now: float) -> bool:
        """Whether the caller's deadline has passed at loop time `now`."""
        return self.deadline is not None and now >= self.deadline


class Batcher:
    """Queue and collector for one model version."""

    def __init__(
        self,
        model: str,
        version: str,
        run: RunFn,
        policy: BatchPolicy,
        executor: Executor,
        busyness: Busyness | None = None,
    ) -> None:
        self.model, self.version = model, version
        self.policy = policy
        self._run = run
        self._executor = executor
        # One FIFO per priority level, keyed by queue order; empty levels are removed.
        self._queues: dict[int, collections.deque[_Pending]] = {}
        self._queued_images = 0
        self._reserved_images = 0  # admitted, still being decoded: the bound counts them too
        self._wakeup = Wakeup()
        self._closed = False
        self._running: set[asyncio.Task[None]] = set()  # batches in inference
        self._task: asyncio.Task[None] | None = None
        self._busyness = busyness
        self._coalescing = False  # whether the last small request chose to wait for company
        self._lone_waits = 0  # such waits in a row that found none
        self._pause_s = PAUSE_S[0]
        self._paused_until = 0.0

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name=f"batcher {self.model}/{self.version}"
        )

    def _check_room(self, n: int, already_reserved: int = 0) -> None:
        if self._closed:
            raise Unavailable(f"model {self.model} version {self.version} is shutting down")
        waiting = self._queued_images + self._reserved_images - already_reserved
        # An empty queue takes any request, so one larger than the bound is never refused
        # forever; otherwise the bound holds exactly.
        if waiting and waiting + n > self.policy.max_queue_images:
            raise Overloaded(
                f"model {self.model} queue is full ({waiting} images waiting, "
                f"limit {self.policy.max_queue_images}); retry with backoff"
            )

    @contextlib.contextmanager
    def admitted(self, n: int) -> Iterator[int]:
        """Hold room for `n` images while the request decodes them; yields what it reserved.

        A request is refused (RESOURCE_EXHAUSTED) on arrival, before any decoding, when the
        queue plus the images other requests are decoding would go over the bound: under
        overload the server sheds excess calls at once instead of decoding them first.
        """
        self._check_room(n)
        self._reserved_images += n
        try:
            yield n
        finally:
            self._reserved_images -= n

    def submit(
        self,
        images: np.ndarray,
        outputs: Sequence[str],
        deadline: float | None = None,
        priority: int = DEFAULT_PRIORITY,
        reserved: int = 0,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue `images` (N x 1 x 28 x 28 float32); the future resolves to the asked outputs.

        `priority`: 1 is served first, then 2, ...; 0 (the default) after every explicit level.
        `reserved`: images this request already holds room for (`admitted`).
        """
        level = _level(priority)
        n = len(images)
        self._check_room(n, already_reserved=min(reserved, n))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        pending = _Pending(images, tuple(outputs), future, deadline)
        if n <= self.policy.inline_images:
            self._coalescing = self._loop_busy()
            if not (self._queues or self._running or self._coalescing):
                # Nothing waits and nothing runs: the collector would send this batch at once
                # and run it on the loop, so run it here and skip the three task switches.
                if pending.expired(loop.time()):
                    future.set_exception(DeadlineExceeded("deadline passed before inference began"))
                else:
                    self._run_inline([pending])
                return future
        self._queues.setdefault(level, collections.deque()).append(pending)
        self._queued_images += n
        metrics.set_queue_depth(self.model, self.version, self._queued_images)
        self._wakeup.set()
        return future

    def _loop_busy(self) -> bool:
        """Whether the event loop has lately been busy enough for small batches to wait."""
        if self.policy.coalesce_busy >= 1 or time.perf_counter() < self._paused_until:
            return False
        if self._busyness is None:  # made on the loop's own thread, where it is read
            self._busyness = Busyness()
        return self._busyness.sample() >= self.policy.coalesce_busy

    async def close(self) -> None:
        """Stop taking requests, finish every accepted one, then stop the collector."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    def _head(self) -> _Pending | None:
        """The next request to serve: the oldest of the highest non-empty priority level."""
        return self._queues[min(self._queues)][0] if self._queues else None

    def _pop(self) -> _Pending:
        level = min(self._queues)
        queue = self._queues[level]
        item = queue.popleft()
        if not queue:
            del self._queues[level]
        self._queued_images -= len(item.images)
        return item

    def _drop_dead(self, now: float) -> None:
        """Remove cancelled and expired requests from the queue."""
        for level, queue in list(self._queues.items()):
            kept: collections.deque[_Pending] = collections.deque()
            for item in queue:
                if item.future.done():  # the caller cancelled
                    self._queued_images -= len(item.images)
                elif item.expired(now):
                    self._queued_images -= len(item.images)
                    item.future.set_exception(
                        DeadlineExceeded("deadline passed while the request waited in the queue")
                    )
                else:
                    kept.append(item)
            if kept:
                self._queues[level] = kept
            else:
                del self._queues[level]

    async def _gather(self) -> list[_Pending]:
        """Up to max_batch_size images; waits for more while another batch runs, or for company
        on a busy loop (module docstring)."""
        limit = self.policy.max_batch_size
        batch = [self._pop()]
        size = len(batch[0].images)
        wait_until = batch[0].enqueued + self.policy.max_queue_delay_s
        for_company = False
        while size < limit:
            head = self._head()
            if head is not None:
                if size + len(head.images) > limit:
                    break
                item = self._pop()
                if item.future.done():
                    continue
                batch.append(item)
                size += len(item.images)
                continue
            remaining = wait_until - time.perf_counter()
            # waiting pays while a batch runs, or for a small one on a busy loop (above)
            fills = self._running or (self._coalescing and size <= self.policy.inline_images)
            if remaining <= 0 or self._closed or not fills:
                break
            for_company = for_company or not self._running
            self._wakeup.clear()  # a new request, or a running batch ending, sets it
            if not await self._wakeup.wait(remaining):
                break
        if for_company:
            self._company_found(len(batch) > 1)
        return batch

    def _company_found(self, found: bool) -> None:
        """After a wait for company: reset, or count a lone wait and pause waiting (LONE_WAITS)."""
        if found:
            self._lone_waits, self._pause_s = 0, PAUSE_S[0]
            return
        self._lone_waits += 1
        if self._lone_waits >= LONE_WAITS:
            self._paused_until = time.perf_counter() + self._pause_s
            self._pause_s = min(2 * self._pause_s, PAUSE_S[1])
            self._lone_waits = LONE_WAITS - 1  # one more lone wait after the pause: a longer one

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_dead(loop.time())
            if not self._queues or len(self._running) >= self.policy.max_in_flight:
                if not self._queues and self._closed and not self._running:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._gather()
            batch = [p for p in batch if not p.future.done()]
            metrics.set_queue_depth(self.model, self.version, self._queued_images)
            if batch and sum(len(p.images) for p in batch) <= self.policy.inline_images:
                self._run_inline(batch)  # on the loop, now: a task would only add switches
            elif batch:
                task = loop.create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wakeup.set()

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        images, wanted = _merged(batch)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run, images, wanted)
        except Exception as error:  # noqa: BLE001 - any failure fails this batch only
            self._failed(batch, len(images), error)
            return
        self._deliver(batch, results, started)

    def _run_inline(self, batch: list[_Pending]) -> None:
        """Run a small batch on the loop and resolve its futures before returning."""
        started = time.perf_counter()
        images, wanted = _merged(batch)
        try:
            results = self._run(images, wanted)
        except Exception as error:  # noqa: BLE001 - any failure fails this batch only
            self._failed(batch, len(images), error)
            return
        self._deliver(batch, results, started)

    def _deliver(
        self, batch: list[_Pending], results: dict[str, np.ndarray], started: float
    ) -> None:
        """Split a batch's outputs back to its requests and record it in the metrics."""
        sizes = [len(p.images) for p in batch]
        try:
            parts = _split(results, sizes)
        except ServiceError as error:
            self._fail(batch, error)
            return
        metrics.observe_batch(
            self.model,
            self.version,
            sum(sizes),
            [started - p.enqueued for p in batch],
            time.perf_counter() - started,
        )
        for pending, part in zip(batch, parts, strict=True):
            if not pending.future.done():
                pending.future.set_result({name: part[name] for name in pending.outputs})

    def _failed(self, batch: list[_Pending], images: int, error: Exception) -> None:
        if not isinstance(error, ServiceError):
            log.error("batch of %d images for %s failed", images, self.model, exc_info=error)
            error = InferenceFailed(f"inference failed: {type(error).__name__}")
        self._fail(batch, error)

    @staticmethod
    def _fail(batch: list[_Pending], error: ServiceError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)


def _merged(batch: list[_Pending]) -> tuple[np.ndarray, list[str]]:
    """The batch's images in one array, and the union of the outputs its requests asked for."""
    if len(batch) == 1:  # every inline request of a tiny model: nothing to merge
        return batch[0].images, list(batch[0].outputs)
    images = np.concatenate([p.images for p in batch])
    return images, list(dict.fromkeys(name for p in batch for name in p.outputs))


def _split(results: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Cut every output along the batch axis by request size; the sizes must add up."""
    total = sum(sizes)
    for name, value in results.items():
        if len(value) != total:
            raise InferenceFailed(
                f"output {name} has {len(value)} rows for a batch of {total} images"
            )
    if len(sizes) == 1:  # a lone request (every inline one) takes the batch whole
        return [results]
    bounds = [0, *itertools.accumulate(sizes)]
    return [
        {name: value[start:end] for name, value in results.items()}
        for start, end in itertools.pairwise(bounds)
    ]
