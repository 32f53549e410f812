"""`cnnserve-export`: train the family, convert to ONNX, and list the model repository.

cnnserve-export train --model lenet5 [--epochs N] [--max-steps N] [--option k=v ...]
    [--quantize int8|auto]
cnnserve-export all [--quick] [--skip-existing] [--jobs N|auto] [--quantize int8|auto]
cnnserve-export quantize NAME [NAME ...] [--calibration-images N] [--auto]
cnnserve-export report [--docs DIR] [--seconds S]
cnnserve-export list
cnnserve-export models
cnnserve-export samples FOLDER [--count N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from export import family, quantize, repository
from export.data import LABELS, DatasetNotFoundError, FashionMNIST, load_fashion_mnist
from export.pipeline import QUICK_SET, ExportRequest, ExportResult, export_model
from export.registry import get_entry, list_models

DEFAULT_REPOSITORY = "models"


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value`, with the value read as JSON when it parses (numbers, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option wants key=value; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(os.environ.get("CNNSERVE_MODEL_REPOSITORY", DEFAULT_REPOSITORY)),
        help="repository folder (default: %(default)s, or $CNNSERVE_MODEL_REPOSITORY)",
    )


def _training(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    parser.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--train-limit", type=int, help="train on the first N training images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default: cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--quantize",
        choices=["int8", "auto"],
        help="also write NAME-int8, statically quantized from each exported classifier; auto "
        "serves it only where it measures faster and at most 1 point less accurate",
    )
    _calibration(parser)


def _calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=quantize.CALIBRATION_IMAGES,
        help="training images that calibrate int8 activation ranges (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve-export", description="Train the cnnserve model family and export it to ONNX."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model and add it to the repository")
    train.add_argument("--model", required=True, choices=list_models(), help="family member")
    train.add_argument("--name", help="repository name (default: the model name)")
    train.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor option, e.g. width=32 or padding=wrap (repeatable)",
    )
    _training(train)

    every = commands.add_parser("all", help="train and export the whole family (or the quick set)")
    every.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_SET)}")
    every.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip models that already have a version (so an interrupted run resumes)",
    )
    every.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N|auto",
        help="members trained at once, each on cores/N torch threads, longest first (default: "
        "auto, one per core on a CPU, one on a GPU)",
    )
    _training(every)

    int8 = commands.add_parser(
        "quantize", help="write NAME-int8 from the newest version of each named classifier"
    )
    int8.add_argument("names", nargs="+", metavar="NAME", help="repository names")
    _common(int8)
    int8.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST IDX files")
    int8.add_argument(
        "--seed", type=int, default=0, help="calibration sample seed (default: %(default)s)"
    )
    _calibration(int8)
    int8.add_argument(
        "--auto",
        action="store_true",
        help="serve it only where it measures faster and at most 1 point less accurate "
        "(otherwise it goes to the repository's hidden .rejected folder)",
    )

    table = commands.add_parser(
        "report", help="measure the repository's models and write docs/MODELS.md with pictures"
    )
    _common(table)
    table.add_argument("--docs", type=Path, default=Path("docs"), help="folder for MODELS.md")
    table.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST IDX files")
    table.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        help="measuring time per speed figure (default: %(default)s)",
    )

    listing = commands.add_parser("list", help="print the model repository as a table")
    _common(listing)
    commands.add_parser("models", help="print the family members and their default recipes")

    samples = commands.add_parser("samples", help="write Fashion-MNIST test images as PNG files")
    samples.add_argument("folder", type=Path, help="where to write them")
    samples.add_argument("--count", type=int, default=10, help="how many (default: %(default)s)")
    samples.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST IDX files")
    return parser


def write_samples(folder: Path, count: int, data_dir: Path | None) -> list[Path]:
    """The first `count` test images as PNGs named by index and true label, for first calls."""
    from PIL import Image

    data = load_fashion_mnist(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        label = LABELS[data.test_labels[index]].lower().replace("/", "-").replace(" ", "-")
        path = folder / f"{index:05d}-{label}.png"
        Image.fromarray(data.test_images[index]).save(path)
        paths.append(path)
    return paths


def _jobs(text: str) -> int | None:
    try:
        return family.parse_jobs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _request(
    args: argparse.Namespace, model: str, name: str | None = None, **options: Any
) -> ExportRequest:
    return ExportRequest(
        model=model,
        name=name,
        options=options,
        recipe={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
        seed=args.seed,
        max_steps=args.max_steps,
        train_limit=args.train_limit,
        device=args.device,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )


def _report(result: ExportResult, seconds: float) -> None:
    accuracy = result.config["accuracy"]["onnxruntime"]
    shown = f"test accuracy {accuracy:.4f}" if accuracy is not None else "feature extractor"
    print(f"wrote {result.path} ({shown}, {seconds:.0f} s)", flush=True)


def _quantize(args: argparse.Namespace, data: FashionMNIST, name: str) -> None:
    """Write NAME-int8 and print its accuracy against float32's on one line."""
    started = time.perf_counter()
    root = args.model_repository
    seed = args.seed
    reasons: list[str] = []
    if getattr(args, "quantize", None) == "auto" or getattr(args, "auto", False):
        path, reasons = quantize.quantize_auto(root, name, data, args.calibration_images, seed)
    else:
        path = quantize.quantize_int8(root, name, data, args.calibration_images, seed)
    config = json.loads((path / repository.CONFIG_FILE).read_text())
    drop = config["quantization"]["accuracy_drop"]
    goal = "" if drop <= quantize.ACCURACY_DROP_GOAL else ", above the 1-point goal"
    kept = f"; not served: {', '.join(reasons)}" if reasons else ""
    print(
        f"wrote {path} (int8 accuracy {config['accuracy']['onnxruntime']:.4f}, float32 "
        f"{config['quantization']['base']['accuracy']:.4f}, drop {drop * 100:.2f} points{goal}, "
        f"{time.perf_counter() - started:.0f} s{kept})",
        flush=True,
    )


