"""Transport security and bearer-token authentication for the gRPC port.

TLS (and mutual TLS when a client CA is given) is a property of the port, so `server_credentials`
builds what `add_secure_port` takes. Tokens are checked by `TokenInterceptor`, a `grpc.aio`
server interceptor, before any servicer runs, so both APIs, streaming or not, are covered by one
check. Every misconfiguration is refused at start-up by `validate`, naming the flag and the file.
Token values are never logged, put in a metric label or echoed to a client: only their count is
ever reported.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from service import metrics

if TYPE_CHECKING:
    from service.config import Settings

MISSING_TOKEN = "missing authorization metadata: send 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"
# Load balancers, the container's HEALTHCHECK and Kubernetes' gRPC probes carry no token.
HEALTH_METHODS = frozenset(
    f"/{health.SERVICE_NAME}/{method}" for method in ("Check", "Watch", "List")
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read(name: str, path: Path) -> bytes:
    """A configured file's bytes, or an error that names the flag and the file."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{_flag(name)} {path}: {error.strerror or error}") from None


def read_tokens_file(path: Path) -> tuple[str, ...]:
    """One token per line; blank lines and '#' comments are skipped, so a file can say whose."""
    try:
        lines = _read("auth_tokens_file", path).decode().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--auth-tokens-file {path}: not UTF-8 text") from None
    return tuple(t for t in (line.split("#", 1)[0].strip() for line in lines) if t)


def configured_tokens(settings: Settings) -> tuple[str, ...]:
    """The tokens from CNNSERVE_AUTH_TOKENS (or the config file) and --auth-tokens-file."""
    tokens = list(settings.auth_tokens)
    if settings.auth_tokens_file is not None:
        tokens += read_tokens_file(settings.auth_tokens_file)
    return tuple(dict.fromkeys(tokens))


def validate(settings: Settings) -> None:
    """Refuse TLS and token settings that cannot work, before the port opens."""
    if settings.tls_key is not None and settings.tls_cert is None:
        raise ValueError("--tls-key needs --tls-cert (the server certificate it belongs to)")
    if settings.tls_cert is not None and settings.tls_key is None:
        raise ValueError("--tls-cert needs --tls-key (the certificate's private key)")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
    pem_markers = {
        "tls_cert": "CERTIFICATE",
        "tls_key": "PRIVATE KEY",
        "tls_client_ca": "CERTIFICATE",
    }
    for name, marker in pem_markers.items():
        path = getattr(settings, name)
        if path is None:
            continue
        text = _read(name, path)
        if b"-----BEGIN " not in text or marker.encode() not in text:
            raise ValueError(f"{_flag(name)} {path}: not a PEM file with a {marker}")
    if settings.auth_tokens_file is not None and not read_tokens_file(settings.auth_tokens_file):
        raise ValueError(f"--auth-tokens-file {settings.auth_tokens_file}: no tokens in the file")
    if any(any(c.isspace() for c in token) for token in settings.auth_tokens):
        raise ValueError("CNNSERVE_AUTH_TOKENS: a token contains whitespace")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the port, or None for plaintext; a client CA turns on mutual TLS."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    key = _read("tls_key", settings.tls_key)
    cert = _read("tls_cert", settings.tls_cert)
    client_ca = (
        None if settings.tls_client_ca is None else _read("tls_client_ca", settings.tls_client_ca)
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(settings: Settings, tokens: Sequence[str]) -> str:
    """The security mode for the start-up log line: counts and paths, never a token."""
    if settings.tls_client_ca is not None:
        transport = "mutual TLS"
    elif settings.tls_cert is not None:
        transport = "TLS"
    else:
        transport = "plaintext"
    if not tokens:
        return f"{transport}, no authentication"
    health_note = "health open" if settings.auth_open_health else "health needs a token too"
    return f"{transport}, bearer tokens ({len(tokens)} configured, {health_note})"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def rejecting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code` and `message`.

    It takes raw bytes in and out, so a refused request is never parsed.
    """

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` for a configured token.

    Only SHA-256 digests are kept, and the given token's digest is compared with every one in
    constant time, with no early exit, so timing tells neither the token nor which one matched.
    """

    def __init__(self, tokens: Sequence[str], open_methods: frozenset[str] = frozenset()) -> None:
        if not tokens:
            raise ValueError("TokenInterceptor needs at least one token")
        self._digests = tuple(_digest(token) for token in tokens)
        self._open_methods = open_methods

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None when the metadata carries a configured token, else the reason to refuse."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values or not isinstance(values[0], str):
            return MISSING_TOKEN
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MISSING_TOKEN
        given = _digest(token.strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        return None if matched else INVALID_TOKEN

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method in self._open_methods:
            return handler
        problem = self.check(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if problem is None:
            return handler
        metrics.observe_auth_rejected(method, "missing" if problem == MISSING_TOKEN else "invalid")
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)


def interceptors(settings: Settings, tokens: Sequence[str]) -> list[grpc.aio.ServerInterceptor]:
    """The token check when tokens are configured; none otherwise."""
    if not tokens:
        return []
    open_methods = HEALTH_METHODS if settings.auth_open_health else frozenset()
    return [TokenInterceptor(tokens, open_methods)]
