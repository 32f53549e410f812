"""How the client commands reach a server: plaintext or TLS, a client certificate, a bearer token.

`classify`, `models`, `score` and `show` share these options, so a secured server is reached the
same way by all of them. The token is added as `authorization: Bearer <token>` metadata by a
client interceptor rather than call credentials, because gRPC sends call credentials over TLS
only, and a token over plaintext is still useful behind a TLS-terminating proxy. The token is
best given through CNNSERVE_TOKEN: a `--token` on the command line is visible to other users.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

TOKEN_ENV = "CNNSERVE_TOKEN"


class ConnectionOptionError(ValueError):
    """A client option that cannot work (a missing file, a key without a certificate)."""


@dataclass(frozen=True)
class Connection:
    """Where the server is and what to show it; the token is kept out of the repr."""

    server: str
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str = field(default="", repr=False)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext; a client certificate needs its key."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConnectionOptionError(
                "--tls-cert and --tls-key go together (the client certificate)"
            )
        if self.tls_ca is None and self.tls_cert is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read("--tls-ca", self.tls_ca),
            private_key=_read("--tls-key", self.tls_key),
            certificate_chain=_read("--tls-cert", self.tls_cert),
        )

    def open(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel with TLS and the token as configured."""
        credentials = self.credentials()
        if credentials is None:
            channel = grpc.insecure_channel(self.server, options=options)
        else:
            channel = grpc.secure_channel(self.server, credentials, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, BearerToken(self.token))
        return channel


def _read(flag: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConnectionOptionError(f"{flag} {path}: {error.strerror or error}") from None


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call, streaming or not."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key and --token, for every client command."""
    parser.add_argument(
        "--tls-ca", type=Path, help="CA bundle (PEM) to verify the server with; turns on TLS"
    )
    parser.add_argument(
        "--tls-cert", type=Path, help="client certificate (PEM) for a server that wants mutual TLS"
    )
    parser.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    parser.add_argument(
        "--token",
        help=f"bearer token for a server that wants one (default: ${TOKEN_ENV}, "
        "which other users cannot see, unlike a command line)",
    )


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Connection:
    """The connection the options ask for; the token falls back to $CNNSERVE_TOKEN."""
    environ = dict(os.environ if environ is None else environ)
    return Connection(
        server=args.server,
        tls_ca=getattr(args, "tls_ca", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        token=getattr(args, "token", None) or environ.get(TOKEN_ENV, "").strip(),
    )
