"""`cnnserve show`'s drawing and measuring, without a server: the diverging colours, sheets and
their PNG descriptions, the shift comparison, and first-layer weights read from ONNX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.pictures import render, shift
from service.pictures.onnxfile import read_graph
from service.pictures.weights import WeightsError, first_layer

# Colours -------------------------------------------------------------------------------------


def test_positive_is_green_negative_is_red_zero_is_black() -> None:
    values = np.array([[1.0, -1.0, 0.0, 0.25, -0.25]])
    rgb = render.colorize(values, scale=1.0).astype(int)[0]
    positive, negative, zero, small_positive, small_negative = rgb
    assert positive[1] > 2 * max(positive[0], positive[2])  # green dominates
    assert negative[0] > 2 * max(negative[1], negative[2])  # red dominates
    assert tuple(zero) == (0, 0, 0)  # neutral
    assert small_positive[1] > small_positive[0] and small_negative[0] > small_negative[1]
    # Linear in |value|: a quarter of the scale is a quarter of the full colour.
    assert small_positive[1] == pytest.approx(positive[1] / 4, abs=1)
    assert small_negative[0] == pytest.approx(negative[0] / 4, abs=1)


def test_the_scale_is_symmetric_and_saturates() -> None:
    values = np.array([-3.0, -2.0, 2.0, 3.0])
    assert render.symmetric_scale(values, np.array([1.0])) == 3.0
    rgb = render.colorize(values, scale=2.0)
    assert (rgb[0] == rgb[1]).all() and (rgb[2] == rgb[3]).all()  # beyond the scale: saturated
    assert tuple(rgb[3]) == tuple(render.POSITIVE.astype(int))
    assert tuple(rgb[0]) == tuple(render.NEGATIVE.astype(int))


def test_an_all_zero_layer_or_nan_draws_black() -> None:
    assert not render.colorize(np.zeros((3, 3)), render.symmetric_scale(np.zeros((3, 3)))).any()
    assert not render.colorize(np.array([np.nan]), 1.0).any()


@pytest.mark.parametrize(
    ("text", "expected"), [("max", "max"), ("p99", "p99"), ("P99.5", "p99.5"), ("0.5", 0.5)]
)
def test_scale_specs(text: str, expected: str | float) -> None:
    assert render.parse_scale(text) == expected


@pytest.mark.parametrize("text", ["-1", "0", "p0", "p101", "big", "nan", "inf"])
def test_bad_scale_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="scale must be"):
        render.parse_scale(text)


def test_choose_scale() -> None:
    values = np.arange(-100, 101, dtype=float)
    assert render.choose_scale("max", values) == 100
    assert render.choose_scale("p50", values) == pytest.approx(50)
    assert render.choose_scale(7.0, values) == 7.0


def test_zoom_keeps_every_value_a_square() -> None:
    tile = np.arange(6, dtype=np.uint8).reshape(2, 3)
    big = render.zoom(tile, 4)
    assert big.shape == (8, 12)
    assert (big[::4, ::4] == tile).all() and (big[3::4, 3::4] == tile).all()
    assert render.zoom_for(28, 28, 6) == 4 and render.zoom_for(5, 5, 6) == 22
    assert render.zoom_for(28, 28, 256) == 2


# Sheets --------------------------------------------------------------------------------------


def test_a_sheet_lists_its_tiles_and_draws_them_where_it_says(tmp_path: Path) -> None:
    maps = np.random.default_rng(0).normal(size=(5, 7, 7))
    scale = render.symmetric_scale(maps)
    cells = render.map_cells(maps, scale, [f"map {i}" for i in range(5)])
    picture = render.sheet(
        "title",
        render.grid_rows(cells),
        subtitle=["a subtitle"],
        scale=scale,
        thumbnail=np.full((28, 28), 0.5),
        info={"layer": "test"},
    )
    path = tmp_path / "sheet.png"
    picture.save(path)
    info = render.read_info(path)
    assert info["layer"] == "test" and info["scale"] == scale
    assert [t["label"] for t in info["tiles"]] == [f"map {i}" for i in range(5)]
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    for tile, channel in zip(info["tiles"], maps, strict=True):
        x, y, w, h = tile["box"]
        factor = w // 7
        assert (w, h) == (7 * factor, 7 * factor)
        crop = pixels[y : y + h, x : x + w]
        assert (crop[::factor, ::factor] == render.colorize(channel, scale)).all()


def test_the_colour_key_runs_red_black_green() -> None:
    key = np.asarray(render.colour_key(2.0)).astype(int)
    row = key[render.KEY_HEIGHT // 2, 20 : 20 + render.KEY_WIDTH]
    assert row[2, 0] > row[2, 1]  # left: red
    assert row[-3, 1] > row[-3, 0]  # right: green
    assert row[render.KEY_WIDTH // 2].sum() < 30  # middle: black


def test_bar_chart_has_a_slot_per_unit_and_bars_go_both_ways() -> None:
    values = np.array([0.0, 1.0, -1.0] + [0.0] * 97)
    cell = render.bar_chart(values, 1.0)
    assert len(cell.parts) == 100 and cell.parts[1][4] == "1"
    rgb = cell.rgb.astype(int)
    up, down = cell.parts[1], cell.parts[2]
    x, y, w, h, _ = up
    above = rgb[y : y + h // 2, x + w // 2]
    below = rgb[y + h // 2 + 1 : y + h, down[0] + w // 2]
    assert (above[:, 1] > above[:, 0] + 100).sum() > h // 3  # a green bar above the line
    assert (below[:, 0] > below[:, 1] + 100).sum() > h // 3  # a red bar below it


# Shift ---------------------------------------------------------------------------------------


def _circular_edges(image: np.ndarray) -> np.ndarray:
    """A fixed 3x3 correlation with wrap padding: exactly shift equivariant."""
    kernel = np.array([[5.0, 5.0, 5.0], [-3.0, 0.0, -3.0], [-3.0, -3.0, -3.0]])
    out = np.zeros_like(image)
    for i in range(3):
        for j in range(3):
            out += kernel[i, j] * np.roll(image, (1 - i, 1 - j), axis=(0, 1))
    return out[None]


def test_roll_shift_of_a_wrap_convolution_differs_by_nothing() -> None:
    image = np.random.default_rng(1).random((28, 28))
    moved = shift.shift(image, 3, -2, "roll")
    assert moved[5, 3] == image[7, 0]
    result = shift.compare(_circular_edges(image), _circular_edges(moved), 3, -2, "roll")
    assert result.relative < 1e-12


def test_pad_shift_fills_with_the_dark_ground_and_leaves_the_lost_band_out() -> None:
    image = np.random.default_rng(2).random((28, 28))
    moved = shift.shift(image, 2, 1, "pad")
    assert (moved[:1] == 0).all() and (moved[:, :2] == 0).all()
    assert (moved[1:, 2:] == image[:-1, :-2]).all()
    maps = image[None]  # an identity "layer": equivariant wherever data survives
    result = shift.compare(maps, moved[None], 2, 1, "pad")
    assert result.relative == 0.0


def test_pooled_layers_shift_by_a_fraction_and_vectors_not_at_all() -> None:
    assert [shift.stride_of(s, 28) for s in (28, 14, 10, 7, 5, 4, 3)] == [1, 2, 2, 4, 4, 8, 8]
    pooled = shift.compare(np.ones((2, 14, 14)), np.ones((2, 14, 14)), 3, 0, "roll")
    assert "dx=1.5" in pooled.note and pooled.relative == 0.0
    vector = shift.compare(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 3, 0, "roll")
    assert "invariance" in vector.note and vector.relative == pytest.approx(np.sqrt(2))


# First-layer weights from ONNX files ----------------------------------------------------------


def _save(tmp_path: Path, nodes: list, initializers: list, name: str = "model.onnx") -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializers,
    )
    path = tmp_path / name
    onnx.save(helper.make_model(graph), str(path))
    return path


def _normalise_and_flatten() -> list:
    from onnx import helper

    mean = helper.make_tensor("mean", 1, [], [0.25])
    return [
        helper.make_node("Constant", [], ["m"], value=mean),
        helper.make_node("Sub", ["image", "m"], ["centred"]),
        helper.make_node("Flatten", ["centred"], ["flat"], axis=1),
    ]


@pytest.mark.parametrize("layout", ["gemm-transB", "gemm", "matmul", "constant"])
def test_dense_first_layer_in_every_layout(tmp_path: Path, layout: str) -> None:
    from onnx import helper, numpy_helper

    units = np.random.default_rng(3).normal(size=(4, 784)).astype(np.float32)
    stored = units if layout in ("gemm-transB", "constant") else units.T.copy()
    weight = numpy_helper.from_array(stored, "w")
    nodes = _normalise_and_flatten()
    initializers = [weight]
    if layout == "matmul":
        nodes.append(helper.make_node("MatMul", ["flat", "w"], ["out"]))
    elif layout == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=weight))
        nodes.append(helper.make_node("Gemm", ["flat", "w"], ["out"], transB=1))
        initializers = []
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "w"], ["out"], transB=int(layout != "gemm")))
    layer = first_layer(_save(tmp_path, nodes, initializers))
    assert layer.units.shape == (4, 784)
    assert np.array_equal(layer.units, units)
    assert np.array_equal(layer.tiles(), units.reshape(4, 28, 28))


def test_conv_first_layer_skips_the_ops_before_it_and_later_layers(tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    first = np.arange(6 * 25, dtype=np.float32).reshape(6, 1, 5, 5)
    later = np.ones((3, 6, 3, 3), np.float32)
    nodes = [
        helper.make_node("Conv", ["other", "late"], ["unrelated"]),  # not fed by the image
        helper.make_node("Pad", ["image", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "first"], ["c1"]),
        helper.make_node("Conv", ["c1", "late"], ["out"]),
    ]
    pads = numpy_helper.from_array(np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64), "pads")
    initializers = [
        numpy_helper.from_array(first, "first"),
        numpy_helper.from_array(later, "late"),
        pads,
    ]
    layer = first_layer(_save(tmp_path, nodes, initializers))
    assert layer.op == "Conv" and layer.weight == "first"
    assert np.array_equal(layer.tiles(), first.reshape(6, 5, 5))


def test_float_data_float16_and_external_data_are_read(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    listed = helper.make_tensor("listed", TensorProto.FLOAT, [3, 4], values.ravel().tolist())
    half = numpy_helper.from_array(values.astype(np.float16), "half")
    half_listed = helper.make_tensor(
        "half_listed", TensorProto.FLOAT16, [3, 4], values.astype(np.float16).ravel()
    )
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "big")
    nodes = [helper.make_node("Identity", ["image"], ["out"])]
    path = _save(tmp_path, nodes, [listed, half, half_listed, big])
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin",
              size_threshold=1024)  # fmt: skip
    graph = read_graph(path)
    tensors = graph.initializers
    assert tensors["big"].external["location"] == "weights.bin"
    assert np.array_equal(tensors["big"].array(path.parent), np.arange(4096).reshape(64, 64))
    assert np.array_equal(tensors["listed"].array(), values)
    assert np.allclose(tensors["half"].array(), values, atol=1e-3)
    assert np.allclose(tensors["half_listed"].array(), values, atol=1e-3)
    assert graph.inputs == [("image", [0, 1, 28, 28])]


def test_a_file_that_is_not_onnx_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="not a readable ONNX model"):
        first_layer(path)
    with pytest.raises(WeightsError, match="No such file"):
        first_layer(tmp_path / "missing.onnx")
