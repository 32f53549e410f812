#!/usr/bin/env python3
"""Container health check: exit 0 only when the service's gRPC health check says SERVING.

Docker's HEALTHCHECK (and docker-compose's) runs this inside the container, where no
grpc_health_probe binary is installed; it needs only grpcio and grpcio-health-checking, which
the serving install already has, so it imports nothing from the project and runs anywhere. It
asks the standard `grpc.health.v1.Health/Check` for the overall service ("" by default: SERVING
once every model has loaded, NOT_SERVING while they load and from the moment shutdown starts),
or for one API or model with `--service`. The port defaults to $CNNSERVE_GRPC_PORT, so a
container whose port was moved through the environment is still checked on the right one.
Exit codes: 0 SERVING, 1 any other status, 2 no answer (refused, timed out, unknown service).

A server on TLS is checked over TLS: `--tls-ca` (the CA that signed the server's certificate),
with `--tls-cert`/`--tls-key` for mutual TLS and `--tls-server-name` when the certificate does
not name localhost. Each defaults to a CNNSERVE_HEALTHCHECK_* variable, so a compose file or pod
spec sets them once. Health checks need no bearer token while `auth_open_health` is on.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 8001  # service.config.Settings.grpc_port; tests/unit/test_deploy.py checks it


def build_parser() -> argparse.ArgumentParser:
    port = os.environ.get("CNNSERVE_GRPC_PORT", str(DEFAULT_PORT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=f"localhost:{port}",
        help="HOST:PORT of the gRPC server (default: %(default)s, from $CNNSERVE_GRPC_PORT)",
    )
    parser.add_argument(
        "--service", default="", help='service or model to check (default: "", the server)'
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds for the whole check (default: 3)"
    )
    for option, what in (
        ("tls-ca", "PEM CA certificate: check over TLS"),
        ("tls-cert", "PEM client certificate for mutual TLS"),
        ("tls-key", "PEM client key for mutual TLS"),
        ("tls-server-name", "name to expect in the server's certificate"),
    ):
        variable = "CNNSERVE_HEALTHCHECK_" + option.upper().replace("-", "_")
        parser.add_argument(
            f"--{option}", default=os.environ.get(variable), help=f"{what} (default: ${variable})"
        )
    return parser


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def open_channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    """Plaintext unless a CA or client certificate is given."""
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        _read(args.tls_ca), _read(args.tls_key), _read(args.tls_cert)
    )
    options = (
        [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    )
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str, timeout: float, channel: grpc.Channel | None = None) -> int:
    """One Check call; never waits for a connection beyond `timeout`, never retries."""
    with channel or grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        channel = open_channel(args.address, args)
    except OSError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 2
    return check(args.address, args.service, args.timeout, channel)


if __name__ == "__main__":
    sys.exit(main())
