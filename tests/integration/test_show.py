"""`cnnserve show` against the session's real server (tiny repository): every mode writes valid
PNGs whose tiles are what the model's shapes, weights and feature maps say they must be.

Each sheet describes its tiles in a PNG text chunk (boxes and labels); the tests read it, then
check the pixels inside the boxes against the service's own numbers, decoded back through the
colour map, so a wrong layout, scale, colour or channel order fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.pictures import render
from service.proto import cnnserve_pb2 as pb
from tests.integration.conftest import RunningServer, start_server

DIRECTIONS = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"]
IDX_NAME = "t10k-images-idx3-ubyte"


def show(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    status = main(["show", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def written(out: str) -> list[Path]:
    return [Path(line) for line in out.splitlines() if line.endswith(".png")]


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def crop(pixels: np.ndarray, tile: dict, height: int, width: int) -> np.ndarray:
    """A tile's pixels, one per value again (the tile is a whole-factor upscale)."""
    x, y, w, h = tile["box"]
    assert w % width == 0 and h % height == 0 and w // width == h // height, tile
    factor = w // width
    return pixels[y : y + h : factor, x : x + w : factor]


def decode(colours: np.ndarray, scale: float) -> np.ndarray:
    """The colour map backwards: green share of +scale, red share of -scale."""
    red, green = colours[..., 0], colours[..., 1]
    positive = green / render.POSITIVE[1]
    negative = -red / render.NEGATIVE[0]
    return np.where(green >= red, positive, negative) * scale