def _quantize_exported(args: argparse.Namespace, data: FashionMNIST, name: str) -> None:
    """`--quantize int8` after an export: classifiers only, and once with --skip-existing."""
    target = quantize.int8_name(name)
    root = args.model_repository
    done = repository.versions(root, target) or repository.versions(
        root / repository.REJECTED, target
    )
    if getattr(args, "skip_existing", False) and done:
        print(f"skip {target}: already in {args.model_repository}", flush=True)
        return
    try:
        quantize.check_quantizable(quantize.newest_config(args.model_repository, name))
    except quantize.NotQuantizableError as error:
        print(f"skip {target}: {error}", flush=True)
        return
    _quantize(args, data, name)


def _load_data(data_dir: Path | None) -> FashionMNIST | None:
    try:
        return load_fashion_mnist(data_dir)
    except DatasetNotFoundError as error:
        print(f"cnnserve-export: {error}", file=sys.stderr)
        return None


def _export_one(args: argparse.Namespace, data: FashionMNIST, request: ExportRequest) -> str:
    """Train, export and (if asked) quantize one member; its outcome (export/family.py)."""
    name = request.target
    try:
        if getattr(args, "skip_existing", False) and repository.versions(
            args.model_repository, name
        ):
            print(f"skip {name}: already in {args.model_repository}", flush=True)
            outcome = family.SKIPPED
        else:
            started = time.perf_counter()
            result = export_model(request, data, args.model_repository)
            _report(result, time.perf_counter() - started)
            outcome = family.TRAINED
    except Exception as error:  # one model's failure must not stop the rest of the family
        print(f"cnnserve-export: {name} failed: {error}", file=sys.stderr, flush=True)
        return family.FAILED
    if args.quantize and not _quantize_safely(args, data, name):
        return family.INT8_FAILED if outcome == family.TRAINED else family.FAILED
    return outcome


def _quantize_safely(args: argparse.Namespace, data: FashionMNIST, name: str) -> bool:
    try:
        _quantize_exported(args, data, name)
    except Exception as error:  # one model's failure must not stop the others
        print(f"cnnserve-export: {name}: int8 failed: {error}", file=sys.stderr, flush=True)
        return False
    return True


# A worker process of `all --jobs N`: its threads and its copy of the data, set up once.
_WORKER_DATA: FashionMNIST | None = None


def _worker_init(threads: int, data_dir: Path | None) -> None:
    import torch

    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = load_fashion_mnist(data_dir)


def _worker_export(args: argparse.Namespace, request: ExportRequest) -> str:
    assert _WORKER_DATA is not None, "_worker_init runs first"
    return _export_one(args, _WORKER_DATA, request)


