"""`cnnserve show features|weights|kirsch|shift`: pictures of what the networks see.

Each mode writes PNG sheets (see `render`) into `--output` and prints their paths. IMAGE is a
file (PNG, JPEG, WebP, BMP, GIF) or `fmnist:N`, test image N of Fashion-MNIST. It is turned
into the model's 28 x 28 input here, with the service's own preprocessing, and sent as a
tensor: the picture of the input is exactly what the model saw, and shift mode can shift it.
Feature maps come from the running service (`Classify` with features for classifiers, so the
prediction goes in the title; `FeatureMaps` for feature extractors); weights come from the
repository's `model.onnx` on disk, so no server is needed for them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from service import connection
from service.pictures import render, shift
from service.pictures.sources import DEFAULT_IDX, ImageError, Source, load_image
from service.pictures.weights import WeightsError, first_layer, model_folder, read_config
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:8001"
# The Kirsch model's channel order (export/models/kirsch.py): channel i answers an edge whose
# bright side faces DIRECTIONS[i].
DIRECTIONS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")
# Where each direction sits in the compass-rose layout (row, column); the input is at (1, 0).
ROSE = {"NW": (0, 1), "N": (0, 2), "NE": (0, 3), "W": (1, 1), "E": (1, 3)}
ROSE |= {"SW": (2, 1), "S": (2, 2), "SE": (2, 3), "magnitude": (1, 2)}


class ShowError(ValueError):
    """A request `show` cannot carry out; the message is the whole one-line explanation."""


# Arguments -----------------------------------------------------------------------------------


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", help="an image file (PNG, JPEG, WebP, BMP, GIF) or fmnist:N (test image N)"
    )
    parser.add_argument(
        "--idx",
        type=Path,
        help="Fashion-MNIST images IDX file for fmnist:N (default: $FMNIST_DIR, then "
        f"{DEFAULT_IDX.parent}, then the download cache)",
    )
    parser.add_argument(
        "--invert", choices=["auto", "yes", "no"], default="auto", help="colour inversion"
    )
    parser.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    connection.add_arguments(parser)


def _scale(text: str) -> str | float:
    try:
        return render.parse_scale(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", default="", help="model version (default: newest)")
    parser.add_argument(
        "--scale",
        type=_scale,
        default="max",
        help="colour scale, symmetric about 0: max (the largest |value| of the layer, the "
        "default), pNN (the NNth percentile of |value|, e.g. p99: brighter, the largest "
        "saturate) or a number (fixed, so pictures compare)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("pictures"), help="folder (default: %(default)s)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True)
    features = modes.add_parser(
        "features",
        help="feature maps of an image: one grid per layer",
        description="Ask the service for the feature maps of IMAGE and draw one grid per layer "
        "(green positive, red negative, black zero; one symmetric scale per layer), vector "
        "stages as bars, and the input itself.",
    )
    _image_arguments(features)
    features.add_argument("--model", required=True, help="model name, e.g. lenet5")
    features.add_argument(
        "--layers", default="all", help="comma-separated stages, e.g. c1,s2, or all (default)"
    )
    features.add_argument(
        "--max-channels", type=int, default=256, help="channels drawn per layer (default: 256)"
    )
    _common(features)

    weights = modes.add_parser(
        "weights",
        help="first-layer weights from model.onnx (no server needed)",
        description="Draw the first layer's weights, read from the repository's model.onnx: "
        "logreg's ten classes and mlp's hidden units as 28x28 pictures, conv models' filters.",
    )
    weights.add_argument("--model", required=True, help="model name, e.g. logreg")
    weights.add_argument(
        "--repository", type=Path, default=Path("models"), help="model repository (default: models)"
    )
    _common(weights)

    kirsch = modes.add_parser(
        "kirsch",
        help="the eight Kirsch compass edge maps and their magnitude",
        description="The eight Kirsch edge maps of IMAGE in a compass rose, magnitude at the "
        "centre; channel i answers an edge whose bright side faces N, NE, E, SE, S, SW, W, NW.",
    )
    _image_arguments(kirsch)
    kirsch.add_argument("--model", default="kirsch", help="a Kirsch model (default: kirsch)")
    _common(kirsch)

    moved = modes.add_parser(
        "shift",
        help="shift equivariance: maps of an image and of the image shifted",
        description="Feature maps of IMAGE and of IMAGE shifted by (--dx, --dy), and the maps "
        "of the shifted image shifted back minus the original's; prints the relative "
        "difference (0 for an equivariant layer).",
    )
    _image_arguments(moved)
    moved.add_argument("--model", required=True, help="model name, e.g. lenet5")
    moved.add_argument("--layer", required=True, help="one stage, e.g. c1")
    moved.add_argument("--dx", type=int, default=3, help="pixels right (default: 3)")
    moved.add_argument("--dy", type=int, default=0, help="pixels down (default: 0)")
    moved.add_argument(
        "--shift",
        choices=shift.MODES,
        default="roll",
        help="roll: pixels leaving one side come back on the other (np.roll); pad: they are "
        "lost and the dark ground fills in (default: roll)",
    )
    moved.add_argument("--max-channels", type=int, default=16, help="channels drawn (default: 16)")
    _common(moved)


# The service ---------------------------------------------------------------------------------


def as_tensor(pixels: np.ndarray) -> pb.Image:
    data = np.ascontiguousarray(pixels, dtype="<f4").tobytes()
    return pb.Image(
        tensor=pb.Tensor(shape=[1, *pixels.shape], dtype=pb.DATA_TYPE_FLOAT32, data=data)
    )


def stage_of(name: str) -> str:
    return name.removeprefix("features.")


def decode(feature: pb.FeatureMap) -> np.ndarray:
    dtype = "<f2" if feature.dtype == pb.DATA_TYPE_FLOAT16 else "<f4"
    return np.frombuffer(feature.data, dtype=dtype).astype(np.float32).reshape(feature.shape)


def choose_stages(model: pb.ModelInfo, wanted: str) -> list[str]:
    """Stages by name (`c1` or `features.c1`) or `all`, in the model's order."""
    stages = [stage_of(f.name) for f in model.features]
    if not stages:
        raise ShowError(
            f"{model.name} has no feature stages; see its first layer with "
            f"`cnnserve show weights --model {model.name}`"
        )
    if wanted.strip() == "all":
        return stages
    chosen = []
    for name in (stage_of(n.strip()) for n in wanted.split(",") if n.strip()):
        if name not in stages:
            raise ShowError(f"unknown layer {name!r} for {model.name}; valid: {', '.join(stages)}")
        chosen.append(name)
    return list(dict.fromkeys(chosen)) or stages


