"""Settings for `cnnserve serve`: defaults < config file < environment (CNNSERVE_*) < flags.

Flag names follow Triton's where Triton has the same knob (`--model-repository`, `--grpc-port`,
`--metrics-port`), so operators feel at home. Every setting has one flag, one environment
variable (the flag's name upper-cased with CNNSERVE_ in front) and one key in the optional
JSON or TOML config file (the flag's name with underscores). The one exception is the list of
bearer tokens: a secret has no flag, because every user on the machine can read a command line,
and it is left out of the settings' repr, so logging the settings never prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service import loops, security

ENV_PREFIX = "CNNSERVE_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything `cnnserve serve` can be told; each field is one flag."""

    model_repository: Path = Path("models")
    models: tuple[str, ...] = ()  # empty: every model in the repository
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8002  # 0 disables the metrics endpoint; tests pick a free port with -1
    device: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    small_batch_session: bool = True
    executor_threads: int = 2
    decode_threads: int = 1
    event_loop: str = "auto"  # auto | uvloop | asyncio
    max_batch_size: int = 0  # 0: each model's own default from model.json
    max_queue_delay_ms: float = -1.0  # negative: each model's own default
    max_queue_images: int = 4096
    max_batches_in_flight: int = 1
    inline_inference_ms: float = 0.25
    coalesce_loop_busy: float = 0.8
    max_images_per_request: int = 1024
    max_pixels: int = 4096 * 4096
    max_receive_message_mb: int = 256
    max_send_message_mb: int = 256
    grace_seconds: float = 10.0
    repository_poll_seconds: float = 0.0  # 0: load the repository once, at start-up
    log_level: str = "info"
    log_json: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)  # no flag: env or config file
    auth_open_health: bool = True