def _run_training(args: argparse.Namespace, requests: list[ExportRequest]) -> int:
    import torch

    data = _load_data(args.data_dir)
    if data is None:
        return 2
    if args.command == "all":
        outcomes = _run_family(args, requests, data)
    else:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        outcomes = {r.target: _export_one(args, data, r) for r in requests}
    failed = [name for name, outcome in outcomes.items() if outcome in family.FAILURES]
    if failed:
        print(f"cnnserve-export: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_family(
    args: argparse.Namespace, requests: list[ExportRequest], data: FashionMNIST
) -> dict[str, str]:
    """The family, one member after another or `--jobs` at once; the run is recorded."""
    import torch

    root = args.model_repository
    skip = {
        r.target for r in requests if args.skip_existing and repository.versions(root, r.target)
    }
    todo = [r for r in requests if r.target not in skip]
    cpus = os.cpu_count() or 1
    jobs = family.choose_jobs(args.jobs, max(len(todo), 1), args.device, cpus)
    threads = args.threads or max(1, cpus // jobs)
    torch.set_num_threads(threads)
    started_at, started = dt.datetime.now(dt.UTC), time.perf_counter()
    if jobs == 1:
        outcomes = {r.target: _export_one(args, data, r) for r in requests}
    else:
        # Skipped members first, here: they print why, and get a missing int8 variant.
        outcomes = {r.target: _export_one(args, data, r) for r in requests if r.target in skip}
        quiet = [replace(r, progress=False) for r in todo]  # parallel step bars would clash
        planned = family.plan(quiet, threads)
        print(family.describe_plan(planned, jobs, threads), flush=True)
        train_only = argparse.Namespace(**{**vars(args), "quantize": None})
        outcomes |= family.run_parallel(
            partial(_worker_export, train_only),
            planned,
            jobs,
            _worker_init,
            (threads, args.data_dir),
        )
        if args.quantize:  # once training is over: int8 races float32 on an idle CPU
            torch.set_num_threads(cpus)
            for name in [n for n, outcome in outcomes.items() if outcome == family.TRAINED]:
                if not _quantize_safely(args, data, name):
                    outcomes[name] = family.INT8_FAILED
    family.record_run(
        root, started_at, time.perf_counter() - started, jobs, threads, args.device, outcomes
    )
    return outcomes


def _run_quantize(args: argparse.Namespace) -> int:
    data = _load_data(args.data_dir)
    if data is None:
        return 2
    failed: list[str] = []
    for name in args.names:
        try:
            _quantize(args, data, name)
        except Exception as error:  # one model's failure must not stop the others
            print(f"cnnserve-export: {name}: {error}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"cnnserve-export: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_report(args: argparse.Namespace, argv: list[str] | None) -> int:
    from export.report import write_report

    shown = " ".join(sys.argv[1:] if argv is None else argv)
    try:
        path = write_report(
            args.model_repository,
            args.docs,
            args.data_dir,
            args.seconds,
            command=f"cnnserve-export {shown}",
        )
    except (ValueError, DatasetNotFoundError) as error:
        print(f"cnnserve-export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def list_repository(root: Path) -> str:
    """The repository as a table: a row per model, its versions and its newest one's figures."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for config in repository.read_configs(root):
        by_name.setdefault(config["name"], []).append(config)
    rows = []
    for name, configs in by_name.items():
        latest = configs[-1]
        accuracy = latest["accuracy"]["onnxruntime"]
        rows.append(
            [
                name,
                ",".join(str(c["version"]) for c in configs),
                latest["kind"],
                f"{latest['params']:,}",
                f"{latest['mflops']:.2f}",
                "-" if accuracy is None else f"{accuracy:.4f}",
                f"{latest['file']['bytes'] / 1e6:.2f} MB",
            ]
        )
    if not rows:
        return f"no models in {root}"
    header = ["name", "versions", "kind", "params", "MFLOPs", "accuracy", "size"]
    return _format_table(rows, header)


def _list_family() -> str:
    """Every member at its default size, with parameters and MFLOPs measured on the network."""
    from export.complexity import count_params, mflops_per_image
    from export.registry import create_model

    rows = []
    for name in list_models():
        entry = get_entry(name)
        model = create_model(name)
        rows.append(
            [
                name,
                f"{count_params(model):,}",
                f"{mflops_per_image(model):.2f}",
                ", ".join(model.stage_names) or "-",
                str(entry.recipe.epochs),
                entry.recipe.optimizer if entry.recipe.trainable else "-",
                entry.summary,
            ]
        )
    header = ["model", "params", "MFLOPs", "stages", "epochs", "optimizer", "summary"]
    return _format_table(rows, header)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(list_repository(args.model_repository))
        return 0
    if args.command == "models":
        print(_list_family())
        return 0
    if args.command == "samples":
        for path in write_samples(args.folder, args.count, args.data_dir):
            print(path)
        return 0
    if args.command == "quantize":
        return _run_quantize(args)
    if args.command == "report":
        return _run_report(args, argv)
    if args.command == "train":
        requests = [_request(args, args.model, args.name, **dict(args.option))]
    else:
        names = QUICK_SET if args.quick else list_models()
        requests = [_request(args, name) for name in names]
    return _run_training(args, requests)


if __name__ == "__main__":
    sys.exit(main())
