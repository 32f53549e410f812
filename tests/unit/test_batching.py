"""The batcher's contract: merge, split, bound the queue, drop the dead, fail only its batch."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service import batching
from service.batching import Batcher, BatchPolicy
from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidArgument,
    Overloaded,
    Unavailable,
)


class Recorder:
    """A stand-in session: doubles its input, records batch sizes, can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self, batch: np.ndarray, outputs) -> dict[str, np.ndarray]:
        self.started.set()
        self.release.wait(10)
        self.batches.append(len(batch))
        if self.fail_next:
            self.fail_next = False
            raise ValueError("boom")
        flat = batch.reshape(len(batch), -1)
        every = {"double": flat * 2, "sum": flat.sum(1, keepdims=True), "bad": flat[:1]}
        return {name: every[name] for name in outputs}  # only what was asked, like a session


def images(n: int, value: float) -> np.ndarray:
    return np.full((n, 1, 28, 28), value, np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def make(recorder: Recorder, **policy) -> tuple[Batcher, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(2)
    batcher = Batcher("m", "1", recorder, BatchPolicy(**policy), executor)
    batcher.start()
    return batcher, executor


def test_concurrent_requests_are_merged_and_split_back() -> None:
    recorder = Recorder()

    async def main():
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=64, max_queue_delay_s=0.05)
        first = batcher.submit(images(1, 0.0), ["sum"])  # starts a batch and holds it
        await asyncio.to_thread(recorder.started.wait, 5)
        futures = [batcher.submit(images(i + 1, float(i)), ["double", "sum"]) for i in range(5)]
        recorder.release.set()
        results = await asyncio.gather(first, *futures)
        await batcher.close()
        return results

    results = run(main())
    assert recorder.batches == [1, 15]  # 1+2+3+4+5 images queued behind the first batch
    for i, result in enumerate(results[1:]):
        assert set(result) == {"double", "sum"}
        assert result["double"].shape == (i + 1, 784)
        np.testing.assert_array_equal(result["sum"], np.full((i + 1, 1), 784.0 * i))
    assert set(results[0]) == {"sum"}


def test_full_queue_fails_fast_with_overloaded() -> None:
    recorder = Recorder()

    async def main():
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=4, max_queue_images=8)
        running = batcher.submit(images(4, 1), ["sum"])
        await asyncio.to_thread(recorder.started.wait, 5)
        queued = [batcher.submit(images(4, 1), ["sum"]) for _ in range(2)]  # 8 waiting: full
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit(images(1, 1), ["sum"])
        recorder.release.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    run(main())
    assert recorder.batches == [4, 4, 4]


def test_images_still_decoding_count_against_the_bound() -> None:
    recorder = Recorder()

    async def main():
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=4, max_queue_images=8)
        running = batcher.submit(images(4, 1), ["sum"])
        await asyncio.to_thread(recorder.started.wait, 5)
        with batcher.admitted(6) as reserved:  # a request decoding its 6 images
            with pytest.raises(Overloaded, match="6 images waiting"):
                with batcher.admitted(3):  # refused on arrival, before any decoding
                    pass
            with pytest.raises(Overloaded):
                batcher.submit(images(3, 1), ["sum"])
            # Its own submit is not counted twice: 6 reserved become 6 queued.
            queued = batcher.submit(images(6, 1), ["sum"], reserved=reserved)
        with batcher.admitted(2):  # 6 queued + 2 = the bound: still fits
            pass
        recorder.release.set()
        await asyncio.gather(running, queued)
        await batcher.close()

    run(main())
    assert sorted(recorder.batches) == [4, 6]


def test_expired_and_cancelled_requests_cost_no_inference() -> None:
    recorder = Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=1)
        running = batcher.submit(images(1, 1), ["sum"])
        await asyncio.to_thread(recorder.started.wait, 5)
        expired = batcher.submit(images(1, 2), ["sum"], deadline=loop.time() + 0.01)
        cancelled = batcher.submit(images(1, 3), ["sum"])
        kept = batcher.submit(images(1, 4), ["sum"])
        cancelled.cancel()
        await asyncio.sleep(0.05)
        recorder.release.set()
        await running
        with pytest.raises(DeadlineExceeded):
            await expired
        result = await kept
        await batcher.close()
        return result

    result = run(main())
    assert recorder.batches == [1, 1]  # the running one and `kept`: nothing else ran
    assert result["sum"][0, 0] == 784 * 4


