"""IMAGE for `cnnserve show`: a file, or `fmnist:N`, made into the model's 28 x 28 input.

Files go through the service's own preprocessing (`service.preprocess`: decode, grayscale,
inversion, fitting into 28 x 28), so the picture of the input is what the model sees, and the
tensor is sent as is. `fmnist:N` is test image N of Fashion-MNIST, read from its IDX file:
`--idx PATH`, else the folder in $FMNIST_DIR, the system package's folder, or the download
cache, the places the exporter's loader looks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import preprocess
from service.scoring.inputs import InputError, idx_labels_path, read_idx

DEFAULT_IDX = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
IDX_NAME = "t10k-images-idx3-ubyte"
FMNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class ImageError(ValueError):
    """IMAGE cannot be read; the message names it and says why."""


@dataclass(frozen=True)
class Source:
    """The model input made from IMAGE: 28 x 28 float32 in [0, 1], and names for it."""

    pixels: np.ndarray
    tag: str  # for file names: fmnist-00042 or the file's stem
    label: str | None = None  # the true class, when known


def _idx_path(given: Path | None) -> Path:
    if given is not None:
        return given
    folders = [Path(os.environ["FMNIST_DIR"])] if os.environ.get("FMNIST_DIR") else []
    folders.append(DEFAULT_IDX.parent)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    folders.append(cache / "cnnserve" / "fashion-mnist")
    for folder in folders:
        for name in (IDX_NAME, IDX_NAME + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise ImageError(
        f"fmnist:N needs the Fashion-MNIST test images; none in {', '.join(map(str, folders))} "
        "(pass --idx PATH)"
    )


def load_image(spec: str, invert: str = "auto", idx: Path | None = None) -> Source:
    """IMAGE as the model's input; a bad IMAGE is a one-line ImageError."""
    mode = preprocess.Invert(invert)
    if spec.startswith("fmnist:"):
        number = spec.removeprefix("fmnist:")
        if not number.isdigit():
            raise ImageError(
                f"bad IMAGE {spec!r}: fmnist:N takes a test image number, e.g. fmnist:0"
            )
        path = _idx_path(idx)
        try:
            images = read_idx(path)
        except (InputError, OSError) as error:
            raise ImageError(f"bad IMAGE {spec!r}: {error}") from None
        index = int(number)
        if images.ndim != 3 or index >= len(images):
            raise ImageError(f"bad IMAGE {spec!r}: {path} holds images 0 to {len(images) - 1}")
        image = np.ascontiguousarray(images[index])
        pixels = preprocess.from_pixels(*image.shape, image.tobytes(), mode)
        label = None
        labels_path = idx_labels_path(path)
        if labels_path is not None:
            try:
                labels = read_idx(labels_path)
                label = FMNIST_LABELS[int(labels[index])] if index < len(labels) else None
            except (InputError, OSError, IndexError):
                label = None
        return Source(pixels[0], f"fmnist-{index:05d}", label)
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"bad IMAGE {spec!r}: {error.strerror or error}") from None
    try:
        pixels = preprocess.from_encoded(data, mode)
    except preprocess.InvalidImage as error:
        raise ImageError(f"bad IMAGE {spec!r}: {error}") from None
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-") or "image"
    return Source(pixels[0], tag)
