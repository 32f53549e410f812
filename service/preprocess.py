"""Client images to model input: float32 1 x 28 x 28 in [0, 1], a light item on a dark ground.

The servicers of both APIs (ours and KServe v2) translate their messages into plain bytes and
call these functions, so this module imports neither grpc nor protobuf. Every bad input raises
`InvalidImage` with a message a client can act on; the caller prefixes the field path.

An encoded image (`from_encoded`) goes through these steps, in this order:

1. Guard: empty data and data over `Limits.max_encoded_bytes` are refused; the format is
   sniffed from the magic bytes and only PNG, JPEG, WebP, BMP and GIF reach Pillow (which is
   also told to try only those). The size declared in the header is checked against
   `Limits.max_pixels` before any pixel is decoded, so a decompression bomb costs nothing.
   Pillow's process-wide guard (`Image.MAX_IMAGE_PIXELS`) is left untouched: it can only
   refuse earlier (at twice its value), and its refusal is reported the same way.
2. Decode the first frame (GIF, animated WebP and APNG included). JPEG is decoded at the
   smallest DCT scale (1/2, 1/4, 1/8) that keeps the longer side at least 4 x 28 pixels, and
   straight to its luma channel: the result is the same picture, far cheaper for photos.
3. Apply the EXIF orientation (`ImageOps.exif_transpose`), for every format that carries one,
   so the item is upright as any image viewer shows it.
4. Grayscale: ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B), as Pillow's "L" does;
   16-bit grayscale is rounded to 8 bits (v / 257).
5. Invert. YES always, NO never. AUTO inverts a dark item on a light ground: when the mean of
   the 1-pixel border is brighter than 127.5. Every Fashion-MNIST image has a border mean
   below 108, so the dataset passes through untouched; a relative rule (border brighter than
   the centre) would invert the few items that fill their frame, and misreads vignetted photos.
6. Transparency: transparent pixels are the background, so they become the model's ground (0)
   whatever the inversion: the pixels are inverted (or not) first, then composited onto black
   (p * alpha / 255). For AUTO the border says nothing (it is usually transparent), so the
   visible item decides: invert when its alpha-weighted mean luma is below 127.5. Compositing
   onto one fixed colour instead would erase every item of that colour: a white shirt cut out
   on a transparent ground vanishes when composited onto white.
7. Fit into 28 x 28 keeping the aspect ratio: the longer side is resampled to 28 with Lanczos
   (sharp and alias-free, close to Fashion-MNIST's own subsample-and-sharpen), the shorter side
   to round(side x 28 / longer), and the result is centred on a 28 x 28 ground of 0 (any odd
   pixel of padding goes to the bottom or right). A 28 x 28 image is not resampled at all.
8. Scale to float32: value / 255, exactly as training does, so a 28 x 28 Fashion-MNIST image
   sent as PNG reaches the model bit-for-bit as it was trained on.

Raw pixels (`from_pixels`) start at step 5. A tensor (`from_tensor`, or `from_batch` for many
images at once) is the model's own input and is only validated: no inversion, no resizing.
"""

from __future__ import annotations

import enum
import io
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 28
_SHAPE = (1, SIZE, SIZE)
_SUPPORTED_NAMES = "PNG, JPEG, WebP, BMP or GIF"
_PILLOW_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]
# JPEG keeps at least this many times 28 pixels on its longer side when decoded at a DCT scale.
_JPEG_DRAFT_FACTOR = 4
# Errors Pillow raises for truncated or malformed data, while opening or decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class InvalidImage(ValueError):
    """The client's image cannot become model input; the message says why, in client terms."""


@dataclass(frozen=True)
class Limits:
    """Per-image resource limits: what one request may make the server decode."""

    max_pixels: int = 4096 * 4096
    max_encoded_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_encoded_bytes <= 0:
            raise ValueError(f"limits must be positive, got {self}")


DEFAULT_LIMITS = Limits()


class Invert(enum.Enum):
    """Whether to turn a dark item on a light ground into Fashion-MNIST's light on dark."""

    AUTO = "auto"
    YES = "yes"
    NO = "no"