@dataclass(frozen=True)
class Answer:
    maps: dict[str, np.ndarray]  # stage -> per-image array
    prediction: str | None  # "Ankle boot (97.1%)" for a classifier


def ask(
    stub: pb_grpc.InferenceStub,
    model: pb.ModelInfo,
    images: list[np.ndarray],
    stages: list[str],
    timeout: float,
) -> list[Answer]:
    """Feature maps of `stages` for each image, with the top class for classifiers."""
    tensors = [as_tensor(image) for image in images]
    names = [f"features.{s}" for s in stages]
    if model.kind == "classifier":
        request = pb.ClassifyRequest(
            model=model.name, version=model.version, images=tensors, top_k=1, features=names
        )
        response = stub.Classify(request, timeout=timeout)
        return [
            Answer(
                {stage_of(f.name): decode(f) for f in result.features},
                f"{result.top_k[0].label} ({result.top_k[0].probability:.1%})"
                if result.top_k
                else None,
            )
            for result in response.results
        ]
    request = pb.FeatureMapsRequest(
        model=model.name, version=model.version, images=tensors, features=names
    )
    response = stub.FeatureMaps(request, timeout=timeout)
    return [
        Answer({stage_of(f.name): decode(f) for f in result.features}, None)
        for result in response.results
    ]


def _connect(
    channel: grpc.Channel, args: argparse.Namespace, name: str
) -> tuple[pb_grpc.InferenceStub, pb.ModelInfo]:
    stub = pb_grpc.InferenceStub(channel)
    model = stub.GetModel(
        pb.GetModelRequest(model=name, version=args.version), timeout=args.timeout
    )
    return stub, model


