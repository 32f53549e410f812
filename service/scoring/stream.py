"""Batches of images through `ClassifyStream`, with a bounded window and retries.

The request iterator runs on gRPC's sending thread: it waits for a free slot in the window
(`window` requests in flight), reads the next batch's images and sends it. The caller's thread
reads the replies, which come back in request order, each with its request's id. When the
stream fails with UNAVAILABLE (or a reply carries UNAVAILABLE or RESOURCE_EXHAUSTED inline: the
model is loading, the server is shutting down, its queue is full) the stream is restarted after
an exponential backoff, re-sending the batches not yet answered first; `retries` failures in a
row without a single answer between them end the run. Any other error ends it at once, naming
the item at fault where the server's message says which (`images[i]...`).
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from service.connection import Connection
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc
from service.scoring.inputs import InputItem

# The stream itself is retried on UNAVAILABLE only (a stream-level RESOURCE_EXHAUSTED is a message
# over a size limit, which would fail again); an item is also retried when its inline error says
# the model's queue was full.
RETRYABLE_STREAM = frozenset({grpc.StatusCode.UNAVAILABLE})
RETRYABLE_ITEM = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
IMAGE_INDEX = re.compile(r"^images\[(\d+)\]\.?")
MAX_BACKOFF_SECONDS = 10.0
# Reconnect quickly once a server comes back; our own backoff paces the attempts.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", -1),  # the server's limits are the ones that count
    ("grpc.max_send_message_length", -1),
]


class ScoreError(RuntimeError):
    """The run stopped; the message names the item (or batch) and the server's reason."""


class _Retry(Exception):
    """A failure worth another attempt: the stream broke, or an item says try later."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Batch:
    """Consecutive items sent as one request; `key` is the stream id of that request."""

    key: str
    items: list[InputItem]


def to_image(item: InputItem) -> pb.Image:
    if item.pixels is not None:
        height, width = item.pixels.shape
        data = item.pixels.tobytes()
        return pb.Image(pixels=pb.RawPixels(height=height, width=width, data=data))
    assert item.path is not None
    try:
        return pb.Image(encoded=item.path.read_bytes())
    except OSError as error:
        raise ScoreError(f"item {item.id}: cannot read {item.path}: {error.strerror}") from None


def describe_failure(batch: Batch, code: grpc.StatusCode, message: str) -> str:
    """`item bags/x.png: INVALID_ARGUMENT: encoded: cannot decode ...` where the server's
    message names the image; otherwise the batch's first and last ids."""
    match = IMAGE_INDEX.match(message)
    if match and int(match.group(1)) < len(batch.items):
        item = batch.items[int(match.group(1))]
        return f"item {item.id}: {code.name}: {message[match.end() :] or message}"
    first, last = batch.items[0].id, batch.items[-1].id
    return f"items {first} to {last}: {code.name}: {message}"


class _Attempt:
    """One stream: the requests it sends, and the batches sent but not yet answered."""

    def __init__(
        self,
        resend: list[Batch],
        source: Iterator[Batch],
        lock: threading.Lock,
        window: int,
        make_request: Any,
    ) -> None:
        self.resend = collections.deque(resend)
        self.source, self.lock, self.make_request = source, lock, make_request
        self.slots = threading.Semaphore(window)
        self.inflight: collections.deque[Batch] = collections.deque()
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def requests(self) -> Iterator[pb.ClassifyStreamRequest]:
        try:
            while True:
                while not self.slots.acquire(timeout=0.1):
                    if self.stopped.is_set():
                        return
                with self.lock:  # the source is shared with the next attempt
                    if self.stopped.is_set():
                        return
                    batch = self.resend.popleft() if self.resend else next(self.source, None)
                    if batch is None:
                        return
                    self.inflight.append(batch)
                yield self.make_request(batch)
        except Exception as error:  # noqa: BLE001 - re-raised on the caller's thread
            self.error = error

    def answered(self) -> None:
        self.inflight.popleft()
        self.slots.release()

    def stop(self) -> list[Batch]:
        """Ends this attempt's requests; returns what the next attempt must send first."""
        with self.lock:
            self.stopped.set()
            return [*self.inflight, *self.resend]


