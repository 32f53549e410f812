"""TLS, mutual TLS and bearer tokens on a real server, with certificates made here.

A throwaway CA signs a server certificate (for 127.0.0.1 and localhost) and a client one; a second
CA signs a client certificate the server must refuse. Servers run in-process on loopback, except
one `cnnserve serve` subprocess that the CLI clients reach over mutual TLS with a token, whose log
and metrics are then searched for the tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service import cli, config, security
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import RunningServer, start_server
from tests.integration.test_service import png, reference, sample, scrape
from tests.prometheus import free_port

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

CNNSERVE = [sys.executable, "-m", "service.cli"]
HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
SERVING = health_pb2.HealthCheckResponse.SERVING
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# Certificates ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server and client pair it signed, and a client pair from a stranger."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path

    def client_credentials(self, *, client: bool = False) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.client_key.read_bytes() if client else None,
            certificate_chain=self.client_cert.read_bytes() if client else None,
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[x509.ExtensionType],
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, stranger_ca_key = new_key(), new_key()
    ca_usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    ca_cert = _issue("cnnserve test CA", ca_key, None, [ca_usage], ca=True)
    ca_path, _ = _write(folder, "ca", ca_cert, ca_key)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server_key = new_key()
    server_cert = _issue(
        "localhost",
        server_key,
        (ca_cert.subject, ca_key),
        [san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
    )
    client_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    client_key, stranger_key = new_key(), new_key()
    client_cert = _issue("a client", client_key, (ca_cert.subject, ca_key), [client_usage])
    stranger_cert = _issue(
        "a stranger", stranger_key, (_name("another CA"), stranger_ca_key), [client_usage]
    )
    return Pki(
        ca_path,
        *_write(folder, "server", server_cert, server_key),
        *_write(folder, "client", client_cert, client_key),
        *_write(folder, "stranger", stranger_cert, stranger_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# Helpers -----------------------------------------------------------------------------------


def failure(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value.code(), raised.value.details()


def classify_request(fmnist) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=png(fmnist.test_images[0]))])


def assert_classifies(channel: grpc.Channel, fmnist, repository: Path) -> None:
    """The answer is the model's own, so the call really went through and was served."""
    reply = pb_grpc.InferenceStub(channel).Classify(classify_request(fmnist), timeout=30)
    (want,) = reference(repository, "lenet5", fmnist.test_images[:1], ["probabilities"])
    got = np.array(reply.results[0].probabilities)
    np.testing.assert_allclose(got, want[0], atol=1e-6)


def tls_server(repository: Path, pki: Pki, **overrides) -> RunningServer:
    return start_server(
        repository,
        models=("lenet5",),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        **overrides,
    )


# TLS and mutual TLS ------------------------------------------------------------------------


def test_tls_serves_clients_that_trust_the_ca_only(tiny_repository, pki, fmnist) -> None:
    running = tls_server(tiny_repository, pki)
    try:
        with grpc.secure_channel(running.address, pki.client_credentials()) as channel:
            assert_classifies(channel, fmnist, tiny_repository)
        # The fixture's plaintext channel, and a TLS client that does not trust our CA.
        code, _ = failure(running.stub.Classify, classify_request(fmnist), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE
        system_roots = grpc.ssl_channel_credentials()
        with grpc.secure_channel(running.address, system_roots) as channel:
            stub = pb_grpc.InferenceStub(channel)
            code, _ = failure(stub.Classify, classify_request(fmnist), timeout=10)
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tiny_repository, pki, fmnist) -> None:
    running = tls_server(tiny_repository, pki, tls_client_ca=pki.ca)
    try:
        with grpc.secure_channel(running.address, pki.client_credentials(client=True)) as channel:
            assert_classifies(channel, fmnist, tiny_repository)
        stranger = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.stranger_key.read_bytes(),
            certificate_chain=pki.stranger_cert.read_bytes(),
        )
        for credentials in (pki.client_credentials(), stranger):
            with grpc.secure_channel(running.address, credentials) as channel:
                stub = pb_grpc.InferenceStub(channel)
                code, _ = failure(stub.Classify, classify_request(fmnist), timeout=10)
                assert code == grpc.StatusCode.UNAVAILABLE
        # The container's health check speaks mutual TLS when told how (flags or environment).
        check = [sys.executable, str(HEALTHCHECK), "--address", running.address]
        plain = subprocess.run(check, capture_output=True, text=True, timeout=30)
        assert plain.returncode == 2, plain
        env = {
            **os.environ,
            "CNNSERVE_HEALTHCHECK_TLS_CA": str(pki.ca),
            "CNNSERVE_HEALTHCHECK_TLS_CERT": str(pki.client_cert),
            "CNNSERVE_HEALTHCHECK_TLS_KEY": str(pki.client_key),
        }
        secured = subprocess.run(check, capture_output=True, text=True, timeout=30, env=env)
        assert secured.returncode == 0 and "SERVING" in secured.stdout, secured
    finally:
        running.stop()


