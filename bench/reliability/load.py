"""The load process: grpc.aio calls from a separate (spawned) process, one record per call.

Closed loop: `concurrency` workers each send a call as soon as their last one ends (the soak).
Open loop: calls start at a fixed `rate` whatever the server does, up to `max_inflight` at once
(overload: offered load that does not slow down when the server does). Every call carries the
plan's deadline. A record is (start, latency, call kind, status code); starts are
`time.monotonic()`, which is system-wide, so the runner lines them up with its own samples.
The process is spawned, not forked, and imports only grpc, numpy and the generated messages:
lean enough to leave the cores to the server, and its own CPU time is reported to prove it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

if TYPE_CHECKING:  # not at run time: a tritonclient load process (bench/serving) imports
    # this module, and the workload's generated OIP messages clash with tritonclient's own
    from bench.reliability.workload import Call

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, really
]
CALLS_PER_CHANNEL = 32
LAG_TICK_S = 0.05
NO_ANSWER = -1  # code of a call that had no answer, not even its deadline, in time
NO_ANSWER_GRACE = 10.0  # seconds past the deadline before a call counts as unanswered


@dataclass(frozen=True)
class Plan:
    address: str
    calls: list[Call]
    seconds: float
    timeout: float  # every call's deadline, in seconds
    concurrency: int = 0  # closed loop when > 0
    rate: float = 0.0  # open loop: calls per second, when concurrency is 0
    max_inflight: int = 2048
    check_every: int = 50  # parse and check one reply in this many
    seed: int = 0


@dataclass
class Records:
    """Everything the load process saw, as arrays (one row per call)."""

    start: np.ndarray  # monotonic seconds
    latency: np.ndarray  # seconds
    kind: np.ndarray  # index into the plan's calls
    code: np.ndarray  # grpc status code value, NO_ANSWER if none came
    began: float
    ended: float
    client_cpu_seconds: float
    checked: int
    wrong: int  # sampled replies that did not hold what was asked for
    not_sent: int  # open loop: calls skipped because max_inflight were in flight
    loop_lag_ms: float  # the client's own event loop at its slowest: its share of any lateness


def _reply_ok(check: str, images: int, reply: bytes) -> bool:
    from service.proto import cnnserve_pb2 as pb
    from service.proto import grpc_service_pb2 as oip

    if check == "classify":
        message = pb.ClassifyResponse.FromString(reply)
        return len(message.results) == images and all(
            len(r.probabilities) > 0 and abs(sum(r.probabilities) - 1) < 1e-3
            for r in message.results
        )
    if check == "features":
        maps = pb.FeatureMapsResponse.FromString(reply)
        return len(maps.results) == images and all(r.features for r in maps.results)
    infer = oip.ModelInferResponse.FromString(reply)
    return len(infer.raw_output_contents) == 1 and len(infer.raw_output_contents[0]) == (
        images * int(np.prod(infer.outputs[0].shape[1:])) * 4
    )


class _Driver:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rows: list[tuple[float, float, int, int]] = []
        self.rng = random.Random(plan.seed)
        self.weights = [c.weight for c in plan.calls]
        self.checked = self.wrong = self.not_sent = 0
        self.count = 0
        self.began = self.ended = 0.0
        self.lag = 0.0

    async def one(self, method: grpc.aio.UnaryUnaryMultiCallable, index: int) -> None:
        call = self.plan.calls[index]
        payload = self.rng.choice(call.payloads)
        started = time.monotonic()
        try:  # the outer wait only fires if gRPC itself failed to end the call at its deadline
            reply = await asyncio.wait_for(
                method(payload, timeout=self.plan.timeout), self.plan.timeout + NO_ANSWER_GRACE
            )
            code = 0
        except grpc.aio.AioRpcError as error:
            reply, code = b"", error.code().value[0]
        except TimeoutError:
            reply, code = b"", NO_ANSWER
        self.rows.append((started, time.monotonic() - started, index, code))
        self.count += 1
        if code == 0 and self.count % self.plan.check_every == 0:
            self.checked += 1
            self.wrong += not _reply_ok(call.check, call.images, reply)

    async def watch_lag(self) -> None:
        """How late the client's own loop wakes up: lateness a busy client adds to any call."""
        while True:
            asked = time.monotonic() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            self.lag = max(self.lag, time.monotonic() - asked)

    def pick(self) -> int:
        return self.rng.choices(range(len(self.plan.calls)), self.weights)[0]

    async def run(self) -> None:
        plan = self.plan
        width = plan.concurrency or max(1, int(plan.rate * plan.timeout))
        channels = [
            grpc.aio.insecure_channel(plan.address, options=CHANNEL_OPTIONS)
            for _ in range(max(1, width // CALLS_PER_CHANNEL))
        ]
        # No serializer: the payloads are bytes already, and replies stay bytes until checked.
        methods = [{c.method: ch.unary_unary(c.method) for c in plan.calls} for ch in channels]
        for channel in channels:
            await channel.channel_ready()
        self.began = time.monotonic()
        end = self.began + plan.seconds
        watcher = asyncio.ensure_future(self.watch_lag())
        if plan.concurrency:

            async def worker(n: int) -> None:
                table = methods[n % len(methods)]
                while time.monotonic() < end:
                    index = self.pick()
                    await self.one(table[plan.calls[index].method], index)

            await asyncio.gather(*(worker(n) for n in range(plan.concurrency)))
        else:
            await self._open_loop(methods, end)
        self.ended = time.monotonic()
        watcher.cancel()
        for channel in channels:
            await channel.close()

    async def _open_loop(self, methods: list[dict], end: float) -> None:
        plan = self.plan
        inflight: set[asyncio.Task[None]] = set()
        n = 0
        while (due := self.began + n / plan.rate) < end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= plan.max_inflight:
                self.not_sent += 1
            else:
                index = self.pick()
                table = methods[n % len(methods)]
                task = asyncio.ensure_future(self.one(table[plan.calls[index].method], index))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            n += 1
        if inflight:  # every call has a deadline, so this ends
            await asyncio.wait(inflight)


def save_records(
    out: str,
    rows: list[tuple[float, float, int, int]],
    *,
    began: float,
    ended: float,
    checked: int,
    wrong: int,
    not_sent: int = 0,
    loop_lag_ms: float = 0.0,
) -> None:
    """Write a load process's records where `run_in_process` reads them back."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    np.savez(
        out,
        rows=np.array(rows, dtype=np.float64).reshape(-1, 4),
        began=began,
        ended=ended,
        client_cpu_seconds=usage.ru_utime + usage.ru_stime,
        checked=checked,
        wrong=wrong,
        not_sent=not_sent,
        loop_lag_ms=loop_lag_ms,
    )


def _main(plan: Plan, out: str) -> None:
    driver = _Driver(plan)
    asyncio.run(driver.run())
    save_records(
        out,
        driver.rows,
        began=driver.began,
        ended=driver.ended,
        checked=driver.checked,
        wrong=driver.wrong,
        not_sent=driver.not_sent,
        loop_lag_ms=driver.lag * 1000,
    )


def run_load(plan: Plan, workdir: Path) -> Records:
    """Run `plan` in a fresh spawned process and read back its records."""
    return run_in_process(_main, plan, plan.seconds + plan.timeout + 120, workdir)


def run_in_process(
    target: Callable[[Any, str], None], plan: Any, limit_s: float, workdir: Path
) -> Records:
    """Run `target(plan, out)` in a fresh spawned process; it ends with `save_records(out)`.

    Other benchmarks bring their own load loop (bench/serving drives stock clients) and share
    this process handling and the record format.
    """
    out = workdir / f"load-{time.monotonic_ns()}.npz"
    process = multiprocessing.get_context("spawn").Process(target=target, args=(plan, str(out)))
    process.start()
    process.join(limit_s)
    if process.is_alive():
        process.kill()
        process.join()
        raise RuntimeError("the load process did not finish")
    if process.exitcode != 0:
        raise RuntimeError(f"the load process failed (exit code {process.exitcode})")
    with np.load(out) as data:
        rows = data["rows"]
        records = Records(
            start=rows[:, 0],
            latency=rows[:, 1],
            kind=rows[:, 2].astype(np.int16),
            code=rows[:, 3].astype(np.int16),
            began=float(data["began"]),
            ended=float(data["ended"]),
            client_cpu_seconds=float(data["client_cpu_seconds"]),
            checked=int(data["checked"]),
            wrong=int(data["wrong"]),
            not_sent=int(data["not_sent"]),
            loop_lag_ms=round(float(data["loop_lag_ms"]), 1),
        )
    out.unlink()
    return records
