"""The ONNX Runtime session(s) of a model version: provider choice, threads, output selection.

The provider in use is read back from the session, never assumed: ONNX Runtime quietly falls
back to the CPU when the CUDA provider cannot start, and its Python `run` may fall back again
after a CUDA failure. We disable that fallback and report, or refuse, what really runs.
`run` is thread-safe and releases the GIL, so the batcher calls it from a thread pool. On a
multi-core CPU a one-thread twin session runs the batches small enough for the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.errors import InferenceFailed

log = logging.getLogger(__name__)
CPU = "CPUExecutionProvider"
WARM_UP_TIMINGS = 5
TIMED_SIZES = (1, 8)
CUDA = "CUDAExecutionProvider"


class LoadError(Exception):
    """A session could not be created as asked (bad file, or the device is not there)."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created; defaults are chosen for a small CPU machine (see README)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    intra_op_threads: int = 0  # 0: one per core
    inter_op_threads: int = 1  # the graphs are chains: no parallel branches worth a pool
    allow_spinning: bool = False  # spinning threads steal the cores the gRPC loop needs
    # On a multi-core CPU, a second, one-thread session for the batches the event loop runs
    small_batch_session: bool = True

    def threads(self) -> int:
        return self.intra_op_threads or os.cpu_count() or 1


def parse_device(device: str) -> tuple[str, int]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' to (kind, device id); anything else is an error."""
    kind, _, index = device.partition(":")
    if kind in ("auto", "cpu") and not index:
        return kind, 0
    if kind == "cuda" and (not index or index.isdigit()):
        return kind, int(index or 0)
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")