# Bearer tokens -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two tokens in a file with comments, two in CNNSERVE_AUTH_TOKENS, read as `serve` does."""
    file_tokens = [secrets.token_urlsafe(24) for _ in range(2)]
    env_tokens = [secrets.token_urlsafe(24) for _ in range(2)]
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# ci\n{file_tokens[0]}\n\n{file_tokens[1]}  # dashboards\n")
    args = cli.build_parser().parse_args(["serve", "--auth-tokens-file", str(path)])
    settings = config.from_args(args, {"CNNSERVE_AUTH_TOKENS": " , ".join(env_tokens)})
    return {"file": file_tokens, "env": env_tokens, "path": path, "settings": settings}


@pytest.fixture(scope="module")
def guarded(tiny_repository, tokens) -> Iterator[RunningServer]:
    settings = tokens["settings"]
    running = start_server(
        tiny_repository,
        models=("lenet5",),
        auth_tokens=settings.auth_tokens,
        auth_tokens_file=settings.auth_tokens_file,
    )
    yield running
    running.stop()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_tokens_come_from_the_file_and_the_environment_and_stay_secret(tokens) -> None:
    settings = tokens["settings"]
    assert settings.auth_tokens == tuple(tokens["env"])
    assert security.configured_tokens(settings) == (*tokens["env"], *tokens["file"])
    shown = repr(settings)
    assert "auth_tokens_file=" in shown
    assert not any(t in shown for t in [*tokens["env"], *tokens["file"]])
    # A secret has no flag: command lines are readable by every user of the machine.
    refused = subprocess.run(
        [*CNNSERVE, "serve", f"--auth-tokens={tokens['env'][0]}"],  # a token may start with "-"
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and tokens["env"][0] not in refused.stderr
    assert "--auth-tokens is not a flag: secrets go in CNNSERVE_AUTH_TOKENS" in refused.stderr


def test_calls_without_a_valid_token_are_unauthenticated(guarded, tokens, fmnist) -> None:
    inference = guarded.stub
    kserve = oip_grpc.GRPCInferenceServiceStub(guarded.channel)
    stream = [pb.ClassifyStreamRequest(id="a", request=classify_request(fmnist))]
    calls = {
        "Classify": lambda metadata: inference.Classify(
            classify_request(fmnist), metadata=metadata
        ),
        "ClassifyStream": lambda metadata: list(
            inference.ClassifyStream(iter(stream), metadata=metadata)
        ),
        "ServerLive": lambda metadata: kserve.ServerLive(
            oip.ServerLiveRequest(), metadata=metadata
        ),
        "ModelReady": lambda metadata: kserve.ModelReady(
            oip.ModelReadyRequest(name="lenet5"), metadata=metadata
        ),
    }
    wrong = [
        (None, security.MISSING_TOKEN),
        ([("authorization", tokens["file"][0])], security.MISSING_TOKEN),  # no scheme
        (bearer(""), security.MISSING_TOKEN),
        (bearer(secrets.token_urlsafe(24)), security.INVALID_TOKEN),
        (bearer(tokens["file"][0][:-1]), security.INVALID_TOKEN),
        (bearer(tokens["env"][0] + "x"), security.INVALID_TOKEN),
    ]
    before = scrape(guarded.metrics_url)
    for name, call in calls.items():
        for metadata, message in wrong:
            code, details = failure(call, metadata)
            assert (code, details) == (UNAUTHENTICATED, message), (name, metadata)
    assert security.MISSING_TOKEN == (
        "missing authorization metadata: send 'authorization: Bearer <token>'"
    )
    for token in [*tokens["file"], *tokens["env"]]:
        assert calls["Classify"](bearer(token)).results[0].top_k
        (reply,) = calls["ClassifyStream"](bearer(token))
        assert reply.id == "a" and reply.WhichOneof("result") == "response"
        assert calls["ServerLive"](bearer(token)).live
        assert calls["ModelReady"]([("authorization", f"bearer {token}")]).ready
    after = scrape(guarded.metrics_url)

    def rejected(method: str, reason: str) -> float:
        labels = dict(method=method, reason=reason)
        name = "cnnserve_auth_rejected_total"
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert rejected("/cnnserve.v1.Inference/Classify", "missing") == 3
    assert rejected("/cnnserve.v1.Inference/ClassifyStream", "invalid") == 3
    assert rejected("/inference.GRPCInferenceService/ServerLive", "invalid") == 3
    assert not any(t in after for t in [*tokens["file"], *tokens["env"]])


def test_health_is_open_and_reflection_is_not(guarded, tokens) -> None:
    health = health_pb2_grpc.HealthStub(guarded.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="lenet5")).status == SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    code, details = failure(lambda: list(reflection.ServerReflectionInfo(iter([request]))))
    assert (code, details) == (UNAUTHENTICATED, security.MISSING_TOKEN)
    metadata = bearer(tokens["env"][1])
    (reply,) = list(reflection.ServerReflectionInfo(iter([request]), metadata=metadata))
    assert "cnnserve.v1.Inference" in {s.name for s in reply.list_services_response.service}