def _describe(source: Source, answer: Answer | None = None) -> str:
    text = f"input {source.tag}"
    if source.label:
        text += f", true class {source.label}"
    if answer is not None and answer.prediction:
        text += f" · predicted {answer.prediction}"
    return text


def _save(picture: render.Picture, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    picture.save(path)
    print(path)
    return path


# Modes ---------------------------------------------------------------------------------------


def layer_picture(
    model: pb.ModelInfo,
    stage: str,
    maps: np.ndarray,
    source: Source,
    answer: Answer,
    max_channels: int = 256,
    scale_spec: str | float = "max",
) -> render.Picture:
    """One stage's maps as a grid of tiles, or a vector stage as bars."""
    scale = render.choose_scale(scale_spec, maps)
    info = {"model": model.name, "version": model.version, "layer": stage}
    info["shape"] = list(maps.shape)
    subtitle = [render.describe_scale(scale_spec, scale) + " in the layer"]
    subtitle.append(_describe(source, answer))
    if maps.ndim == 1 or int(np.prod(maps.shape[1:])) == 1:
        vector = maps.reshape(-1)
        rows = [render.Row([render.bar_chart(vector, scale)])]
        shape = f"{len(vector)} units"
    else:
        shown = maps[:max_channels]
        rows = render.grid_rows(render.map_cells(shown, scale))
        shape = f"{maps.shape[0]} maps of {maps.shape[1]} x {maps.shape[2]}"
        if len(shown) < len(maps):
            shape += f" (the first {len(shown)} drawn)"
    title = f"{model.name} v{model.version} · {stage} · {shape}"
    return render.sheet(
        title, rows, subtitle=subtitle, scale=scale, thumbnail=source.pixels, info=info
    )


def input_picture(source: Source) -> render.Picture:
    subtitle = ["28 x 28 as sent to the model, values in [0, 1]"]
    if source.label:
        subtitle.append(f"true class: {source.label}")
    rows = [render.Row([render.input_cell(source.pixels, "", size=224)])]
    return render.sheet(f"input · {source.tag}", rows, subtitle=subtitle, info={"layer": "input"})


def show_features(args: argparse.Namespace) -> int:
    source = load_image(args.image, args.invert, args.idx)
    with connection.from_args(args).open() as channel:
        stub, model = _connect(channel, args, args.model)
        stages = choose_stages(model, args.layers)
        [answer] = ask(stub, model, [source.pixels], stages, args.timeout)
    _save(input_picture(source), args.output, f"{source.tag}-input.png")
    for stage in stages:
        maps = answer.maps[stage]
        picture = layer_picture(
            model, stage, maps, source, answer, max(1, args.max_channels), args.scale
        )
        _save(picture, args.output, f"{source.tag}-{model.name}-{stage}.png")
    return 0


def show_weights(args: argparse.Namespace) -> int:
    folder = model_folder(args.repository, args.model, args.version)
    config = read_config(folder)
    layer = first_layer(folder / "model.onnx")
    tiles = layer.tiles()
    labels = [str(i) for i in range(len(tiles))]
    classes = config.get("labels") or []
    if layer.output == "logits" and len(classes) == len(tiles):
        labels = list(classes)
    elif config.get("model") == "kirsch" and len(tiles) == len(DIRECTIONS):
        labels = list(DIRECTIONS)
    scale = render.choose_scale(args.scale, tiles)
    shape = "x".join(str(d) for d in layer.units.shape)
    title = f"{args.model} v{folder.name} · first layer: {len(layer.units)} units"
    subtitle = [
        f"{layer.op} weight {layer.weight} ({shape}), each unit's weights as a picture",
        "green: a bright pixel there raises the unit, red: it lowers it",
        render.describe_scale(args.scale, scale),
    ]
    info = {"model": args.model, "version": folder.name, "layer": layer.weight, "op": layer.op}
    info["shape"] = list(layer.units.shape)
    rows = render.grid_rows(render.map_cells(tiles, scale, labels))
    picture = render.sheet(title, rows, subtitle=subtitle, scale=scale, info=info)
    _save(picture, args.output, f"{args.model}-weights.png")
    return 0


def show_kirsch(args: argparse.Namespace) -> int:
    source = load_image(args.image, args.invert, args.idx)
    with connection.from_args(args).open() as channel:
        stub, model = _connect(channel, args, args.model)
        stages = {stage_of(f.name): list(f.shape) for f in model.features}
        edges = stages.get("edges")
        if not edges or edges[0] != len(DIRECTIONS) or "magnitude" not in stages:
            raise ShowError(
                f"{model.name} is not a Kirsch edge model: it needs stages `edges` (8 maps) and "
                f"`magnitude`; it has {', '.join(stages) or 'none'}"
            )
        [answer] = ask(stub, model, [source.pixels], ["edges", "magnitude"], args.timeout)
    maps = np.concatenate([answer.maps["edges"], answer.maps["magnitude"]])
    scale = render.choose_scale(args.scale, maps)
    cells = render.map_cells(maps, scale, [*DIRECTIONS, "magnitude"])
    grid: list[list[render.Cell | None]] = [[None] * 4 for _ in range(3)]
    for cell in cells:
        row, column = ROSE[cell.label]
        grid[row][column] = cell
    grid[1][0] = render.input_cell(source.pixels)
    title = f"{model.name} v{model.version} · Kirsch compass edges"
    subtitle = [
        "each map answers edges whose bright side faces its way; the centre is their maximum",
        render.describe_scale(args.scale, scale),
        _describe(source),
    ]
    info = {"model": model.name, "version": model.version, "layer": "edges+magnitude"}
    info["shape"] = list(maps.shape)
    picture = render.sheet(
        title, [render.Row(r) for r in grid], subtitle=subtitle, scale=scale, info=info
    )
    _save(picture, args.output, f"{source.tag}-{model.name}-compass.png")
    return 0


def show_shift(args: argparse.Namespace) -> int:
    source = load_image(args.image, args.invert, args.idx)
    with connection.from_args(args).open() as channel:
        stub, model = _connect(channel, args, args.model)
        if "," in args.layer or args.layer.strip() == "all":
            raise ShowError(f"--layer takes one stage, got {args.layer!r}")
        [stage] = choose_stages(model, args.layer)
        moved = shift.shift(source.pixels, args.dx, args.dy, args.shift)
        first, second = ask(stub, model, [source.pixels, moved], [stage], args.timeout)
    result = shift.compare(
        first.maps[stage], second.maps[stage], args.dx, args.dy, args.shift, source.pixels.shape
    )
    title = f"{model.name} v{model.version} · {stage} · shift by dx={args.dx}, dy={args.dy}"
    subtitle = [f"shift: {args.shift} ({shift.MODES[args.shift]})", _describe(source)]
    info = {"model": model.name, "version": model.version, "layer": stage, "dx": args.dx}
    info |= {"dy": args.dy, "shift": args.shift, "relative_difference": result.relative}
    picture = shift.picture(
        title,
        subtitle,
        info,
        source.pixels,
        moved,
        result,
        max(1, args.max_channels),
        args.scale,
    )
    name = f"{source.tag}-{model.name}-{stage}-shift-dx{args.dx}-dy{args.dy}.png"
    _save(picture, args.output, name)
    print(f"{model.name} {stage}: relative difference {result.relative:.3g} ({result.note})")
    return 0


MODES = {
    "features": show_features,
    "weights": show_weights,
    "kirsch": show_kirsch,
    "shift": show_shift,
}


def run(args: argparse.Namespace) -> int:
    """Run one mode; anything the user can fix is one line on stderr and exit status 1."""
    try:
        return MODES[args.mode](args)
    except (ShowError, ImageError, WeightsError, connection.ConnectionOptionError) as error:
        print(f"cnnserve show {args.mode}: {error}", file=sys.stderr)
    except grpc.RpcError as error:
        print(f"cnnserve show {args.mode}: {error.code().name}: {error.details()}", file=sys.stderr)
    except OSError as error:
        print(f"cnnserve show {args.mode}: {error}", file=sys.stderr)
    return 1
