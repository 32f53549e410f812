"""The gRPC server: both APIs, health checking and reflection on one port; metrics on another.

The port is plaintext, TLS or mutual TLS as configured (`security`); with bearer tokens, every
call needs one except health checks when `auth_open_health` is on. Reflection needs a token
too: it is a developer's tool (grpcurl sends the header with -H), not a probe.

Start-up: scan the repository, open the port (health says NOT_SERVING while models load), load
models one at a time, then report SERVING overall and per model. Shutdown (SIGTERM/SIGINT):
health turns NOT_SERVING at once, new calls are refused, accepted calls get `grace_seconds` to
finish, then the batchers drain and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from service import metrics, security
from service.config import MiB, Settings
from service.draining import DrainGate
from service.oip import OipServicer
from service.polling import RepositoryPoller
from service.proto import cnnserve_pb2, cnnserve_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from service.repository import BatchOverrides, ModelRepository, ModelVersion, State
from service.runtime import RuntimeOptions
from service.servicer import InferenceServicer

log = logging.getLogger(__name__)

INFERENCE_SERVICE = cnnserve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
OIP_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_mb * MiB),
        ("grpc.max_send_message_length", settings.max_send_message_mb * MiB),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    ]


class Server:
    """One running service; tests start it in-process on port 0."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(
            settings.executor_threads, thread_name_prefix="inference"
        )
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.health = health.aio.HealthServicer()
        self.repository = ModelRepository(
            settings.model_repository,
            RuntimeOptions(
                device=settings.device,
                intra_op_threads=settings.intra_op_threads,
                inter_op_threads=settings.inter_op_threads,
                allow_spinning=settings.allow_spinning,
                small_batch_session=settings.small_batch_session,
            ),
            BatchOverrides(
                max_batch_size=settings.max_batch_size or None,
                max_queue_delay_ms=None
                if settings.max_queue_delay_ms < 0
                else settings.max_queue_delay_ms,
                max_queue_images=settings.max_queue_images,
                max_in_flight=settings.max_batches_in_flight,
                inline_ms=settings.inline_inference_ms,
                coalesce_busy=settings.coalesce_loop_busy,
            ),
            self.executor,
            only=settings.models or None,
            on_change=self._model_changed,
        )
        self.grpc: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: metrics.MetricsServer | None = None
        self._stopping = False
        self._poller: asyncio.Task[None] | None = None
        self.drain = DrainGate()

    def _model_changed(self, entry: ModelVersion) -> None:
        """A model is SERVING while any of its versions is ready (an old one during a reload)."""
        if self._stopping:
            return
        versions = self.repository.models.get(entry.name, {}).values()
        ready = any(v.state is State.READY for v in versions)
        status = SERVING if ready else NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(entry.name, status))

    def _services(self) -> list[str]:
        return [INFERENCE_SERVICE, OIP_SERVICE]

    async def start(self) -> None:
        """Open the port and load the models; returns once every model is ready or failed."""
        security.validate(self.settings)
        tokens = security.configured_tokens(self.settings)
        credentials = security.server_credentials(self.settings)
        self.repository.scan()
        server = grpc.aio.server(
            interceptors=security.interceptors(self.settings, tokens) or None,
            options=grpc_options(self.settings),
        )
        # Every service but health goes through the drain gate: health checks must still
        # answer (NOT_SERVING) while the server drains.
        gated = self.drain.registrar(server)
        cnnserve_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.repository, self.settings, self.decoder), gated
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            OipServicer(self.repository, self.settings), gated
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self._services(), health.SERVICE_NAME, reflection.SERVICE_NAME]
        # What reflection.enable_server_reflection does for an aio server, through the gate.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names), gated
        )
        address = f"{self.settings.grpc_address}:{self.settings.grpc_port}"
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error} (is the port in use?)") from error
        for service in ["", *self._services()]:
            await self.health.set(service, NOT_SERVING)
        await server.start()
        self.grpc = server
        if self.settings.metrics_port:
            port = max(self.settings.metrics_port, 0)
            self._metrics_server = metrics.start_metrics_server(port, self.settings.metrics_address)
            self.metrics_port = self._metrics_server.port
        await self.repository.load_all()
        if self.settings.repository_poll_seconds > 0:
            poller = RepositoryPoller(self.repository, self.settings.repository_poll_seconds)
            self._poller = asyncio.get_running_loop().create_task(poller.run())
        for service in ["", *self._services()]:
            await self.health.set(service, SERVING)
        ready = sum(self.repository.newest(n).state is State.READY for n in self.repository.models)
        log.info(
            "serving %d of %d models on %s:%d, %s (metrics on port %s, %s event loop)",
            ready,
            len(self.repository.models),
            self.settings.grpc_address,
            self.port,
            security.describe(self.settings, tokens),
            self.metrics_port or "off",
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let accepted ones finish, then release everything."""
        if self._stopping:
            return
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_seconds if grace is None else grace
        started = time.monotonic()
        self.drain.start()  # new calls: UNAVAILABLE at once; running calls: go on
        if not await self.drain.wait_idle(grace):
            log.warning("grace period over with %d calls still running", self.drain.inflight)
        if self.grpc is not None:
            await self.grpc.stop(max(grace - (time.monotonic() - started), 0.1))
        await self.repository.close()
        self.executor.shutdown(wait=True)
        self.decoder.shutdown(wait=True)
        if self._metrics_server is not None:
            self._metrics_server.stop()

    async def wait(self) -> None:
        if self.grpc is not None:
            await self.grpc.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    start = asyncio.ensure_future(server.start())
    await asyncio.wait(
        [start, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if start.done():
        start.result()  # raise start-up errors
        await stop.wait()
    log.info("shutting down: finishing accepted calls (grace %.0f s)", settings.grace_seconds)
    await server.stop()
    start.cancel()
    answered, inflight = metrics.call_totals()
    # The drain's proof: every call the servicers accepted was answered (tests read this line).
    log.info(
        "stopped: %d calls answered (%s), %d unanswered",
        sum(answered.values()),
        ", ".join(f"{code} {count}" for code, count in sorted(answered.items())) or "none",
        inflight,
    )