def providers_for(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list to ask ONNX Runtime for."""
    kind, index = parse_device(device)
    available = ort.get_available_providers()
    if kind == "cpu" or (kind == "auto" and CUDA not in available):
        return [CPU]
    if CUDA not in available:
        raise LoadError(
            f"device {device!r} asked for, but this onnxruntime has no {CUDA} "
            f"(available: {', '.join(available)}); install the `gpu` extra (onnxruntime-gpu)"
        )
    load_cuda_libraries()
    return [(CUDA, {"device_id": str(index)}), CPU]


@functools.cache
def load_cuda_libraries() -> None:
    """Load CUDA, cuBLAS and cuDNN before the first CUDA session, once per process.

    onnxruntime-gpu's CUDA provider finds them by name only; installed as NVIDIA's wheels
    (`pip install onnxruntime-gpu[cuda,cudnn]`) they sit in site-packages, off the loader's
    path. `preload_dlls` looks there, then on the usual path; what it prints about a library
    it could not load goes to our log, and the session's start then says what failed.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime before 1.21: LD_LIBRARY_PATH must name the libraries
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preload()
    if printed.getvalue().strip():
        log.warning("loading the CUDA libraries: %s", printed.getvalue().strip())


class ModelRuntime:
    """An ONNX Runtime session and what the batcher needs to know about it."""

    def __init__(self, path: Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        requested = providers_for(options.device)
        # CUDA kernels need no CPU operator threads: a pool would only spin beside the loop
        threads = options.threads() if requested == [CPU] else 1
        # every session of the model, the per-size ones on CUDA too: no fallback to the CPU
        self._new_session = functools.partial(_strict_session, path, options, threads, requested)
        self.session = self._new_session()
        self.provider = self.session.get_providers()[0]
        kind, _ = parse_device(options.device)
        if kind == "cuda" and self.provider != CUDA:
            raise LoadError(
                f"device {options.device!r} asked for, but ONNX Runtime started {self.provider} "
                "(is a GPU visible, and are the CUDA libraries installed?)"
            )
        # A batch small enough to run on the event loop runs on a one-thread session: its
        # operators are too small to split, and waking the pool's threads for each costs more
        # than they save. warm_up creates it where it may get such batches, and the repository
        # sets `single_images` to the loop's share.
        self.single: ort.InferenceSession | None = None
        twin = self.provider == CPU and options.threads() > 1 and options.small_batch_session
        self._twin = (path, options) if twin else None
        self.single_images = 0
        self.single_seconds: dict[int, float] = {}  # the same timings for `single`
        self.batch_seconds: dict[int, float] = {}  # images -> seconds, measured by warm_up
        # On CUDA, the batch sizes a batch is padded up to, each run by a session of its own
        # (see padded_sizes); empty on the CPU, where every batch runs as it is
        self.padded_sizes: tuple[int, ...] = ()
        self._sized: dict[int, ort.InferenceSession] = {}
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        # ONNX Runtime's CUDA provider keeps its cuDNN and cuBLAS state per calling thread
        # (microsoft/onnxruntime#1149), and a Python server calling one CUDA session from many
        # threads sees calls of 20-400 ms where one thread sees steady ones (#23094); our
        # first GPU suite run saw the same. So one thread makes every call of a CUDA session,
        # its warm-up included, and the batcher's threads wait on it.
        self._device_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="cuda-session")
            if self.provider == CUDA
            else None
        )

    def close(self) -> None:
        """Let the CUDA session's thread end once its calls are done (the version is dropped)."""
        if self._device_thread is not None:
            self._device_thread.shutdown(wait=False)

    def run(self, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Only the named outputs are copied out; the graph runs once whatever is asked."""
        if self._device_thread is not None:
            return self._device_thread.submit(self._run, batch, outputs).result()
        return self._run(batch, outputs)

    def _run(self, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if not self.padded_sizes:  # the CPU: every batch as it is
            return self._infer(batch, outputs)
        largest = self.padded_sizes[-1]
        if len(batch) > largest:  # a request over the batch limit: in warm chunks
            parts = [
                self._run_padded(batch[start : start + largest], outputs)
                for start in range(0, len(batch), largest)
            ]
            return {name: np.concatenate([part[name] for part in parts]) for name in outputs}
        return self._run_padded(batch, outputs)

    def _run_padded(self, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Zero images after the real ones up to the next padded size; their rows dropped."""
        images = len(batch)
        size = next(s for s in self.padded_sizes if s >= images)
        if size > images:
            full = np.zeros((size, *batch.shape[1:]), batch.dtype)
            full[:images] = batch
            batch = full
        return {name: value[:images] for name, value in self._infer(batch, outputs).items()}

    def _infer(self, batch: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        session = self._session_for(len(batch))
        try:
            values = session.run(list(outputs), {self.input_name: batch})
        except Exception as error:
            raise InferenceFailed(f"inference failed: {error}") from error
        return dict(zip(outputs, values, strict=True))

    def _session_for(self, images: int) -> ort.InferenceSession:
        if images in self._sized:
            return self._sized[images]
        if self.single is not None and images <= self.single_images:
            return self.single
        return self.session

    def warm_up(self, max_batch_size: int, loop_budget_s: float = 0.0) -> None:
        """See `_warm_up`; on CUDA it runs on the session's own thread, as every call does."""
        if self._device_thread is not None:
            self._device_thread.submit(self._warm_up, max_batch_size, loop_budget_s).result()
        else:
            self._warm_up(max_batch_size, loop_budget_s)

    def _warm_up(self, max_batch_size: int, loop_budget_s: float) -> None:
        """Run the largest and the smallest batch once, so first requests pay no allocation;
        then time batches of TIMED_SIZES (the median of a few runs each). On CUDA, run each
        of `padded_sizes` once instead, each on its own session: the first run of a shape is
        when cuDNN picks its convolution algorithms, by trying them all (ONNX Runtime's
        default), and that must not happen while serving.

        `loop_budget_s`: the longest batch the event loop runs. Where one image on the pool
        takes at most the thread count times that, the one-thread session is created and
        timed too. Beyond it, one image could fit the budget only if one thread ran it more
        than `threads` times faster than `threads` of them, so such a model never runs on
        the loop and its twin would only cost memory and start-up time.
        """
        if self.provider == CUDA:
            self.pad_batches_to(padded_sizes(max_batch_size))
        for size in self.padded_sizes or sorted({1, max(1, max_batch_size)}):
            self._session_for(size).run(self.output_names, {self.input_name: self._zeros(size)})
        # timed the way a batch is served: on CUDA, padded or in chunks, each on its own size
        self.batch_seconds = {size: self._median_seconds(self._run, size) for size in TIMED_SIZES}
        if self._twin is None:
            return
        path, options = self._twin
        if self.batch_seconds[1] > options.threads() * loop_budget_s:
            return
        self.single = single = make_session(path, options, 1, [CPU])
        # only small batches ever run on it, and its memory arena grows only to what it
        # sees: warming it at the largest batch would double the memory for nothing
        self.single_seconds = {
            size: self._median_seconds(
                lambda batch, outputs: single.run(list(outputs), {self.input_name: batch}), size
            )
            for size in TIMED_SIZES
        }

    def pad_batches_to(self, sizes: tuple[int, ...]) -> None:
        """Pad every batch up to one of `sizes` (the last the largest), each size run by a
        session of its own, so no session ever sees a second shape (see padded_sizes)."""
        self.padded_sizes = sizes
        self._sized = {
            size: self.session if size == sizes[-1] else self._new_session() for size in sizes
        }

    def use_single_for(self, images: int) -> None:
        """Run batches of up to `images` on the one-thread session; with 0, drop the session."""
        if self.single is None or images <= 0:
            self.single, self.single_images = None, 0
            return
        self.single_images = images

    def _median_seconds(
        self, run: Callable[[np.ndarray, Sequence[str]], object], size: int
    ) -> float:
        batch, times = self._zeros(size), []
        for _ in range(WARM_UP_TIMINGS):
            started = time.perf_counter()
            run(batch, self.output_names)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def predicted_seconds(self, images: int, single: bool = False) -> float | None:
        """A batch's inference time, on the line through the timed sizes (None: not timed);
        `single`: on the one-thread session, where there is one."""
        seconds = self.single_seconds if single and self.single_seconds else self.batch_seconds
        if len(seconds) < len(TIMED_SIZES):
            return None
        return _line(seconds)(images)

    def _zeros(self, size: int) -> np.ndarray:
        shape = [size, *(d if isinstance(d, int) else 1 for d in self.input_shape())]
        return np.zeros(shape, np.float32)

    def input_shape(self) -> list[int | str]:
        """Per-image input shape (the batch axis left out)."""
        return list(self.session.get_inputs()[0].shape[1:])


def make_session(
    path: Path,
    options: RuntimeOptions,
    threads: int,
    providers: list[str | tuple[str, dict[str, str]]],
) -> ort.InferenceSession:
    """One session made as cnnserve makes its own (bench.gpu_shapes makes its sessions so)."""
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.log_severity_level = 3
    spin = "1" if options.allow_spinning else "0"
    session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    try:
        return ort.InferenceSession(str(path), session_options, providers=providers)
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types
        raise LoadError(f"ONNX Runtime could not load {path.name}: {error}") from error


def _strict_session(
    path: Path,
    options: RuntimeOptions,
    threads: int,
    providers: list[str | tuple[str, dict[str, str]]],
) -> ort.InferenceSession:
    """A session whose `run` fails instead of retrying on the CPU after a CUDA error."""
    session = make_session(path, options, threads, providers)
    session.disable_fallback()
    return session


def padded_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then it: the only shapes a CUDA session sees
    (a request over the limit runs in chunks of it).

    A dynamic batcher makes batches of every size up to its limit, and on CUDA each new size
    costs a cuDNN algorithm search, far longer than the batch itself (docs/BENCHMARKS.md's GPU
    section shows the suite's run before this). Padding to these few sizes, each searched
    once at warm-up, costs at most twice the images' compute, which a GPU running a batch of
    at most `max_batch_size` small images hardly notices.

    Each size gets a session of its own: ONNX Runtime's CUDA convolutions keep the state of
    the last shape they ran, so one session whose batch size changes pays for setting up the
    convolutions again at every change, even back to a shape it has run before
    (`python -m bench.gpu_shapes` measures both).
    """
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max(1, max_batch_size))


def _line(seconds: dict[int, float]) -> Callable[[int], float]:
    """Batch time against images, on the line through two timed sizes (never decreasing)."""
    (small, t_small), (large, t_large) = sorted(seconds.items())
    per_image = max(t_large - t_small, 0.0) / (large - small)
    return lambda images: t_small + per_image * (images - small)
