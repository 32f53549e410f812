"""The event loop the server runs on, and how busy its thread is.

uvloop by default where it is installed: the gRPC server's per-call work runs on the loop, and
with uvloop a bare grpc.aio call costs measurably less CPU (docs/BENCHMARKS.md, the `floor`
rows). `asyncio` keeps the standard loop, for debugging or where uvloop is unavailable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable

CHOICES = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def resolve(choice: str) -> str:
    """'auto' to the loop that will run; an unknown or unavailable choice is an error."""
    if choice not in CHOICES:
        raise ValueError(f"event_loop must be one of {', '.join(CHOICES)}; got {choice!r}")
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise ValueError("event_loop uvloop asked for, but uvloop is not installed")
    if choice == "auto":
        return "uvloop" if available else "asyncio"
    return choice


def factory(choice: str) -> LoopFactory | None:
    """A loop factory for asyncio.Runner (None: the standard loop)."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


class Busyness:
    """How busy the calling thread has lately been: its CPU time over the wall time, measured
    over windows of at least `window_s`, for the event loop's thread to read from itself.

    A saturated loop is where waiting pays: its calls queue anyway, and one inference shared
    by several of them frees the loop for the next. Reading the thread's CPU clock is a system
    call, so it is read once a window, not on every call.
    """

    def __init__(
        self,
        window_s: float = 0.02,
        clock: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.window_s = window_s
        self._clock, self._cpu = clock, cpu
        self._started, self._used = clock(), cpu()
        self.fraction = 0.0

    def sample(self) -> float:
        """The busy fraction of the last whole window (0 to 1)."""
        now = self._clock()
        if now - self._started >= self.window_s:
            used = self._cpu()
            busy = (used - self._used) / (now - self._started)
            self.fraction = min(max(busy, 0.0), 1.0)
            self._started, self._used = now, used
        return self.fraction


class Wakeup:
    """An asyncio.Event for a single waiter whose wait may time out.

    The batcher's collector waits on one of these for every batch it gathers on a busy loop;
    `asyncio.wait_for(event.wait(), t)` makes a task, two futures and a timer for each such
    wait, where one future and a timer do.
    """

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[bool] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float | None = None) -> bool:
        """Until `set` (True) or, given a timeout, until it passes (False)."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