def feature_maps(server: RunningServer, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
    tensor = pb.Tensor(
        shape=[1, 28, 28], dtype=pb.DATA_TYPE_FLOAT32, data=image.astype("<f4").tobytes()
    )
    reply = server.stub.FeatureMaps(
        pb.FeatureMapsRequest(model=model, images=[pb.Image(tensor=tensor)]), timeout=30
    )
    return {
        f.name.removeprefix("features."): np.frombuffer(f.data, "<f4").reshape(f.shape)
        for f in reply.results[0].features
    }


@pytest.fixture(scope="module")
def idx(fmnist) -> Path:
    for name in (IDX_NAME, IDX_NAME + ".gz"):
        if (fmnist.source / name).is_file():
            return fmnist.source / name
    pytest.skip(f"no {IDX_NAME} in {fmnist.source}")


@pytest.fixture(scope="module")
def models(server: RunningServer) -> dict[str, pb.ModelInfo]:
    reply = server.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    return {m.name: m for m in reply.models}


def image_of(fmnist, index: int) -> np.ndarray:
    return fmnist.test_images[index].astype(np.float32) / 255


# features ------------------------------------------------------------------------------------


def test_features_draws_every_stage_of_every_model_as_its_shape_says(
    server: RunningServer, models: dict, idx: Path, tmp_path: Path, capsys
) -> None:
    with_features = [m for m in models.values() if m.features]
    assert {"mlp", "lenet5", "kirsch"} <= {m.name for m in with_features}
    for model in with_features:
        out = tmp_path / model.name
        status, stdout, stderr = show(
            capsys, "features", "fmnist:0", "--model", model.name, "--idx", idx,
            "--server", server.address, "--output", out, "--max-channels", 64,
        )  # fmt: skip
        assert status == 0, stderr
        paths = written(stdout)
        assert [p.name for p in paths] == ["fmnist-00000-input.png"] + [
            f"fmnist-00000-{model.name}-{f.name.removeprefix('features.')}.png"
            for f in model.features
        ]
        for spec, path in zip(model.features, paths[1:], strict=True):
            pixels = rgb(path)
            info = render.read_info(path)
            shape = list(spec.shape)
            assert info["model"] == model.name and info["shape"] == shape
            tiles = info["tiles"]
            spatial = len(shape) == 3 and shape[1] * shape[2] > 1
            if spatial:
                assert len(tiles) == min(shape[0], 64), (model.name, spec.name)
                assert [t["label"] for t in tiles] == [str(i) for i in range(len(tiles))]
                for tile in tiles:
                    crop(pixels, tile, shape[1], shape[2])  # whole-factor squares
            else:
                assert len(tiles) == int(np.prod(shape)), (model.name, spec.name)
            for tile in tiles:
                x, y, w, h = tile["box"]
                assert 0 <= x and x + w <= pixels.shape[1] and y + h <= pixels.shape[0]


def test_feature_tiles_hold_the_services_maps_in_the_right_colours(
    server: RunningServer, fmnist, idx: Path, tmp_path: Path, capsys
) -> None:
    status, stdout, _ = show(
        capsys, "features", "fmnist:7", "--model", "lenet5", "--layers", "c1,features.c3",
        "--idx", idx, "--server", server.address, "--output", tmp_path,
    )  # fmt: skip
    assert status == 0
    paths = written(stdout)
    assert [p.name for p in paths] == [
        "fmnist-00007-input.png",
        "fmnist-00007-lenet5-c1.png",
        "fmnist-00007-lenet5-c3.png",
    ]
    maps = feature_maps(server, "lenet5", image_of(fmnist, 7))
    for stage, path in zip(["c1", "c3"], paths[1:], strict=True):
        info = render.read_info(path)
        expected = maps[stage]
        assert info["scale"] == pytest.approx(float(np.abs(expected).max()), rel=1e-6)
        pixels = rgb(path)
        for channel, tile in zip(expected, info["tiles"], strict=True):
            colours = crop(pixels, tile, *expected.shape[1:])
            assert (colours == render.colorize(channel, info["scale"])).all()
            assert np.allclose(decode(colours, info["scale"]), channel, atol=info["scale"] / 200)
    # The input picture is the image itself, in grey.
    info = render.read_info(paths[0])
    [box] = info["inputs"]
    grey = crop(rgb(paths[0]), box, 28, 28)
    assert (grey[..., 0] == fmnist.test_images[7]).all()


def test_an_image_file_is_preprocessed_like_the_service_does(
    server: RunningServer, fmnist, tmp_path: Path, capsys
) -> None:
    dark_on_light = Image.fromarray(255 - fmnist.test_images[3])  # inverted back by auto
    dark_on_light.save(tmp_path / "my boot.png")  # 28 x 28: not resampled
    status, stdout, stderr = show(
        capsys, "features", tmp_path / "my boot.png", "--model", "kirsch",
        "--layers", "magnitude", "--server", server.address, "--output", tmp_path / "out",
    )  # fmt: skip
    assert status == 0, stderr
    input_path, magnitude_path = written(stdout)
    assert magnitude_path.name == "my-boot-kirsch-magnitude.png"
    [box] = render.read_info(input_path)["inputs"]
    grey = crop(rgb(input_path), box, 28, 28)[..., 0]
    assert (grey == fmnist.test_images[3]).all()


def test_a_vector_stage_is_a_bar_per_unit(
    server: RunningServer, idx: Path, tmp_path: Path, capsys
) -> None:
    status, stdout, _ = show(
        capsys, "features", "fmnist:0", "--model", "mlp", "--idx", idx,
        "--server", server.address, "--output", tmp_path,
    )  # fmt: skip
    assert status == 0
    info = render.read_info(written(stdout)[1])
    assert info["layer"] == "hidden" and len(info["tiles"]) == 256
    assert [t["label"] for t in info["tiles"][:3]] == ["0", "1", "2"]


# weights -------------------------------------------------------------------------------------


def newest(repository: Path, name: str) -> Path:
    return max((repository / name).iterdir(), key=lambda p: int(p.name))


def test_logreg_weights_are_ten_class_pictures_of_the_initializer(
    tiny_repository: Path, tmp_path: Path, capsys
) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    status, stdout, stderr = show(
        capsys, "weights", "--model", "logreg", "--repository", tiny_repository,
        "--output", tmp_path,
    )  # fmt: skip
    assert status == 0, stderr
    [path] = written(stdout)
    assert path.name == "logreg-weights.png"
    graph = onnx.load(str(newest(tiny_repository, "logreg") / "model.onnx")).graph
    [weight] = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("weight")]
    assert weight.shape == (10, 784)  # Gemm with transB=1: a row per class
    info = render.read_info(path)
    config = json.loads((newest(tiny_repository, "logreg") / "model.json").read_text())
    assert [t["label"] for t in info["tiles"]] == config["labels"]
    scale = info["scale"]
    assert scale == pytest.approx(float(np.abs(weight).max()), rel=1e-6)
    pixels = rgb(path)
    for row, tile in zip(weight, info["tiles"], strict=True):
        normalised = decode(crop(pixels, tile, 28, 28), 1.0)
        assert np.allclose(normalised, row.reshape(28, 28) / scale, atol=0.003)