def test_a_failing_batch_fails_only_its_requests() -> None:
    recorder = Recorder()

    async def main():
        batcher, _ = make(recorder, max_batch_size=8)
        recorder.fail_next = True
        with pytest.raises(InferenceFailed):
            await batcher.submit(images(2, 1), ["sum"])
        ok = await batcher.submit(images(2, 1), ["sum"])
        await batcher.close()
        return ok

    assert run(main())["sum"].shape == (2, 1)


def test_outputs_that_do_not_add_up_fail_the_batch() -> None:
    async def main():
        batcher, _ = make(Recorder(), max_batch_size=8)
        with pytest.raises(InferenceFailed, match="rows for a batch of 3"):
            await batcher.submit(images(3, 1), ["bad"])
        await batcher.close()

    run(main())


def test_oversized_request_runs_alone_and_is_never_split() -> None:
    recorder = Recorder()

    async def main():
        batcher, _ = make(recorder, max_batch_size=4, max_queue_images=64)
        result = await batcher.submit(images(10, 1), ["sum"])
        await batcher.close()
        return result

    assert run(main())["sum"].shape == (10, 1)
    assert recorder.batches == [10]


def test_close_finishes_accepted_requests_then_refuses_new_ones() -> None:
    recorder = Recorder()

    async def main():
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=2)
        accepted = [batcher.submit(images(1, i), ["sum"]) for i in range(6)]
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            batcher.submit(images(1, 1), ["sum"])
        recorder.release.set()
        await closing
        return await asyncio.gather(*accepted)

    results = run(main())
    assert [r["sum"][0, 0] for r in results] == [784.0 * i for i in range(6)]
    assert sum(recorder.batches) == 6


def test_higher_priority_requests_are_taken_from_the_queue_first() -> None:
    """Triton's semantics: 1 is the highest level, then 2; 0 (the default) comes last."""
    order: list[float] = []
    recorder = Recorder()

    def run_and_record(batch: np.ndarray, outputs) -> dict[str, np.ndarray]:
        result = recorder(batch, outputs)
        order.extend(float(image[0, 0, 0]) for image in batch)
        return result

    async def main():
        recorder.release.clear()
        executor = ThreadPoolExecutor(2)
        batcher = Batcher("m", "1", run_and_record, BatchPolicy(max_batch_size=1), executor)
        batcher.start()
        running = batcher.submit(images(1, 0), ["sum"])  # holds the collector
        await asyncio.to_thread(recorder.started.wait, 5)
        queued = [
            batcher.submit(images(1, 1), ["sum"]),  # default: after every explicit level
            batcher.submit(images(1, 2), ["sum"], priority=2),
            batcher.submit(images(1, 3), ["sum"], priority=0),
            batcher.submit(images(1, 4), ["sum"], priority=1),
            batcher.submit(images(1, 5), ["sum"], priority=2),
            batcher.submit(images(1, 6), ["sum"], priority=1),
        ]
        with pytest.raises(InvalidArgument, match="priority must be >= 0"):
            batcher.submit(images(1, 7), ["sum"], priority=-1)
        assert batcher.queued_images == 6
        recorder.release.set()
        results = await asyncio.gather(running, *queued)
        await batcher.close()
        return results

    results = run(main())
    # Within a level, arrival order; every request still gets its own answer.
    assert order == [0, 4, 6, 2, 5, 1, 3]
    assert [r["sum"][0, 0] for r in results] == [784.0 * i for i in range(7)]


def test_a_lone_request_does_not_wait_for_the_queue_delay() -> None:
    """Nothing running: the batch goes at once, whatever max_queue_delay says."""
    recorder = Recorder()

    async def main():
        batcher, _ = make(recorder, max_batch_size=64, max_queue_delay_s=30.0)
        result = await asyncio.wait_for(batcher.submit(images(1, 1), ["sum"]), 5)
        await batcher.close()
        return result

    assert run(main())["sum"][0, 0] == 784
    assert recorder.batches == [1]


def test_a_second_batch_in_flight_waits_the_delay_to_fill() -> None:
    """With two slots, a batch starts beside a running one after gathering for the delay."""
    recorder = Recorder()

    async def main():
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=64, max_queue_delay_s=0.2, max_in_flight=2)
        first = batcher.submit(images(1, 0), ["sum"])  # runs at once and is held
        await asyncio.to_thread(recorder.started.wait, 5)
        recorder.started.clear()
        early = batcher.submit(images(2, 1), ["sum"])
        await asyncio.sleep(0.05)  # within the delay: joins the same second batch
        late = batcher.submit(images(3, 2), ["sum"])
        assert await asyncio.to_thread(recorder.started.wait, 5)  # second batch runs beside
        assert not first.done()
        recorder.release.set()
        await asyncio.gather(first, early, late)
        await batcher.close()

    run(main())
    assert recorder.batches == [5, 1] or recorder.batches == [1, 5]


