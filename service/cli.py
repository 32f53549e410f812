"""`cnnserve`: run the service (`serve`) and talk to a running one (`classify`, `models`,
`score`, `show`).

Never imports torch or `export`: this is the whole serving install.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import grpc

from service import config, connection, loops
from service.pictures import command as pictures_command
from service.scoring import command as scoring_command

DEFAULT_SERVER = "127.0.0.1:8001"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve", description="Serve the Fashion-MNIST CNN family over gRPC, and call it."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description="Serve the model repository over gRPC (our API, KServe v2, health, reflection) "
        "with Prometheus metrics on their own port. Settings: flag > environment > config file.",
    )
    config.add_arguments(serve)

    classify = commands.add_parser("classify", help="classify image files with a running service")
    classify.add_argument("images", nargs="+", type=Path, help="PNG, JPEG, WebP, BMP or GIF files")
    classify.add_argument("--model", required=True, help="model name, e.g. lenet5")
    classify.add_argument("--version", default="", help="model version (default: newest)")
    classify.add_argument(
        "--server", default=DEFAULT_SERVER, help="HOST:PORT (default: %(default)s)"
    )
    classify.add_argument("--top-k", type=int, default=5, help="classes to show (default: 5)")
    classify.add_argument(
        "--invert", choices=["auto", "yes", "no"], default="auto", help="colour inversion"
    )
    classify.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    connection.add_arguments(classify)

    score = commands.add_parser(
        "score",
        help="batch-score a folder, IDX file, array or manifest with a running service (or on Ray)",
        description="Stream every image of INPUT through ClassifyStream and write one row per "
        "image to --output (.csv, .jsonl or .parquet), in input order; with labels, print the "
        "accuracy and save the confusion matrix as <output>.confusion.png.",
    )
    scoring_command.add_arguments(score)

    show = commands.add_parser(
        "show",
        help="draw feature maps, first-layer weights, Kirsch edges or shift equivariance as PNGs",
        description="Pictures of what the networks see, written as PNG files into --output: "
        "green positive, red negative, black zero, one symmetric scale per layer.",
    )
    pictures_command.add_arguments(show)

    models = commands.add_parser("models", help="list the models a running service serves")
    models.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT (default: %(default)s)")
    models.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    connection.add_arguments(models)
    return parser


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = config.from_args(args)
    except (ValueError, OSError) as error:
        print(f"cnnserve serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    from service.server import serve

    try:
        with asyncio.Runner(loop_factory=loops.factory(settings.event_loop)) as runner:
            runner.run(serve(settings))
    except (FileNotFoundError, OSError) as error:
        logging.getLogger("cnnserve").error("%s", error)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "score":
        return scoring_command.run(args)
    if args.command == "show":
        return pictures_command.run(args)
    from service import client

    try:
        if args.command == "classify":
            return client.classify_files(args)
        return client.list_models(args)
    except grpc.RpcError as error:
        print(f"cnnserve {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except connection.ConnectionOptionError as error:
        print(f"cnnserve {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