@pytest.mark.parametrize(
    ("model", "count", "size", "labels"),
    [
        ("mlp", 256, 28, None),
        ("lenet5", 6, 5, None),
        ("kirsch", 8, 3, DIRECTIONS),
    ],
)
def test_first_layer_weights_of_dense_and_conv_models(
    tiny_repository: Path, tmp_path: Path, capsys, model: str, count: int, size: int, labels
) -> None:
    status, stdout, stderr = show(
        capsys, "weights", "--model", model, "--repository", tiny_repository, "--output", tmp_path
    )
    assert status == 0, stderr
    [path] = written(stdout)
    info = render.read_info(path)
    assert len(info["tiles"]) == count
    assert [t["label"] for t in info["tiles"]] == (labels or [str(i) for i in range(count)])
    pixels = rgb(path)
    tiles = [decode(crop(pixels, t, size, size), info["scale"]) for t in info["tiles"]]
    if model == "kirsch":  # the fixed kernels: north has its 5s on top, -3 elsewhere on the ring
        north = tiles[0]
        assert np.allclose(north[0], 5, atol=0.05) and np.allclose(north[2], -3, atol=0.05)
        assert abs(north[1, 1]) < 0.05


def test_weights_of_every_model_in_the_repository(tiny_repository: Path, tmp_path: Path, capsys):
    for folder in sorted(p for p in tiny_repository.iterdir() if p.is_dir() and p.name[0] != "."):
        status, stdout, stderr = show(
            capsys, "weights", "--model", folder.name, "--repository", tiny_repository,
            "--output", tmp_path,
        )  # fmt: skip
        assert status == 0, f"{folder.name}: {stderr}"
        info = render.read_info(written(stdout)[0])
        assert info["tiles"] and info["op"] in ("Gemm", "MatMul", "Conv"), folder.name


# kirsch --------------------------------------------------------------------------------------


def test_kirsch_draws_eight_labelled_directions_and_the_magnitude(
    server: RunningServer, fmnist, idx: Path, tmp_path: Path, capsys
) -> None:
    status, stdout, stderr = show(
        capsys, "kirsch", "fmnist:0", "--idx", idx, "--server", server.address,
        "--output", tmp_path,
    )  # fmt: skip
    assert status == 0, stderr
    [path] = written(stdout)
    assert path.name == "fmnist-00000-kirsch-compass.png"
    info = render.read_info(path)
    labels = [t["label"] for t in info["tiles"]]
    assert sorted(labels) == sorted([*DIRECTIONS, "magnitude"])
    assert len(info["inputs"]) == 1
    maps = feature_maps(server, "kirsch", image_of(fmnist, 0))
    pixels = rgb(path)
    by_label = {t["label"]: t for t in info["tiles"]}
    for channel, direction in enumerate(DIRECTIONS):
        colours = crop(pixels, by_label[direction], 28, 28)
        assert (colours == render.colorize(maps["edges"][channel], info["scale"])).all()
    magnitude = crop(pixels, by_label["magnitude"], 28, 28)
    assert (magnitude == render.colorize(maps["magnitude"][0], info["scale"])).all()
    # Compass layout: north above the magnitude, south below, east to its right.
    centre = by_label["magnitude"]["box"]
    assert by_label["N"]["box"][0] == centre[0] and by_label["N"]["box"][1] < centre[1]
    assert by_label["S"]["box"][1] > centre[1] and by_label["E"]["box"][0] > centre[0]


# shift ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrap_server(tmp_path_factory: pytest.TempPathFactory, fmnist) -> Iterator[RunningServer]:
    """kirsch with wrap padding beside the plain one: exactly shift equivariant under a roll."""
    pytest.importorskip("torch")
    from export.pipeline import ExportRequest, export_model

    root = tmp_path_factory.mktemp("wrap-models")
    for request in (
        ExportRequest("kirsch", name="kirsch-wrap", options={"padding": "wrap"}, progress=False),
        ExportRequest("kirsch", progress=False),
    ):
        export_model(request, fmnist, root)
    running = start_server(root)
    yield running
    running.stop()


def relative_difference(stdout: str) -> float:
    match = re.search(r"relative difference ([0-9.]+(?:e[-+]?\d+)?|inf)", stdout)
    assert match, stdout
    return float(match[1])


