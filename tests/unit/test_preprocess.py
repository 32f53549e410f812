"""Preprocessing: real Fashion-MNIST images survive every accepted encoding, bad input is refused.

Pass-through is checked bit for bit against value / 255 (what training feeds the model), on
real test images; the synthetic images below are shaped so each test fails if its step breaks.
"""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from service.preprocess import (
    InvalidImage,
    Invert,
    Limits,
    from_encoded,
    from_pixel_batch,
    from_pixels,
    from_tensor,
    stack,
)


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    from export.data import DatasetNotFoundError, load_fashion_mnist

    try:
        return load_fashion_mnist(download=False).test_images
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def samples(test_images: np.ndarray) -> list[np.ndarray]:
    """A dozen spread-out images plus the one with the brightest border (AUTO's hardest case)."""
    t = test_images.astype(np.int64)
    rim = t[:, 0].sum(1) + t[:, -1].sum(1) + t[:, 1:-1, 0].sum(1) + t[:, 1:-1, -1].sum(1)
    picks = [*range(0, len(test_images), len(test_images) // 12), int(rim.argmax())]
    return [test_images[i] for i in picks]


def expected(pixels: np.ndarray) -> np.ndarray:
    """What training feeds the model for uint8 pixels (float32 division by 255)."""
    return (pixels.astype(np.float32) / np.float32(255.0)).reshape(1, 28, 28)


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature, IHDR (8-bit grayscale) and IEND: a size, and no pixels at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def block(width: int, height: int, value: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A uint8 image of 0 with `value` in box (left, top, right, bottom)."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = value
    return pixels


# --- pass-through of real Fashion-MNIST images ---------------------------------------------


def test_every_test_image_passes_through_raw_pixels_with_auto(test_images: np.ndarray) -> None:
    """All 10000: AUTO must never invert a real Fashion-MNIST image, nor change one pixel."""
    for pixels in test_images:
        out = from_pixels(28, 28, pixels.tobytes())
        assert out.dtype == np.float32 and out.shape == (1, 28, 28)
        np.testing.assert_array_equal(out, expected(pixels))


@pytest.mark.parametrize(
    "fmt, options, mode",
    [
        ("PNG", {}, "L"),
        ("BMP", {}, "L"),
        ("WEBP", {"lossless": True}, "L"),
        ("GIF", {}, "L"),  # a grayscale palette
        ("PNG", {}, "RGB"),
        ("PNG", {}, "RGBA"),  # fully opaque alpha is no transparency
        ("WEBP", {"lossless": True}, "RGB"),
    ],
)
def test_lossless_formats_round_trip_exactly(
    samples: list[np.ndarray], fmt: str, options: dict[str, object], mode: str
) -> None:
    for pixels in samples:
        data = encode(Image.fromarray(pixels).convert(mode), fmt, **options)
        np.testing.assert_array_equal(from_encoded(data), expected(pixels))


def test_16_bit_png_is_scaled_not_clipped(samples: list[np.ndarray]) -> None:
    for pixels in samples:
        data = encode(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG")
        np.testing.assert_array_equal(from_encoded(data), expected(pixels))


def test_jpeg_round_trips_within_tolerance(samples: list[np.ndarray]) -> None:
    for pixels in samples:
        out = from_encoded(encode(Image.fromarray(pixels), "JPEG", quality=95))
        error = np.abs(out - expected(pixels))
        assert error.mean() < 0.01 and error.max() < 0.08


def test_colour_jpeg_decodes_to_luma(samples: list[np.ndarray]) -> None:
    for pixels in samples:
        rgb = np.stack([pixels, pixels, pixels], axis=-1)
        out = from_encoded(encode(Image.fromarray(rgb), "JPEG", quality=95))
        assert np.abs(out - expected(pixels)).mean() < 0.01


# --- inversion -------------------------------------------------------------------------------


def test_auto_inverts_a_dark_item_on_a_light_ground(samples: list[np.ndarray]) -> None:
    for pixels in samples:
        negative = 255 - pixels
        png = encode(Image.fromarray(negative), "PNG")
        np.testing.assert_array_equal(from_encoded(png), expected(pixels))
        np.testing.assert_array_equal(from_pixels(28, 28, negative.tobytes()), expected(pixels))
        jpeg = from_encoded(encode(Image.fromarray(negative), "JPEG", quality=95))
        assert np.abs(jpeg - expected(pixels)).mean() < 0.01


def test_yes_and_no_force_the_inversion(samples: list[np.ndarray]) -> None:
    pixels = samples[0]
    negative = 255 - pixels
    np.testing.assert_array_equal(
        from_pixels(28, 28, pixels.tobytes(), Invert.YES), expected(negative)
    )
    np.testing.assert_array_equal(
        from_pixels(28, 28, negative.tobytes(), Invert.NO), expected(negative)
    )
    png = encode(Image.fromarray(pixels), "PNG")
    np.testing.assert_array_equal(from_encoded(png, Invert.YES), expected(negative))
    np.testing.assert_array_equal(from_encoded(png, Invert.NO), expected(pixels))


@pytest.mark.parametrize("rim, inverted", [(127, False), (128, True), (255, True), (0, False)])
def test_auto_threshold_is_a_border_mean_above_127_5(rim: int, inverted: bool) -> None:
    pixels = np.full((28, 28), rim, dtype=np.uint8)
    pixels[1:-1, 1:-1] = 40  # the centre does not take part in the rule
    out = from_pixels(28, 28, pixels.tobytes())
    np.testing.assert_array_equal(out, expected(255 - pixels if inverted else pixels))


@pytest.mark.parametrize("invert", list(Invert))
def test_the_batch_path_equals_image_by_image(test_images: np.ndarray, invert: Invert) -> None:
    """Real images, their negatives and rims on both sides of the AUTO threshold, bit for bit."""
    rng = np.random.default_rng(0)
    real = test_images[rng.choice(len(test_images), 64, replace=False)]
    rims = []
    for rim in (127, 128, 0, 255):
        image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        image[[0, -1], :] = rim
        image[:, [0, -1]] = rim
        rims.append(image)
    batch = np.concatenate([real, 255 - real[:16], np.stack(rims)])
    data = [image.tobytes() for image in batch]
    expected_batch = np.stack([from_pixels(28, 28, d, invert) for d in data])
    got = from_pixel_batch(data, invert)
    assert got.dtype == np.float32 and got.shape == (len(batch), 1, 28, 28)
    np.testing.assert_array_equal(got, expected_batch)


# --- fitting into 28 x 28 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, content",
    [(56, 28, (0, 7, 28, 21)), (28, 56, (7, 0, 21, 28)), (14, 14, (0, 0, 28, 28))],
)
def test_fit_keeps_aspect_and_centres_on_a_dark_ground(
    width: int, height: int, content: tuple[int, int, int, int]
) -> None:
    pixels = np.full((height, width), 200, dtype=np.uint8)
    out = from_encoded(encode(Image.fromarray(pixels), "PNG"), Invert.NO)
    np.testing.assert_array_equal(out[0], block(28, 28, 200, content) / np.float32(255.0))


def test_fit_pads_with_zero_after_inversion() -> None:
    """A white page with a dark item: the padding is the model's ground (0), not white."""
    pixels = np.full((28, 56), 255, dtype=np.uint8)
    pixels[6:22, 16:40] = 0
    out = from_pixels(28, 56, pixels.tobytes())
    assert (out[0, :7] == 0).all() and (out[0, 21:] == 0).all()
    assert out[0, 14, 14] > 0.99 and out[0, 8, 2] == 0.0


def test_downscaled_image_comes_back_close(samples: list[np.ndarray]) -> None:
    for pixels in samples:
        big = Image.fromarray(pixels).resize((84, 84), Image.Resampling.NEAREST)
        out = from_encoded(encode(big, "PNG"))
        assert np.abs(out - expected(pixels)).mean() < 0.04


def test_downscaling_is_antialiased() -> None:
    """1-pixel stripes halved must blur to grey: a sampling filter would alias to 0 or 255."""
    stripes = np.zeros((56, 56), dtype=np.uint8)
    stripes[:, ::2] = 255
    out = from_pixels(56, 56, stripes.tobytes(), Invert.NO)[0, 4:-4, 4:-4]
    assert np.abs(out - 0.5).max() < 0.05


def test_large_photo_is_fitted() -> None:
    """A 2800 x 1400 JPEG takes the DCT-scaled path and still lands in rows 7 to 20."""
    pixels = np.full((1400, 2800), 30, dtype=np.uint8)
    pixels[300:1100, 600:2200] = 220
    out = from_encoded(encode(Image.fromarray(pixels), "JPEG", quality=90), Invert.NO)
    assert (out[0, :7] == 0).all() and (out[0, 21:] == 0).all()
    assert abs(out[0, 14, 14] - 220 / 255) < 0.02 and abs(out[0, 8, 2] - 30 / 255) < 0.02


# --- transparency, frames, orientation ---------------------------------------------------------


def rgba_item(item: int, ground_rgb: int) -> bytes:
    """A grey square item, opaque, on a transparent ground whose hidden colour is ground_rgb."""
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = ground_rgb
    rgba[8:20, 8:20, :3] = item
    rgba[8:20, 8:20, 3] = 255
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


@pytest.mark.parametrize("item", [0, 60, 200, 255])
@pytest.mark.parametrize("hidden", [0, 255])
def test_transparent_ground_becomes_the_dark_ground(item: int, hidden: int) -> None:
    """Whatever its colour, an item cut out on transparency ends up light on 0."""
    out = from_encoded(rgba_item(item, hidden))
    bright = item if item >= 128 else 255 - item
    np.testing.assert_array_equal(out[0], block(28, 28, bright, (8, 8, 20, 20)) / np.float32(255))


def test_transparency_with_yes_and_no() -> None:
    data = rgba_item(100, 255)
    np.testing.assert_array_equal(
        from_encoded(data, Invert.NO)[0], block(28, 28, 100, (8, 8, 20, 20)) / np.float32(255)
    )
    np.testing.assert_array_equal(
        from_encoded(data, Invert.YES)[0], block(28, 28, 155, (8, 8, 20, 20)) / np.float32(255)
    )


def test_half_transparent_pixels_are_blended_onto_the_ground() -> None:
    la = np.zeros((28, 28, 2), dtype=np.uint8)
    la[..., 0] = 200
    la[8:20, 8:20, 1] = 255
    la[8:20, 14:20, 1] = 128
    out = from_encoded(encode(Image.fromarray(la, "LA"), "PNG"))
    assert out[0, 10, 10] == np.float32(200 / 255)
    assert out[0, 10, 16] == np.float32(100 / 255)  # 200 * 128 / 255, rounded
    assert out[0, 2, 2] == 0.0


def test_gif_transparent_index() -> None:
    pixels = block(28, 28, 90, (4, 4, 24, 24))
    data = encode(Image.fromarray(pixels), "GIF", transparency=0)
    # The ground (index of 0) is transparent and the item dark: AUTO inverts the item only.
    np.testing.assert_array_equal(from_encoded(data), expected(block(28, 28, 165, (4, 4, 24, 24))))


def test_multi_frame_gif_uses_the_first_frame() -> None:
    first = block(28, 28, 255, (0, 0, 10, 10))
    second = block(28, 28, 255, (18, 18, 28, 28))
    frames = [Image.fromarray(first), Image.fromarray(second)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(from_encoded(data, Invert.NO), expected(first))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    """Stored on its side (28 wide, 56 tall) with orientation 6: shown 56 wide, 28 tall."""
    upright = np.zeros((28, 56), dtype=np.uint8)
    upright[:, :16] = 255  # a bright left end tells upright from rotated or mirrored
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (28, 56)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = from_encoded(encode(stored, fmt, exif=exif.tobytes()), Invert.NO)
    want = from_pixels(28, 56, upright.tobytes(), Invert.NO)
    assert np.abs(out - want).max() < 0.1
    assert (out[0, :7] < 0.02).all()  # ignoring the tag would fill these rows


# --- bad input ---------------------------------------------------------------------------------


def refused(call: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(InvalidImage) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def test_empty_bytes() -> None:
    assert refused(from_encoded, b"") == "empty: no image bytes"


def test_random_and_text_bytes_are_not_images() -> None:
    noise = np.random.default_rng(7).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert refused(from_encoded, noise) == (
        f"not a PNG, JPEG, WebP, BMP or GIF image (starts with {noise[:4].hex()})"
    )
    message = refused(from_encoded, b"<html><body>404</body></html>")
    assert message == "not a PNG, JPEG, WebP, BMP or GIF image (starts with 3c68746d)"


@pytest.mark.parametrize(
    "fmt, name", [("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", None), ("PCX", None), ("TGA", None)]
)
def test_formats_pillow_could_read_are_still_refused(fmt: str, name: str | None) -> None:
    data = encode(Image.fromarray(block(28, 28, 200, (4, 4, 24, 24))), fmt)
    message = refused(from_encoded, data)
    assert message.startswith("not a PNG, JPEG, WebP, BMP or GIF image (")
    assert (f"looks like {name}" in message) == (name is not None)


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.04, 0.1, 0.3, 0.5, 0.8, 0.94])
@pytest.mark.parametrize("fmt, name", [("PNG", "PNG"), ("JPEG", "JPEG")])
def test_truncated_files(samples: list[np.ndarray], fmt: str, name: str, fraction: float) -> None:
    data = encode(Image.fromarray(samples[1]), fmt)
    cut = max(4, int(len(data) * fraction))
    assert refused(from_encoded, data[:cut]).startswith(f"truncated or corrupt {name}: ")


def test_header_declaring_a_huge_image_is_refused_without_decoding() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    message = refused(from_encoded, png_header_only(100_000, 100_000))
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert message == "image is 10000000000 pixels, over the limit of 16777216"


def test_pixel_limit_is_checked_on_the_declared_size() -> None:
    """5000 x 5000 is under Pillow's own guard: only our check, before load(), stops it."""
    start = time.perf_counter()
    message = refused(from_encoded, png_header_only(5000, 5000))
    assert time.perf_counter() - start < 1.0
    assert message == "image is 5000x5000 = 25000000 pixels, over the limit of 16777216"


def test_custom_limits() -> None:
    tight = Limits(max_pixels=28 * 28, max_encoded_bytes=1000)
    square = encode(Image.fromarray(block(28, 28, 99, (2, 2, 9, 9))), "PNG")
    assert from_encoded(square, Invert.NO, tight).shape == (1, 28, 28)
    wide = encode(Image.fromarray(block(29, 28, 99, (2, 2, 9, 9))), "PNG")
    assert "29x28 = 812 pixels, over the limit of 784" in refused(from_encoded, wide, limits=tight)
    noisy = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    big = encode(Image.fromarray(noisy), "BMP")
    assert refused(from_encoded, big, limits=tight) == (
        f"image is {len(big)} bytes, over the limit of 1000"
    )
    with pytest.raises(ValueError):
        Limits(max_pixels=0)


@pytest.mark.parametrize(
    "height, width, size, message",
    [
        (28, 28, 700, "data has 700 bytes but height x width is 784"),
        (28, 28, 785, "data has 785 bytes but height x width is 784"),
        (0, 28, 0, "height and width must be positive, got 0 and 28"),
        (28, 0, 0, "height and width must be positive, got 28 and 0"),
        (-1, 28, 0, "height and width must be positive, got -1 and 28"),
        (20000, 20000, 4, "image is 20000x20000 = 400000000 pixels, over the limit of 16777216"),
    ],
)
def test_bad_raw_pixels(height: int, width: int, size: int, message: str) -> None:
    assert refused(from_pixels, height, width, bytes(size)) == message


def test_raw_pixels_obey_custom_limits() -> None:
    tight = Limits(max_pixels=100)
    assert from_pixels(10, 10, bytes(100), limits=tight).shape == (1, 28, 28)
    assert "over the limit of 100" in refused(from_pixels, 10, 11, bytes(110), limits=tight)


# --- tensors and batches -----------------------------------------------------------------------


def test_float32_tensor_is_used_as_is_without_a_copy(samples: list[np.ndarray]) -> None:
    values = expected(samples[2])
    for shape in ([1, 28, 28], [28, 28]):
        data = values.tobytes()
        out = from_tensor(shape, "float32", data)
        np.testing.assert_array_equal(out, values)
        assert out.shape == (1, 28, 28) and out.dtype == np.float32
        assert np.shares_memory(out, np.frombuffer(data, dtype=np.uint8))


def test_uint8_and_float16_tensors(samples: list[np.ndarray]) -> None:
    pixels = samples[3]
    np.testing.assert_array_equal(
        from_tensor((28, 28), "uint8", pixels.tobytes()), expected(pixels)
    )
    np.testing.assert_array_equal(
        from_tensor((28, 28), "UINT8", pixels.tobytes()), expected(pixels)
    )
    half = expected(pixels).astype("<f2")
    out = from_tensor((1, 28, 28), "float16", half.tobytes())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, half.astype(np.float32))
    assert from_tensor([1, 28, 28], "FP16", np.ones(784, "<f2").tobytes()).max() == 1.0


def test_tensor_edges_are_inclusive() -> None:
    values = np.zeros(784, dtype="<f4")
    values[0], values[1] = 1.0, -0.0
    assert from_tensor([28, 28], "float32", values.tobytes()).max() == 1.0


@pytest.mark.parametrize(
    "shape, dtype, size, message",
    [
        ([1, 1, 28, 28], "float32", 3136, "shape [1, 1, 28, 28] is not accepted"),
        ([784], "float32", 3136, "shape [784] is not accepted: use [1, 28, 28] or [28, 28]"),
        ([28, 28], "float64", 6272, "dtype 'float64' is not accepted: use float32 (FP32)"),
        ([28, 28], "int32", 3136, "dtype 'int32' is not accepted"),
        ([28, 28], "float32", 3132, "data has 3132 bytes but [28, 28] of float32 needs 3136"),
        ([1, 28, 28], "uint8", 3136, "data has 3136 bytes but [1, 28, 28] of uint8 needs 784"),
    ],
)
def test_bad_tensor_layout(shape: list[int], dtype: str, size: int, message: str) -> None:
    assert message in refused(from_tensor, shape, dtype, bytes(size))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensor_nan_and_infinity(bad: float, dtype: str) -> None:
    values = np.full(784, 0.5, dtype=np.dtype(dtype).newbyteorder("<"))
    values[400] = bad
    message = refused(from_tensor, [28, 28], dtype, values.tobytes())
    assert message == "tensor contains NaN or infinity"


@pytest.mark.parametrize(
    "low, high, message",
    [
        (-0.5, 0.5, "found min -0.5 and max 0.5"),
        (0.0, 1.0000001, "found min 0 and max 1.00000012"),  # no tolerance: one ulp over is out
        (0.0, 255.0, "found min 0 and max 255"),
    ],
)
def test_tensor_values_outside_zero_one(low: float, high: float, message: str) -> None:
    values = np.full(784, 0.5, dtype="<f4")
    values[0], values[1] = low, high
    text = refused(from_tensor, [1, 28, 28], "float32", values.tobytes())
    assert text.startswith("tensor values must lie in [0, 1] (pixels / 255), ") and message in text


def test_stack_makes_one_contiguous_batch(samples: list[np.ndarray]) -> None:
    parts = [
        from_pixels(28, 28, samples[0].tobytes()),
        from_encoded(encode(Image.fromarray(samples[1]), "PNG")),
        from_tensor([28, 28], "float32", expected(samples[2]).tobytes()),
    ]
    batch = stack(parts)
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == np.float32
    assert batch.flags.c_contiguous and batch.flags.writeable
    for i in range(3):
        np.testing.assert_array_equal(batch[i], expected(samples[i]))
    assert stack([]).shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match="shape"):
        stack([np.zeros((28, 28), dtype=np.float32)])