def _sniff(data: bytes) -> str | None:
    """The format the magic bytes announce, supported or not, so errors can name it."""
    if data.startswith(b"\x89PNG"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"GIF8"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL"
    if data.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    for magic, name in ((b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"8BPS", "PSD")):
        if data.startswith(magic):
            return name
    return None


def _check_size(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image is {width}x{height}: width and height must be positive")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )


def _bomb_message(err: Exception, limits: Limits) -> str:
    """Pillow's own guard fired before the size could be read: report its pixel count."""
    found = _BOMB_PIXELS.search(str(err))
    size = f"{found.group(1)} pixels" if found else "too large"
    return f"image is {size}, over the limit of {limits.max_pixels}"


def _draft_size(width: int, height: int) -> tuple[int, int]:
    """The smallest size JPEG may decode to: the fitted size times the draft factor."""
    target, longer = SIZE * _JPEG_DRAFT_FACTOR, max(width, height)
    return max(1, width * target // longer), max(1, height * target // longer)


def _luma_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """8-bit luma, and alpha when some pixel is not fully opaque (else None)."""
    if img.mode.startswith("I"):  # 16-bit grayscale: Pillow's convert() would clip, not scale
        wide = np.asarray(img).astype(np.uint32)
        luma = ((wide + 128) // 257).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int) and (wide == key).any():
            return luma, np.where(wide == key, 0, 255).astype(np.uint8)
        return luma, None
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        luma = np.asarray(rgba.convert("L"))  # RGBA to L ignores alpha: the colour under it
        return luma, (alpha if alpha.min() < 255 else None)
    return np.asarray(img if img.mode == "L" else img.convert("L")), None


def _decode(data: bytes, limits: Limits) -> tuple[np.ndarray, np.ndarray | None]:
    """Upright 8-bit luma and alpha of an encoded image, refusing anything over the limits."""
    if not data:
        raise InvalidImage("empty: no image bytes")
    if len(data) > limits.max_encoded_bytes:
        raise InvalidImage(
            f"image is {len(data)} bytes, over the limit of {limits.max_encoded_bytes}"
        )
    kind = _sniff(data)
    if kind not in ("PNG", "JPEG", "WebP", "BMP", "GIF"):
        looks = f"looks like {kind}, " if kind else ""
        raise InvalidImage(f"not a {_SUPPORTED_NAMES} image ({looks}starts with {data[:4].hex()})")
    try:
        img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError as err:
        raise InvalidImage(f"truncated or corrupt {kind}: cannot read its header") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidImage(_bomb_message(err, limits)) from err
    except _DECODE_ERRORS as err:
        raise InvalidImage(f"truncated or corrupt {kind}: {err}") from err
    with img:
        _check_size(*img.size, limits)  # before load(): nothing is decoded yet
        try:
            if img.format in ("JPEG", "MPO"):
                img.draft("L", _draft_size(*img.size))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _luma_alpha(img)
        except _DECODE_ERRORS as err:
            raise InvalidImage(f"truncated or corrupt {kind}: {err}") from err


def _border_mean(luma: np.ndarray) -> float:
    """Mean of the 1-pixel frame, each pixel counted once, without copying the image."""
    height, width = luma.shape
    if height <= 2 or width <= 2:
        return float(luma.mean())
    total = int(luma[0].sum(dtype=np.uint64)) + int(luma[-1].sum(dtype=np.uint64))
    total += int(luma[1:-1, 0].sum(dtype=np.uint64)) + int(luma[1:-1, -1].sum(dtype=np.uint64))
    return total / (2 * width + 2 * (height - 2))


def _should_invert(luma: np.ndarray, alpha: np.ndarray | None, invert: Invert) -> bool:
    if invert is not Invert.AUTO:
        return invert is Invert.YES
    if alpha is None:
        return _border_mean(luma) > 127.5
    weight = int(alpha.sum(dtype=np.uint64))
    if weight == 0:  # fully transparent: nothing to see either way
        return False
    lit = int((luma.astype(np.uint16) * alpha).sum(dtype=np.uint64))
    return lit / weight < 127.5


def _fit(pixels: np.ndarray) -> np.ndarray:
    """Lanczos-resample the longer side to 28 and centre the result on a ground of 0."""
    height, width = pixels.shape
    if (height, width) == (SIZE, SIZE):
        return pixels
    longer = max(height, width)
    new_w = max(1, (width * SIZE + longer // 2) // longer)
    new_h = max(1, (height * SIZE + longer // 2) // longer)
    # reducing_gap=3: a cheap box reduction first, then Lanczos; Pillow documents the result
    # as indistinguishable from a plain Lanczos at that gap, and big photos shrink much faster.
    small = Image.fromarray(pixels).resize(
        (new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    out = np.zeros((SIZE, SIZE), dtype=np.uint8)
    top, left = (SIZE - new_h) // 2, (SIZE - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.asarray(small)
    return out


def _unit(pixels: np.ndarray) -> np.ndarray:
    """8-bit values as float32 in [0, 1]: the one definition of the scaling, for every path."""
    out = pixels.astype(np.float32)
    out /= np.float32(255.0)
    return out


def _to_input(luma: np.ndarray, alpha: np.ndarray | None, invert: Invert) -> np.ndarray:
    """Steps 5 to 8, shared by encoded images and raw pixels."""
    pixels = np.subtract(np.uint8(255), luma) if _should_invert(luma, alpha, invert) else luma
    if alpha is not None:  # composite onto black: transparent is always ground
        pixels = ((pixels.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return _unit(_fit(pixels)).reshape(_SHAPE)


def from_encoded(
    data: bytes, invert: Invert = Invert.AUTO, limits: Limits = DEFAULT_LIMITS
) -> np.ndarray:
    """A PNG, JPEG, WebP, BMP or GIF file as float32 1 x 28 x 28; see the module docstring."""
    luma, alpha = _decode(data, limits)
    return _to_input(luma, alpha, invert)


def from_pixels(
    height: int,
    width: int,
    data: bytes,
    invert: Invert = Invert.AUTO,
    limits: Limits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Raw 8-bit grayscale, row-major, inverted and fitted exactly like an encoded image."""
    if height <= 0 or width <= 0:
        raise InvalidImage(f"height and width must be positive, got {height} and {width}")
    _check_size(width, height, limits)
    if len(data) != height * width:
        raise InvalidImage(f"data has {len(data)} bytes but height x width is {height * width}")
    luma = np.frombuffer(data, dtype=np.uint8).reshape(height, width)
    return _to_input(luma, None, invert)


def from_pixel_batch(data: Sequence[bytes], invert: Invert = Invert.AUTO) -> np.ndarray:
    """Many 28 x 28 raw images as float32 N x 1 x 28 x 28, in one pass of numpy.

    The same result as `from_pixels` image by image (no resizing at this size; the same
    border rule for AUTO), without a Python loop per image: the batch path for clients that
    send many small images. Every item must hold exactly 28 x 28 bytes.
    """
    count = len(data)
    luma = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(count, SIZE, SIZE)
    if invert is Invert.AUTO:  # the frame's mean, from its four edges alone
        edges = (luma[:, 0, :], luma[:, -1, :], luma[:, 1:-1, 0], luma[:, 1:-1, -1])
        frame = sum(edge.sum(axis=1, dtype=np.int64) for edge in edges)
        flip = np.asarray(frame) / (4 * SIZE - 4) > 127.5
    else:
        flip = np.full(count, invert is Invert.YES)
    if flip.any():
        luma = np.where(flip[:, None, None], np.uint8(255) - luma, luma)
    return _unit(luma).reshape(count, *_SHAPE)


# numpy dtype for each accepted name: ours, and KServe v2's datatype names.
_TENSOR_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "UINT8": np.dtype("u1"),
}
_TENSOR_SHAPES = ((1, SIZE, SIZE), (SIZE, SIZE))


def _shown(dims: tuple[int, ...]) -> str:
    """A refused shape for a message, cut short: it may have thousands of dimensions, and a
    status message over gRPC's 8 KiB metadata limit reaches the client as RESOURCE_EXHAUSTED."""
    if len(dims) <= 6:
        return str(list(dims))
    return f"{str(list(dims[:6]))[:-1]}, ... ({len(dims)} dimensions)]"


def from_tensor(shape: Sequence[int], dtype: str, data: bytes) -> np.ndarray:
    """The model's own input, checked and used as is: no inversion, no resizing.

    Floats must be finite and lie in [0, 1] exactly, with no tolerance: pixels / 255 never
    leaves that range, and a tensor that does was normalised (mean/std) or left at 0-255,
    which the model would silently misclassify. uint8 is divided by 255. float32 is returned
    without a copy (a read-only view of `data`).
    """
    numpy_dtype = _TENSOR_DTYPES.get(dtype)
    if numpy_dtype is None:
        raise InvalidImage(
            f"tensor dtype {dtype!r} is not accepted: use float32 (FP32), float16 (FP16) "
            "or uint8 (UINT8)"
        )
    dims = tuple(map(int, shape))
    if dims not in _TENSOR_SHAPES:
        raise InvalidImage(
            f"tensor shape {_shown(dims)} is not accepted: use [1, 28, 28] or [28, 28]"
        )
    expected = SIZE * SIZE * numpy_dtype.itemsize
    if len(data) != expected:
        raise InvalidImage(
            f"tensor data has {len(data)} bytes but {list(dims)} of {numpy_dtype.name} "
            f"needs {expected}"
        )
    values = np.frombuffer(data, dtype=numpy_dtype).reshape(_SHAPE)
    if numpy_dtype.kind == "u":
        return _unit(values)
    if not np.isfinite(values).all():
        raise InvalidImage("tensor contains NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InvalidImage(
            "tensor values must lie in [0, 1] (pixels / 255), "
            f"found min {low:.9g} and max {high:.9g}"
        )
    return values.astype(np.float32, copy=False)


def from_batch(shape: Sequence[int], dtype: str, data: bytes) -> np.ndarray:
    """Many images in the model's own layout, N x 1 x 28 x 28 or N x 28 x 28, checked at once.

    The batch form of `from_tensor`, for the Open Inference Protocol, where one tensor carries
    every image of a request, batch dimension first. The same rules hold (floats finite and in
    [0, 1] exactly, uint8 divided by 255), checked with whole-array operations rather than image
    by image; a refusal names the first offending image. float32 comes back without a copy.
    """
    numpy_dtype = _TENSOR_DTYPES.get(dtype)
    if numpy_dtype is None:
        raise InvalidImage(
            f"datatype {dtype[:80]!r} is not accepted: use FP32 (values in [0, 1]), FP16, "
            "or UINT8 (0-255)"
        )
    dims = tuple(map(int, shape))
    if len(dims) not in (3, 4) or dims[1:] not in _TENSOR_SHAPES:
        raise InvalidImage(
            f"shape {_shown(dims)} is not accepted: use [N, 1, 28, 28] or [N, 28, 28] "
            "(N images, the batch dimension first)"
        )
    count = dims[0]
    if count < 1:
        raise InvalidImage(f"shape {list(dims)} holds no image; at least one is required")
    expected = count * SIZE * SIZE * numpy_dtype.itemsize
    if len(data) != expected:
        raise InvalidImage(
            f"data has {len(data)} bytes but {list(dims)} of {numpy_dtype.name} needs {expected}"
        )
    values = np.frombuffer(data, dtype=numpy_dtype).reshape(count, *_SHAPE)
    if numpy_dtype.kind == "u":
        return _unit(values)
    low, high = values.min(), values.max()  # NaN propagates, infinity shows as a bound
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = int(np.flatnonzero(~np.isfinite(values).reshape(count, -1).all(axis=1))[0])
        raise InvalidImage(f"image {bad} contains NaN or infinity")
    if low < 0.0 or high > 1.0:
        flat = values.reshape(count, -1)
        bad = int(np.flatnonzero((flat.min(axis=1) < 0.0) | (flat.max(axis=1) > 1.0))[0])
        raise InvalidImage(
            "values must lie in [0, 1] (pixels / 255, or send UINT8 pixels); "
            f"image {bad} has min {float(flat[bad].min()):.9g} and max {float(flat[bad].max()):.9g}"
        )
    return values.astype(np.float32, copy=False)


def stack(images: Sequence[np.ndarray]) -> np.ndarray:
    """One contiguous float32 N x 1 x 28 x 28 batch, as the runtime feeds ONNX Runtime."""
    out = np.empty((len(images), *_SHAPE), dtype=np.float32)
    for i, image in enumerate(images):
        if image.shape != _SHAPE:  # our own functions make these: a bug, not a client error
            raise ValueError(f"image {i} has shape {image.shape}, expected {_SHAPE}")
        out[i] = image
    return out
