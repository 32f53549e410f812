"""The client commands in the box: `cnnserve classify` and `cnnserve models`.

Plain synchronous gRPC with the generated stubs: the same calls a user's script would make.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from service import connection
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc

INVERT = {"auto": pb.INVERT_AUTO, "yes": pb.INVERT_YES, "no": pb.INVERT_NO}
STATE_NAMES = {v: k.removeprefix("MODEL_STATE_").lower() for k, v in pb.ModelState.items()}


def _stub(args: argparse.Namespace) -> pb_grpc.InferenceStub:
    """A stub over TLS and with a token when the options ask for them."""
    return pb_grpc.InferenceStub(connection.from_args(args).open())


def classify_files(args: argparse.Namespace) -> int:
    """Top-k per file; a file that cannot be read is a one-line error, not a traceback."""
    images = []
    for path in args.images:
        try:
            images.append(pb.Image(encoded=path.read_bytes()))
        except OSError as error:
            print(f"cnnserve classify: {path}: {error.strerror or error}", file=sys.stderr)
            return 1
    request = pb.ClassifyRequest(
        model=args.model,
        version=args.version,
        images=images,
        top_k=args.top_k,
        invert=INVERT[args.invert],
    )
    try:
        response = _stub(args).Classify(request, timeout=args.timeout)
    except grpc.RpcError as error:
        detail = error.details() or ""
        if error.code() is grpc.StatusCode.INVALID_ARGUMENT and detail.startswith("images["):
            index = int(detail[len("images[") : detail.index("]")])
            detail = f"{args.images[index]}: {detail}"
        print(f"cnnserve classify: {error.code().name}: {detail}", file=sys.stderr)
        return 1
    for path, result in zip(args.images, response.results, strict=True):
        print(path)
        for score in result.top_k:
            print(f"  {score.probability:7.2%}  {score.label}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    response = _stub(args).ListModels(pb.ListModelsRequest(), timeout=args.timeout)
    rows = [["name", "version", "kind", "state", "provider", "params", "MFLOPs", "accuracy"]]
    for model in response.models:
        accuracy = f"{model.accuracy:.4f}" if model.HasField("accuracy") else "-"
        state = STATE_NAMES[model.state] + (
            f" ({model.state_reason})" if model.state_reason else ""
        )
        rows.append(
            [
                model.name,
                model.version,
                model.kind,
                state,
                model.execution_provider or "-",
                f"{model.params:,}",
                f"{model.mflops:.2f}",
                accuracy,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
