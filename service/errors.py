"""Domain errors, each carrying the gRPC status it maps to, and the one place that maps them.

The runtime, batcher and repository raise these and never touch grpc; the servicers are wrapped
in `grpc_errors`, which turns them into statuses. Anything else becomes INTERNAL with a generic
message and a logged traceback, so internals never leak to clients.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error meant for the client: its message is safe and says what to fix."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InferenceFailed(ServiceError):
    """A batch failed in ONNX Runtime: only that batch's requests fail."""

    code = grpc.StatusCode.INTERNAL


INTERNAL_MESSAGE = "internal error; the server log has the details"

F = TypeVar("F", bound=Callable[..., Any])


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and client-safe message for any exception."""
    if isinstance(error, ServiceError):
        return error.code, str(error)
    log.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def grpc_errors(method: F) -> F:
    """Abort the RPC with the error's status; works for unary and streaming aio handlers."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except ServiceError as error:
                await context.abort(*status_of(error))
            except Exception as error:  # noqa: BLE001 - mapped to INTERNAL, logged
                await context.abort(*status_of(error))

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except ServiceError as error:
            await context.abort(*status_of(error))
        except Exception as error:  # noqa: BLE001 - mapped to INTERNAL, logged
            await context.abort(*status_of(error))

    return unary_wrapper  # type: ignore[return-value]