def test_shift_is_exactly_equivariant_for_wrap_padding_and_a_roll(
    wrap_server: RunningServer, idx: Path, tmp_path: Path, capsys
) -> None:
    differences = {}
    for model in ("kirsch-wrap", "kirsch"):
        status, stdout, stderr = show(
            capsys, "shift", "fmnist:0", "--model", model, "--layer", "edges", "--dx", 3,
            "--dy", -2, "--idx", idx, "--server", wrap_server.address, "--output", tmp_path,
        )  # fmt: skip
        assert status == 0, stderr
        differences[model] = relative_difference(stdout)
        [path] = written(stdout)
        assert path.name == f"fmnist-00000-{model}-edges-shift-dx3-dy-2.png"
        info = render.read_info(path)
        assert len(info["tiles"]) == 3 * 8 and len(info["inputs"]) == 2
        assert info["relative_difference"] == pytest.approx(differences[model], rel=2e-3, abs=1e-9)
    assert differences["kirsch-wrap"] < 1e-5
    # Image 0 (an ankle boot) touches the border: zero padding breaks the equivariance there.
    assert differences["kirsch"] > 0.01


def test_shift_of_pooled_and_vector_stages(
    server: RunningServer, models: dict, idx: Path, tmp_path: Path, capsys
) -> None:
    stages = {f.name.removeprefix("features."): list(f.shape) for f in models["lenet5"].features}
    status, stdout, _ = show(
        capsys, "shift", "fmnist:1", "--model", "lenet5", "--layer", "s2", "--shift", "pad",
        "--idx", idx, "--server", server.address, "--output", tmp_path,
    )  # fmt: skip
    assert status == 0
    assert "dx=1.5" in stdout  # 3 input pixels are 1.5 pixels after 2x2 pooling
    info = render.read_info(written(stdout)[0])
    assert len(info["tiles"]) == 3 * stages["s2"][0] and info["shift"] == "pad"

    status, stdout, _ = show(
        capsys, "shift", "fmnist:1", "--model", "lenet5", "--layer", "c5", "--idx", idx,
        "--server", server.address, "--output", tmp_path,
    )  # fmt: skip
    assert status == 0 and "invariance" in stdout
    info = render.read_info(written(stdout)[0])
    assert len(info["tiles"]) == 3 * stages["c5"][0]
    assert relative_difference(stdout) >= 0


# errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["features", "fmnist:0", "--model", "lenet5", "--layers", "c1,conv9"],
         "unknown layer 'conv9' for lenet5; valid: c1, s2, c3, s4, c5, f6"),
        (["shift", "fmnist:0", "--model", "lenet5", "--layer", "pool1"],
         "unknown layer 'pool1' for lenet5; valid: c1, s2, c3, s4, c5, f6"),
        (["shift", "fmnist:0", "--model", "lenet5", "--layer", "c1,s2"], "one stage"),
        (["features", "fmnist:0", "--model", "resnet9000"], "NOT_FOUND: model 'resnet9000'"),
        (["features", "fmnist:0", "--model", "logreg"], "logreg has no feature stages"),
        (["kirsch", "fmnist:0", "--model", "lenet5"], "lenet5 is not a Kirsch edge model"),
        (["features", "missing.png", "--model", "lenet5"],
         "bad IMAGE 'missing.png': No such file or directory"),
        (["features", "README.md", "--model", "lenet5"],
         "bad IMAGE 'README.md': not a PNG, JPEG, WebP, BMP or GIF image"),
        (["features", "fmnist:boot", "--model", "lenet5"], "fmnist:N takes a test image number"),
        (["features", "fmnist:10000", "--model", "lenet5"], "holds images 0 to 9999"),
    ],
)  # fmt: skip
def test_errors_are_one_clear_line(
    server: RunningServer, idx: Path, tmp_path: Path, capsys, args: list[str], expected: str
) -> None:
    extra = ["--server", server.address, "--output", tmp_path]
    if args[1].startswith("fmnist:"):
        extra += ["--idx", idx]
    status, stdout, stderr = show(capsys, *args, *extra)
    assert status == 1 and not stdout
    assert expected in stderr
    assert stderr.startswith(f"cnnserve show {args[0]}: ") and stderr.count("\n") == 1


def test_weights_errors_are_one_clear_line(tiny_repository: Path, tmp_path: Path, capsys):
    status, _, stderr = show(capsys, "weights", "--model", "nope", "--repository", tiny_repository)
    assert status == 1 and "model 'nope' not found" in stderr and "available: " in stderr
    assert "lenet5" in stderr and stderr.count("\n") == 1
    status, _, stderr = show(
        capsys, "weights", "--model", "lenet5", "--repository", tmp_path / "none"
    )
    assert status == 1 and "does not exist" in stderr