HELP: dict[str, str] = {
    "repository_poll_seconds": "rescan the repository this often and load new models and "
    "versions while serving (0: only at start-up; KServe's RepositoryModelLoad also loads)",
    "model_repository": "model repository folder written by cnnserve-export",
    "models": "comma-separated models to load (default: all in the repository)",
    "grpc_address": "address the gRPC server binds",
    "grpc_port": "gRPC port for both APIs, health and reflection",
    "metrics_address": "address the Prometheus /metrics endpoint binds",
    "metrics_port": "Prometheus /metrics port (0: no metrics endpoint)",
    "device": "auto | cpu | cuda | cuda:N; auto takes CUDA when onnxruntime-gpu sees a GPU",
    "intra_op_threads": "ONNX Runtime threads per session (0: one per core)",
    "inter_op_threads": "ONNX Runtime inter-op threads per session",
    "allow_spinning": "let ONNX Runtime threads spin while idle (faster on idle cores, "
    "steals CPU from the gRPC threads on a small machine)",
    "small_batch_session": "on a multi-core CPU, run the batches small enough for the event "
    "loop (--inline-inference-ms) on a second, one-thread session of the model: no thread-pool "
    "wake-up per operator; costs a small second session per such model",
    "executor_threads": "threads that run batches (session.run releases the GIL)",
    "decode_threads": "threads that decode requests of several encoded images, off the event "
    "loop (more contend with the loop for the GIL: 1 measured best on 2 cores)",
    "event_loop": "auto | uvloop | asyncio; auto takes uvloop where installed (less CPU per "
    "call, see docs/BENCHMARKS.md)",
    "max_batch_size": "largest batch per session.run (0: each model's default from model.json)",
    "max_queue_delay_ms": "longest wait for a batch to fill (negative: each model's default)",
    "max_queue_images": "images that may wait per model before calls fail with RESOURCE_EXHAUSTED",
    "max_batches_in_flight": "batches of one model in inference at once; with more than 1, "
    "a batch waits up to the queue delay to fill while another runs",
    "inline_inference_ms": "batches predicted (from a timed batch of one at load) to take at "
    "most this long run on the event loop, skipping the thread hop (0: never)",
    "coalesce_loop_busy": "once the event loop's thread has been busy this fraction of the "
    "time, a request small enough to run on the loop waits up to the queue delay for others "
    "to share its inference (0: always; 1: never)",
    "max_images_per_request": "images allowed in one request",
    "max_pixels": "decoded pixels allowed per image (decompression-bomb guard)",
    "max_receive_message_mb": "largest gRPC message the server accepts, in MiB",
    "max_send_message_mb": "largest gRPC message the server sends, in MiB",
    "grace_seconds": "on SIGTERM, how long accepted calls get to finish",
    "log_level": "debug | info | warning | error",
    "log_json": "log one JSON object per line",
    "tls_cert": "server certificate chain, PEM; with --tls-key the port speaks TLS only",
    "tls_key": "private key of --tls-cert, PEM",
    "tls_client_ca": "CA bundle, PEM, that client certificates must chain to (mutual TLS: "
    "calls without a valid client certificate are refused)",
    "auth_tokens_file": "file of bearer tokens, one per line ('#' comments); calls must send "
    "'authorization: Bearer <token>'. Tokens may also come from env CNNSERVE_AUTH_TOKENS "
    "(comma-separated), never from a flag",
    "auth_tokens": "bearer tokens, comma-separated; environment or config file only",
    "auth_open_health": "with tokens, leave grpc.health.v1 open for load balancers and probes",
}
# Secrets get no flag: a command line is visible to every user of the machine.
NO_FLAG = frozenset({"auth_tokens"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Refused(argparse.Action):
    """A secret given as a flag: refuse it without echoing it (and without abbreviating
    `--auth-tokens` to `--auth-tokens-file`, whose error would print the secret as a path)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        env = ENV_PREFIX + self.dest.upper()
        parser.error(f"{self.option_strings[0]} is not a flag: secrets go in {env} or a file")


def _convert(name: str, value: Any) -> Any:
    """Config-file and environment values (strings or JSON types) to the field's type."""
    default = getattr(Settings, name)
    if default is None:  # an optional file
        return Path(value) if str(value).strip() else None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if isinstance(default, tuple):
        items = value if isinstance(value, list) else str(value).split(",")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if isinstance(default, Path):
        return Path(value)
    return type(default)(value)


def _from_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    unknown = set(data) - {f.name for f in fields(Settings)}
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    return {key: _convert(key, value) for key, value in data.items()}


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values = {}
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in environ:
            values[f.name] = _convert(f.name, environ[key])
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults are shown by `cnnserve serve --help`."""
    parser.add_argument("--config", type=Path, help="JSON or TOML file of settings (keys as below)")
    for f in fields(Settings):
        if f.name in NO_FLAG:
            parser.add_argument(_flag(f.name), action=_Refused, help=argparse.SUPPRESS)
            continue
        default = getattr(Settings, f.name)
        env = ENV_PREFIX + f.name.upper()
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{HELP[f.name]} (default: {shown or 'none'}; env {env})"
        if isinstance(default, bool):
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(_flag(f.name), help=help_text)


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Merge the layers; a bad value names its setting."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_from_file(args.config))
    values.update(_from_env(environ))
    for f in fields(Settings):
        given = None if f.name in NO_FLAG else getattr(args, f.name, None)
        if given is not None:
            values[f.name] = _convert(f.name, given)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Refuse settings that cannot work, before anything starts."""
    checks = [
        (0 <= settings.grpc_port <= 65535, "grpc_port must be 0-65535"),
        (-1 <= settings.metrics_port <= 65535, "metrics_port must be 0-65535"),
        (settings.max_batch_size >= 0, "max_batch_size must be >= 0"),
        (settings.max_queue_images > 0, "max_queue_images must be > 0"),
        (settings.max_batches_in_flight > 0, "max_batches_in_flight must be > 0"),
        (settings.inline_inference_ms >= 0, "inline_inference_ms must be >= 0"),
        (settings.coalesce_loop_busy >= 0, "coalesce_loop_busy must be >= 0"),
        (settings.max_images_per_request > 0, "max_images_per_request must be > 0"),
        (settings.executor_threads > 0, "executor_threads must be > 0"),
        (settings.decode_threads > 0, "decode_threads must be > 0"),
        (settings.max_receive_message_mb > 0, "max_receive_message_mb must be > 0"),
        (settings.max_send_message_mb > 0, "max_send_message_mb must be > 0"),
        (settings.log_level in ("debug", "info", "warning", "error"), "log_level is not a level"),
    ]
    loops.resolve(settings.event_loop)
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    security.validate(settings)
