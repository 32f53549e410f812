"""`cnnserve score INPUT --server HOST:PORT --model NAME --output FILE`: the command itself.

Asks the service for the model's labels, opens the input and the output (resuming it when
asked), streams the remaining items in batches with a progress bar, appends each answered
batch in input order, and, where labels are known, prints the accuracy, per-class accuracy and
confusion matrix and saves the matrix as `<output>.confusion.png`. With `--engine ray` a
`RayScorer` (`ray_engine`) takes the service's place: the same job on a Ray cluster, no server.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from tqdm import tqdm

from service import connection
from service.proto import cnnserve_pb2 as pb
from service.scoring import outputs
from service.scoring.inputs import InputError, InputItem, open_input
from service.scoring.report import evaluate, format_report, render_confusion
from service.scoring.stream import Batch, ScoreError, StreamScorer

if TYPE_CHECKING:
    from service.scoring.ray_engine import RayScorer

DEFAULT_SERVER = "127.0.0.1:8001"
INVERT_CHOICES = ("auto", "yes", "no")
ENGINES = ("grpc", "ray")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        type=Path,
        help="a folder of images (recursive), a Fashion-MNIST IDX images file (gz or raw), "
        "a .npy/.npz array, or a .csv/.parquet manifest with a `path` and optional `label` column",
    )
    parser.add_argument("--model", required=True, help="model name, e.g. lenet5")
    parser.add_argument("--version", default="", help="model version (default: newest)")
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="result file; its extension picks the format: .csv, .jsonl or .parquet",
    )
    parser.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT (default: %(default)s)")
    connection.add_arguments(parser)
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="grpc",
        help="grpc: send the images to a running service (--server); ray: run ONNX Runtime on a "
        "Ray cluster, no server needed (--ray-address, --model-repository) (default: grpc)",
    )
    parser.add_argument(
        "--ray-address",
        help="--engine ray: the cluster to join, e.g. ray://HEAD:10001 or auto "
        "(default: start a local Ray instance)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path("models"),
        help="--engine ray: the exported models (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per request (default: %(default)s)"
    )
    parser.add_argument(
        "--window", type=int, default=8, help="requests in flight at once (default: %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes per row (default: 5)")
    parser.add_argument(
        "--invert",
        choices=INVERT_CHOICES,
        help="colour inversion (default: auto for image files, no for arrays and IDX, which are "
        "already light on dark like Fashion-MNIST)",
    )
    parser.add_argument("--limit", type=int, help="score only the first N items of the input")
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --output, skip their ids"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        help="attempts in a row on UNAVAILABLE before giving up (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-backoff",
        type=float,
        default=0.5,
        help="first wait in seconds before a retry, doubled each time (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> str | None:
    for name in ("batch_size", "window", "top_k"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if args.limit is not None and args.limit < 0:
        return "--limit must be 0 or more"
    if args.retries < 0 or args.retry_backoff < 0:
        return "--retries and --retry-backoff must not be negative"
    return None


def _batches(items: Iterator[InputItem], done: set[str], size: int) -> Iterator[Batch]:
    remaining = (item for item in items if item.id not in done)
    for number in itertools.count():
        chunk = list(itertools.islice(remaining, size))
        if not chunk:
            return
        yield Batch(key=str(number), items=chunk)


def run(args: argparse.Namespace) -> int:
    """The whole command; returns the exit status (2: bad arguments or files, 1: a failed run)."""
    if (problem := _check(args)) is not None:
        return fail(problem, 2)
    try:
        outputs.output_format(args.output)
    except outputs.OutputError as error:
        return fail(str(error), 2)

    scorer: StreamScorer | RayScorer
    if args.engine == "ray":
        from service.scoring.ray_engine import RayScorer  # Ray is imported on this path only

        try:
            scorer = RayScorer(
                args.model_repository,
                args.model,
                args.version,
                address=args.ray_address,
                batch_size=args.batch_size,
            )
        except ScoreError as error:
            return fail(str(error), 2)
    else:
        try:
            scorer = StreamScorer(
                args.server,
                args.model,
                args.version,
                window=args.window,
                retries=args.retries,
                backoff=args.retry_backoff,
                on_retry=lambda message: tqdm.write(f"cnnserve score: {message}", file=sys.stderr),
                connection=connection.from_args(args),
            )
        except connection.ConnectionOptionError as error:
            return fail(str(error), 2)
    try:
        info = scorer.call("GetModel", pb.GetModelRequest(model=args.model, version=args.version))
    except grpc.RpcError as error:
        scorer.close()
        return fail(f"{error.code().name}: {error.details()}", 1)
    except ScoreError as error:
        scorer.close()
        return fail(str(error), 1)
    if info.kind != "classifier":
        scorer.close()
        return fail(f"{info.name} is a {info.kind} with no class output; score a classifier", 2)
    labels = list(info.labels)
    scorer.top_k = min(args.top_k, len(labels))

    confusion_png = args.output.with_name(args.output.name + ".confusion.png")
    exclude = frozenset(p.resolve() for p in (args.output, confusion_png))
    try:
        source = open_input(args.input, labels, args.limit, exclude)
        writer = outputs.open_output(
            args.output, source.has_labels, source.indexed, args.resume, args.overwrite
        )
    except (InputError, outputs.OutputError) as error:
        scorer.close()
        return fail(str(error), 2)
    invert = args.invert or ("auto" if source.encoded else "no")
    scorer.invert = {"auto": pb.INVERT_AUTO, "yes": pb.INVERT_YES, "no": pb.INVERT_NO}[invert]

    done = {str(row["id"]) for row in writer.existing}
    pairs: list[tuple[str | None, str]] = [
        (row.get("true_label"), row["label"]) for row in writer.existing
    ]
    remaining = sum(1 for item_id in source.ids() if item_id not in done)
    skipped = source.count - remaining

    bar = tqdm(
        total=remaining,
        unit="img",
        desc=f"{info.name} {info.version}",
        disable=args.no_progress or None,  # None: only on a terminal
        dynamic_ncols=True,
    )
    written, started = 0, time.perf_counter()
    status = 0
    try:
        for batch, response in scorer.score(_batches(source.items(), done, args.batch_size)):
            rows = []
            for item, result in zip(batch.items, response.results, strict=True):
                true = None if item.true_label is None else labels[item.true_label]
                top = [(score.label, score.probability) for score in result.top_k]
                item_id = int(item.id) if source.indexed else item.id
                rows.append(outputs.Row(item_id, top[0][0], top[0][1], top, true))
                pairs.append((true, top[0][0]))
            writer.write(rows)
            written += len(rows)
            bar.update(len(rows))
    except ScoreError as error:
        message = f"{error}\n{written} new rows were written to {args.output}; fix the cause"
        status = fail(message + " and rerun with --resume to go on", 1)
    except KeyboardInterrupt:
        message = f"interrupted; {written} new rows were written to {args.output}"
        status = fail(message + "; rerun with --resume to go on", 130)
    finally:
        bar.close()
        writer.close()
        scorer.close()
    if status:
        return status

    seconds = time.perf_counter() - started
    rate = written / seconds if seconds > 0 else 0.0
    print(
        f"scored {written} images in {seconds:.1f} s ({rate:,.0f} images/s) with "
        f"{info.name} {info.version}; {skipped} were already in {args.output}"
    )
    _report(pairs, labels, info, confusion_png)
    return 0


def fail(message: str, status: int) -> int:
    print(f"cnnserve score: {message}", file=sys.stderr)
    return status


def _report(
    pairs: list[tuple[str | None, str]], labels: list[str], info: pb.ModelInfo, confusion_png: Path
) -> None:
    evaluation = evaluate(pairs, labels)
    if evaluation is None:
        return
    reference = info.accuracy if info.HasField("accuracy") else None
    print()
    print(format_report(evaluation, reference))
    title = (
        f"{info.name} {info.version}: accuracy {evaluation.accuracy:.2%} "
        f"on {evaluation.total:,} images"
    )
    render_confusion(evaluation, confusion_png, title)
    print(f"\nconfusion matrix: {confusion_png}")