def test_health_can_be_closed_too(tiny_repository, tokens) -> None:
    running = start_server(
        tiny_repository,
        models=("lenet5",),
        auth_tokens=tuple(tokens["env"]),
        auth_open_health=False,
    )
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        code, details = failure(health.Check, health_pb2.HealthCheckRequest())
        assert (code, details) == (UNAUTHENTICATED, security.MISSING_TOKEN)
        metadata = bearer(tokens["env"][0])
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=metadata).status == SERVING
    finally:
        running.stop()


# Bad configuration -------------------------------------------------------------------------


def test_bad_security_settings_are_refused_with_the_flag_and_file(pki, tmp_path) -> None:
    missing = tmp_path / "missing.pem"
    comments = tmp_path / "comments-only"
    comments.write_text("# nobody yet\n\n")
    cert, key = str(pki.server_cert), str(pki.server_key)
    cases = [
        (["--tls-cert", str(missing), "--tls-key", key], f"--tls-cert {missing}: No such file"),
        (["--tls-cert", cert, "--tls-key", str(missing)], f"--tls-key {missing}: No such file"),
        (["--tls-key", key], "--tls-key needs --tls-cert"),
        (["--tls-cert", cert], "--tls-cert needs --tls-key"),
        (["--tls-client-ca", str(pki.ca)], "--tls-client-ca needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(missing)],
            f"--tls-client-ca {missing}: No such file",
        ),
        (["--tls-cert", cert, "--tls-key", cert], f"--tls-key {cert}: not a PEM file with a "),
        (["--auth-tokens-file", str(missing)], f"--auth-tokens-file {missing}: No such file"),
        (["--auth-tokens-file", str(comments)], f"--auth-tokens-file {comments}: no tokens"),
    ]
    for flags, message in cases:
        args = cli.build_parser().parse_args(["serve", *flags])
        with pytest.raises(ValueError) as raised:
            config.from_args(args, {})
        assert message in str(raised.value), flags
    result = subprocess.run(
        [*CNNSERVE, "serve", "--tls-cert", str(missing), "--tls-key", key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip() == f"cnnserve serve: --tls-cert {missing}: No such file or directory"
    )


# The CLI, end to end -----------------------------------------------------------------------


def wait_serving(address: str, credentials, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    with grpc.secure_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited early: {process.stderr.read()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING in time")


def test_cli_reaches_a_mutual_tls_server_with_a_token(tiny_repository, pki, fmnist, tmp_path):
    file_token, env_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    token_file = tmp_path / "tokens"
    token_file.write_text(file_token + "\n")
    port, metrics_port = free_port(), free_port()
    # The token is known to the server only through a file and the environment.
    server_env = {**os.environ, "CNNSERVE_AUTH_TOKENS": env_token}
    process = subprocess.Popen(
        [
            *CNNSERVE,
            "serve",
            *("--model-repository", str(tiny_repository), "--models", "lenet5"),
            *("--grpc-address", "127.0.0.1", "--grpc-port", str(port)),
            *("--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port)),
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
            *("--tls-client-ca", str(pki.ca), "--auth-tokens-file", str(token_file)),
            *("--log-level", "debug", "--grace-seconds", "1"),
        ],
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    tls = ["--server", address, "--tls-ca", str(pki.ca)]
    mtls = [*tls, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    client_env = {k: v for k, v in os.environ.items() if k != "CNNSERVE_AUTH_TOKENS"}

    def client(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
        env = client_env if token is None else {**client_env, "CNNSERVE_TOKEN": token}
        return subprocess.run(
            [*CNNSERVE, *args], capture_output=True, text=True, timeout=60, env=env
        )

    try:
        wait_serving(address, pki.client_credentials(client=True), process)
        image = tmp_path / "item.png"
        Image.fromarray(fmnist.test_images[0]).save(image)
        result = client("classify", str(image), "--model", "lenet5", *mtls, "--token", file_token)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == str(image) and "%" in result.stdout
        listed = client("models", *mtls, token=env_token)  # the token from CNNSERVE_TOKEN
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[1].split()[:4] == ["lenet5", "1", "classifier", "ready"]
        for args, token, message in [
            ((*mtls, "--token", "wrong"), None, "UNAUTHENTICATED: invalid bearer token"),
            (mtls, None, f"UNAUTHENTICATED: {security.MISSING_TOKEN}"),
            (tls, env_token, "UNAVAILABLE"),  # no client certificate
            ((*tls, "--tls-key", str(pki.client_key)), env_token, "--tls-cert and --tls-key go"),
        ]:
            refused = client("models", *args, token=token)
            assert refused.returncode in (1, 2) and message in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        exposition = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'cnnserve_auth_rejected_total{method="/cnnserve.v1.Inference/ListModels"' in (
            exposition
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
    log = process.stderr.read() + process.stdout.read()
    assert "mutual TLS, bearer tokens (2 configured, health open)" in log, log
    assert file_token not in log and env_token not in log
    assert file_token not in exposition and env_token not in exposition