def test_a_request_over_the_bound_waits_for_an_empty_queue_not_forever() -> None:
    """The bound holds exactly; only an empty queue takes a request larger than the bound."""
    recorder = Recorder()

    async def main():
        recorder.release.clear()
        batcher, _ = make(recorder, max_batch_size=64, max_queue_images=8)
        running = batcher.submit(images(2, 1), ["sum"])
        await asyncio.to_thread(recorder.started.wait, 5)
        big = batcher.submit(images(12, 1), ["sum"])  # queue empty: taken though 12 > 8
        with pytest.raises(Overloaded, match="12 images waiting, limit 8"):
            batcher.submit(images(1, 1), ["sum"])
        recorder.release.set()
        await asyncio.gather(running, big)
        await batcher.close()

    run(main())
    assert recorder.batches == [2, 12]


def test_small_batches_run_on_the_loop_and_larger_ones_in_the_pool() -> None:
    """inline_images: the hop to a thread costs more than a tiny model's small batch."""
    threads: list[str] = []
    recorder = Recorder()

    def run_and_record(batch: np.ndarray, outputs) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread().name)
        return recorder(batch, outputs)

    async def main():
        executor = ThreadPoolExecutor(2, thread_name_prefix="pool")
        policy = BatchPolicy(max_batch_size=64, inline_images=4)
        batcher = Batcher("m", "1", run_and_record, policy, executor)
        batcher.start()
        small = await batcher.submit(images(4, 1), ["sum"])
        large = await batcher.submit(images(5, 1), ["sum"])
        await batcher.close()
        return small, large

    small, large = run(main())
    assert small["sum"].shape == (4, 1) and large["sum"].shape == (5, 1)
    assert threads[0] == threading.current_thread().name  # the loop's own thread
    assert threads[1].startswith("pool")


def test_a_small_request_to_an_idle_batcher_is_answered_inside_submit() -> None:
    """No collector trip when nothing waits or runs; behind a running batch it queues."""
    recorder = Recorder()

    async def main():
        batcher, _ = make(recorder, max_batch_size=64, max_queue_delay_s=0.05, inline_images=4)
        idle = batcher.submit(images(2, 1.0), ["sum"])
        assert idle.done() and recorder.batches == [2]  # answered before submit returned
        late = batcher.submit(images(1, 1.0), ["sum"], deadline=asyncio.get_running_loop().time())
        assert isinstance(late.exception(), DeadlineExceeded) and recorder.batches == [2]
        failing = Recorder()
        failing.fail_next = True
        broken = Batcher("m", "1", failing, BatchPolicy(inline_images=4), ThreadPoolExecutor(1))
        broken.start()
        failed = broken.submit(images(1, 1.0), ["sum"])
        assert failed.done() and isinstance(failed.exception(), InferenceFailed)
        await broken.close()
        recorder.release.clear()
        running = batcher.submit(images(5, 0.0), ["sum"])  # too big for the loop: the pool
        await asyncio.to_thread(recorder.started.wait, 5)
        behind = batcher.submit(images(1, 3.0), ["sum"])
        assert not behind.done()  # a batch is running: it waits for the next one
        recorder.release.set()
        results = await asyncio.gather(idle, running, behind)
        await batcher.close()
        return results

    idle, running, behind = run(main())
    np.testing.assert_array_equal(idle["sum"], np.full((2, 1), 784.0))
    np.testing.assert_array_equal(behind["sum"], np.full((1, 1), 3 * 784.0))
    assert recorder.batches == [2, 5, 1]


