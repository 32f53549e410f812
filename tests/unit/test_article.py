"""The article's claims about convolution, checked on the exported graphs in ONNX Runtime.

Shift equivariance (exact with wrap padding and stride 1), 'same' padding keeps 28x28, stride 2
halves it, and 2x2 max pooling halves a map and tolerates a 1-pixel shift better than no
pooling. These are what `cnnserve show` lets users see; here they are properties that must hold.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from export import convert  # noqa: E402
from export.models.kirsch import DIRECTIONS, PADDING_MODES, kirsch_kernels  # noqa: E402
from export.registry import create_model  # noqa: E402
from export.train import to_pixels  # noqa: E402

OUTPUTS = ["features.edges", "features.magnitude"]


def _session(name: str, **options) -> ort.InferenceSession:
    proto = convert.to_onnx(create_model(name, **options))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _images(fmnist, n: int = 8) -> np.ndarray:
    return to_pixels(torch.tensor(fmnist.test_images[:n])).numpy()


def test_kirsch_kernels_are_the_compass_rotations() -> None:
    k = kirsch_kernels()[:, 0].numpy()
    assert k.shape == (8, 3, 3) and len(DIRECTIONS) == 8
    np.testing.assert_array_equal(k[0], [[5, 5, 5], [-3, 0, -3], [-3, -3, -3]])  # N
    np.testing.assert_array_equal(k[2], [[-3, -3, 5], [-3, 0, 5], [-3, -3, 5]])  # E
    for kernel in k:
        assert kernel.sum() == 0  # no response on a flat region
        assert sorted(kernel.ravel().tolist()).count(5) == 3


@pytest.mark.parametrize("shift", [(1, 0), (0, 3), (-2, 5), (7, -4)])
def test_wrap_padding_makes_convolution_exactly_shift_equivariant(fmnist, shift) -> None:
    session = _session("kirsch", padding="wrap", stride=1)
    x = _images(fmnist)
    shifted = np.roll(x, shift, axis=(2, 3))
    for original, moved in zip(
        session.run(OUTPUTS, {"image": x}), session.run(OUTPUTS, {"image": shifted}), strict=True
    ):
        np.testing.assert_array_equal(np.roll(original, shift, axis=(2, 3)), moved)


@pytest.mark.parametrize("padding", [p for p in PADDING_MODES if p != "wrap"])
def test_other_paddings_are_equivariant_away_from_the_border(fmnist, padding: str) -> None:
    session = _session("kirsch", padding=padding)
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[:, :, 6:22, 6:22] = _images(fmnist, 4)[:, :, 6:22, 6:22]  # dark border, as in the data
    shifted = np.roll(x, (2, 1), axis=(2, 3))
    original, moved = (session.run(["features.edges"], {"image": v})[0] for v in (x, shifted))
    np.testing.assert_allclose(
        np.roll(original, (2, 1), axis=(2, 3))[..., 3:-3, 3:-3], moved[..., 3:-3, 3:-3], atol=1e-5
    )


@pytest.mark.parametrize("padding", list(PADDING_MODES))
def test_same_padding_keeps_28x28_and_stride_2_halves_it(fmnist, padding: str) -> None:
    x = _images(fmnist, 2)
    full = _session("kirsch", padding=padding, stride=1).run(OUTPUTS, {"image": x})
    half = _session("kirsch", padding=padding, stride=2).run(OUTPUTS, {"image": x})
    assert [o.shape for o in full] == [(2, 8, 28, 28), (2, 1, 28, 28)]
    assert [o.shape for o in half] == [(2, 8, 14, 14), (2, 1, 14, 14)]
    # Stride 2 computes every other position of the stride-1 map, nothing else.
    np.testing.assert_allclose(half[0], full[0][..., ::2, ::2], atol=1e-5)


def test_padding_modes_differ_only_at_the_border(fmnist) -> None:
    x = _images(fmnist, 2) + 0.1  # a non-zero border makes the modes disagree
    maps = {
        p: _session("kirsch", padding=p).run(["features.edges"], {"image": x})[0]
        for p in PADDING_MODES
    }
    for p in PADDING_MODES:
        np.testing.assert_allclose(
            maps[p][..., 1:-1, 1:-1], maps["constant"][..., 1:-1, 1:-1], atol=1e-5
        )
        if p != "constant":
            assert not np.allclose(maps[p], maps["constant"])


def _relative_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_max_pooling_halves_and_tolerates_a_one_pixel_shift(fmnist) -> None:
    x = _images(fmnist, 64)
    shifted = np.roll(x, 1, axis=3)
    edges = _session("kirsch", padding="constant")
    pool = torch.nn.MaxPool2d(2)

    def features(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        relu = np.maximum(edges.run(["features.edges"], {"image": v})[0], 0)
        return relu, pool(torch.from_numpy(relu)).numpy()

    (conv, pooled), (conv_s, pooled_s) = features(x), features(shifted)
    assert pooled.shape == (64, 8, 14, 14)
    assert _relative_change(pooled, pooled_s) < 0.8 * _relative_change(conv, conv_s)


def test_the_cnn_pool_stage_is_more_shift_tolerant_than_its_conv_stage(fmnist) -> None:
    torch.manual_seed(0)
    session = _session("cnn")
    x = _images(fmnist, 64)
    names = ["features.conv1", "features.pool1"]
    conv, pooled = session.run(names, {"image": x})
    conv_s, pooled_s = session.run(names, {"image": np.roll(x, 1, axis=3)})
    assert pooled.shape[-2:] == (14, 14) and conv.shape[-2:] == (28, 28)
    assert _relative_change(pooled, pooled_s) < _relative_change(conv, conv_s)