class StreamScorer:
    """Scores batches with one model; yields each batch with its results, in order."""

    def __init__(
        self,
        server: str,
        model: str,
        version: str = "",
        top_k: int = 5,
        invert: int = pb.INVERT_AUTO,
        window: int = 8,
        retries: int = 5,
        backoff: float = 0.5,
        on_retry: Callable[[str], None] | None = None,
        connection: Connection | None = None,
    ) -> None:
        # `connection` adds TLS and a token; it names the server itself.
        self.channel = (connection or Connection(server)).open(CHANNEL_OPTIONS)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.model, self.version, self.top_k, self.invert = model, version, top_k, invert
        self.window, self.retries, self.backoff = window, retries, backoff
        self.on_retry = on_retry
        self.failures = 0  # in a row, with no answer between them

    def _request(self, batch: Batch) -> pb.ClassifyStreamRequest:
        request = pb.ClassifyRequest(
            model=self.model,
            version=self.version,
            images=[to_image(item) for item in batch.items],
            top_k=self.top_k,
            invert=self.invert,
        )
        return pb.ClassifyStreamRequest(id=batch.key, request=request)

    def _wait_before_retry(self, code: grpc.StatusCode, message: str) -> None:
        self.failures += 1
        if self.failures > self.retries:
            raise ScoreError(
                f"gave up after {self.failures} attempts: {code.name}: {message} "
                "(rows written so far are kept; rerun with --resume)"
            )
        delay = min(self.backoff * 2 ** (self.failures - 1), MAX_BACKOFF_SECONDS)
        if self.on_retry is not None:
            self.on_retry(
                f"{code.name}: {message}; retry {self.failures} of {self.retries} in {delay:.1f} s"
            )
        time.sleep(delay)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        """A unary call (GetModel) with the same retries as the stream."""
        while True:
            try:
                reply = getattr(self.stub, method)(request, timeout=timeout)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE_STREAM:
                    raise
                self._wait_before_retry(error.code(), error.details() or "")
                continue
            self.failures = 0
            return reply

    def score(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, pb.ClassifyResponse]]:
        source, lock, pending = iter(batches), threading.Lock(), []
        while True:
            attempt = _Attempt(pending, source, lock, self.window, self._request)
            replies = self.stub.ClassifyStream(attempt.requests())
            try:
                for reply in replies:
                    batch = attempt.inflight[0] if attempt.inflight else None
                    if batch is None or reply.id != batch.key:
                        raise ScoreError(f"reply for request {reply.id!r} came out of order")
                    if reply.HasField("error"):
                        code = STATUS_BY_VALUE.get(reply.error.code, grpc.StatusCode.UNKNOWN)
                        if code in RETRYABLE_ITEM:
                            raise _Retry(code, reply.error.message)
                        raise ScoreError(describe_failure(batch, code, reply.error.message))
                    attempt.answered()
                    self.failures = 0
                    yield batch, reply.response
                if attempt.error is not None:
                    raise attempt.error
                if attempt.inflight:
                    raise ScoreError(f"the stream ended with {len(attempt.inflight)} unanswered")
                return
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE_STREAM:
                    where = attempt.inflight[0] if attempt.inflight else None
                    message = error.details() or ""
                    if where is None:
                        raise ScoreError(f"{error.code().name}: {message}") from None
                    raise ScoreError(describe_failure(where, error.code(), message)) from None
                retry = _Retry(error.code(), error.details() or "")
            except _Retry as inline:
                retry = inline
            finally:
                pending = attempt.stop()
                replies.cancel()
            self._wait_before_retry(retry.code, retry.message)

    def close(self) -> None:
        self.channel.close()