class Busy:
    """A stand-in for the loop's busyness meter, set by the test."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def sample(self) -> float:
        return self.fraction


def on_loop(threads: list[str], recorder: Recorder):
    def run_and_record(batch: np.ndarray, outputs) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread().name)
        return recorder(batch, outputs)

    return run_and_record


@pytest.mark.parametrize("busy, coalesce_busy", [(0.95, 0.8), (0.5, 0.8), (1.0, 1.0)])
def test_on_a_busy_loop_small_requests_wait_to_share_one_inference(
    busy: float, coalesce_busy: float
) -> None:
    """Each small request runs on the loop before the next call is read, so those batches never
    fill by themselves: on a busy loop they wait up to the delay; on an idle one, or with
    coalescing off (1), never."""
    threads: list[str] = []
    recorder = Recorder()
    waits = busy >= coalesce_busy < 1

    async def main():
        policy = BatchPolicy(max_queue_delay_s=0.2, inline_images=4, coalesce_busy=coalesce_busy)
        executor = ThreadPoolExecutor(1, thread_name_prefix="pool")
        batcher = Batcher("m", "1", on_loop(threads, recorder), policy, executor, Busy(busy))
        batcher.start()
        first = batcher.submit(images(1, 1.0), ["sum"])
        assert first.done() is not waits  # idle: answered inside submit
        await asyncio.sleep(0.01)
        second = batcher.submit(images(2, 2.0), ["sum"])
        started = time.perf_counter()
        results = await asyncio.gather(first, second)
        waited = time.perf_counter() - started
        await batcher.close()
        return results, waited

    (first, second), waited = run(main())
    np.testing.assert_array_equal(first["sum"], np.full((1, 1), 784.0))
    np.testing.assert_array_equal(second["sum"], np.full((2, 1), 2 * 784.0))
    assert recorder.batches == ([3] if waits else [1, 2])
    assert threads == [threading.current_thread().name] * len(recorder.batches)  # the loop's
    if waits:  # the pair went as soon as the delay from the first request's arrival passed
        assert 0.15 < waited < 1.0


def one_request_on_a_busy_loop(run_fn, n: int, delay_s: float) -> tuple[dict, float]:
    """One request of `n` images to a batcher whose loop reads as fully busy: its answer, and
    how long it took."""

    async def main():
        policy = BatchPolicy(max_queue_delay_s=delay_s, inline_images=4)
        executor = ThreadPoolExecutor(1, thread_name_prefix="pool")
        batcher = Batcher("m", "1", run_fn, policy, executor, Busy(1.0))
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit(images(n, 1.0), ["sum"])
        waited = time.perf_counter() - started
        await batcher.close()
        return result, waited

    return run(main())


def test_a_lone_small_request_on_a_busy_loop_waits_no_longer_than_the_delay() -> None:
    recorder = Recorder()
    result, waited = one_request_on_a_busy_loop(recorder, 1, delay_s=0.05)
    np.testing.assert_array_equal(result["sum"], np.full((1, 1), 784.0))
    assert recorder.batches == [1] and 0.04 < waited < 1.0


def test_a_busy_loop_does_not_hold_batches_too_big_for_it() -> None:
    """Coalescing is for batches that run on the loop; a larger request goes to the pool at once."""
    threads: list[str] = []
    recorder = Recorder()
    result, waited = one_request_on_a_busy_loop(on_loop(threads, recorder), 6, delay_s=5.0)
    assert result["sum"].shape == (6, 1) and recorder.batches == [6]
    assert threads[0].startswith("pool") and waited < 2.0  # not the 5 s delay


def test_waits_that_keep_finding_no_company_pause_for_longer_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone client can keep the loop busy too: after LONE_WAITS lone waits its calls run at
    once for a pause, and one more lone wait after the pause pauses it for twice as long."""
    monkeypatch.setattr(batching, "PAUSE_S", (0.1, 2.0))  # wide margins for a busy test host
    recorder = Recorder()

    async def main():
        policy = BatchPolicy(max_queue_delay_s=0.01, inline_images=4)
        batcher = Batcher("m", "1", recorder, policy, ThreadPoolExecutor(1), Busy(1.0))
        batcher.start()
        answered_at_once = []

        async def lone() -> None:
            future = batcher.submit(images(1, 1.0), ["sum"])
            answered_at_once.append(future.done())
            await future
            await asyncio.sleep(0.001)  # the batch's task ends too

        for _ in range(batching.LONE_WAITS + 1):
            await lone()
        await asyncio.sleep(0.15)  # the first pause (0.1 s) is over
        await lone()  # waits again, finds no one: paused again, twice as long
        await asyncio.sleep(0.05)
        await lone()  # still paused
        await asyncio.sleep(0.2)
        pair = [batcher.submit(images(1, 1.0), ["sum"]) for _ in range(2)]
        answered_at_once.append(pair[0].done())
        await asyncio.gather(*pair)  # company: the count starts again
        await batcher.close()
        return answered_at_once

    answered_at_once = run(main())
    waits = [False] * batching.LONE_WAITS
    assert answered_at_once == [*waits, True, False, True, False]
    assert recorder.batches == [1] * (batching.LONE_WAITS + 3) + [2]
