"""The event-loop choice: uvloop by default where installed, errors named before start-up."""

from __future__ import annotations

import asyncio
import time

import pytest

from service import config, loops


def test_auto_takes_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert loops.resolve("auto") == "uvloop"
    with asyncio.Runner(loop_factory=loops.factory("auto")) as runner:
        assert type(runner.get_loop()).__module__.startswith("uvloop")


def test_asyncio_keeps_the_standard_loop() -> None:
    assert loops.factory("asyncio") is None


def test_an_unknown_loop_is_refused_at_configuration() -> None:
    with pytest.raises(ValueError, match="event_loop must be one of auto, uvloop, asyncio"):
        config.validate(config.Settings(event_loop="tornado"))


class Clocks:
    """Wall and CPU clocks the test moves by hand."""

    def __init__(self) -> None:
        self.wall, self.cpu = 100.0, 7.0


def test_busyness_is_cpu_over_wall_time_per_whole_window() -> None:
    clocks = Clocks()
    busy = loops.Busyness(0.02, clock=lambda: clocks.wall, cpu=lambda: clocks.cpu)
    assert busy.sample() == 0.0  # nothing measured yet
    clocks.wall, clocks.cpu = clocks.wall + 0.01, clocks.cpu + 0.01
    assert busy.sample() == 0.0  # half a window: the last whole one still stands
    clocks.wall, clocks.cpu = clocks.wall + 0.03, clocks.cpu + 0.02
    assert busy.sample() == pytest.approx(0.75)  # 0.03 s of CPU in 0.04 s
    clocks.wall += 0.1  # an idle spell: no CPU at all
    assert busy.sample() == 0.0
    clocks.wall, clocks.cpu = clocks.wall + 0.03, clocks.cpu + 0.05  # clocks read apart
    assert busy.sample() == 1.0  # never above all of the time


def test_busyness_reads_the_calling_threads_cpu_time() -> None:
    busy = loops.Busyness(0.01)
    spun_until = time.perf_counter() + 0.05
    while time.perf_counter() < spun_until:
        pass
    assert busy.sample() > 0.5  # this thread spun the whole time (a shared core lowers it)
    time.sleep(0.05)
    assert busy.sample() < 0.5


def test_a_wakeup_is_an_event_whose_wait_may_time_out() -> None:
    async def scenario() -> None:
        wakeup = loops.Wakeup()
        started = time.perf_counter()
        assert await wakeup.wait(0.02) is False  # nobody set it: the timeout ends the wait
        assert time.perf_counter() - started >= 0.015
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, wakeup.set)
        assert await wakeup.wait(5.0) is True and wakeup.is_set()  # set during the wait
        assert await wakeup.wait(0.0) is True  # still set: no wait at all
        wakeup.clear()
        assert not wakeup.is_set() and await wakeup.wait(0.0) is False
        loop.call_later(0.01, wakeup.set)
        assert await wakeup.wait() is True  # no timeout: until set
        # a cancelled waiter leaves nothing behind: a later set and wait work as before
        wakeup.clear()
        waiting = asyncio.ensure_future(wakeup.wait(5.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        wakeup.set()
        assert await wakeup.wait(0.0) is True

    asyncio.run(scenario())
