"""Fashion-MNIST as numpy arrays: find the IDX files, check them, decode them once per process.

Training and export need the same bytes on every machine, so the loader looks in a fixed order
(an explicit directory, `$FMNIST_DIR`, the Debian package `dataset-fashion-mnist`, a user cache),
downloads into the cache only when none of those holds the data, and verifies what it reads
against published checksums. The sha256 it returns goes into each exported model's metadata, so
a model can be traced to the exact data it saw. numpy only: no torch here, so the loader is cheap
to import and to test.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import numpy as np

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Fixed order: the dataset checksum hashes the contents in this order.
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# MD5 of the published .gz files, as downloaded from URL_BASE.
GZ_MD5: Mapping[str, str] = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}

# MD5 of the decompressed IDX bytes (what `gunzip` writes). Local copies may be recompressed
# (the Debian package's .gz files differ from the published ones), so local files are checked
# by content. Computed from /usr/share/datasets/fashion-mnist (dataset-fashion-mnist
# 0.0~git20200523.55506a9-1); they match the raw-file MD5s other loaders publish.
CONTENT_MD5: Mapping[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

ENV_VAR = "FMNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIZE = 28
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_INSTALL_HINT = (
    "To fix: `apt-get install dataset-fashion-mnist`, or set FMNIST_DIR (or pass --data-dir) "
    "to a directory holding the four files (NAME.gz or raw NAME), or allow the download."
)


class DatasetNotFoundError(FileNotFoundError):
    """No searched place held Fashion-MNIST and it could not be downloaded."""


class ChecksumError(ValueError):
    """A file's MD5 differs from the published one: wrong dataset, corrupt copy or bad download."""


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """The decoded dataset (read-only arrays, shared between loads) and where it came from."""

    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) uint8
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) uint8
    source: Path
    checksum: str  # sha256 over the four decompressed files in FILES order


def _read_content(path: Path) -> bytes:
    """The file's IDX bytes; gzip is recognised by its magic bytes, since names can lie."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip data: {err}") from err


def _parse_idx(content: bytes, path: Path) -> np.ndarray:
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {content[:4].hex()!r})")
    if content[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX dtype code {content[2]:#04x}, expected 0x08 (uint8)")
    ndim = content[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(content) < header:
        raise ValueError(f"{path}: truncated or invalid IDX header ({ndim} dimensions)")
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(content) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {dims} = {expected} bytes of data, "
            f"file holds {len(content) - header}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one IDX file of uint8 (gzip or raw) into a read-only array of the header's shape."""
    path = Path(path)
    return _parse_idx(_read_content(path), path)


def cache_dir() -> Path:
    """Where downloads go: the XDG cache if it is set (and absolute, as the spec requires)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "cnnserve" / "fashion-mnist"


def _find_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The four files found in `directory` (raw NAME preferred: no inflating) and those missing."""
    found: dict[str, Path] = {}
    for name in FILES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    return found, [name for name in FILES if name not in found]


def _search_dirs(data_dir: str | os.PathLike[str] | None) -> list[tuple[str, Path | None]]:
    env = os.environ.get(ENV_VAR)
    return [
        ("data_dir / --data-dir", Path(data_dir).expanduser() if data_dir is not None else None),
        (f"${ENV_VAR}", Path(env).expanduser() if env else None),
        ("system package dataset-fashion-mnist", SYSTEM_DIR),
        ("user cache", cache_dir()),
    ]


def download_dataset(
    dest: str | os.PathLike[str],
    url_base: str = URL_BASE,
    md5s: Mapping[str, str] = GZ_MD5,
    timeout: float = 60.0,
) -> Path:
    """Fetch the missing .gz files into `dest`, each checked against `md5s` before it appears.

    Each file is written to a hidden temporary name and renamed only once its MD5 matches, so an
    interrupted or corrupt download never leaves a file that a later search would pick up.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        final = dest / f"{name}.gz"
        if final.is_file() or (dest / name).is_file():
            continue
        url = f"{url_base}{name}.gz"
        log.info("downloading %s", url)
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.md5(usedforsecurity=False)
            try:
                with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as err:  # URLError, HTTPError and timeouts do not name the URL
                raise OSError(f"{url}: {err}") from err
            if digest.hexdigest() != md5s[name]:
                raise ChecksumError(
                    f"{url}: MD5 mismatch for {name}.gz: expected {md5s[name]}, "
                    f"got {digest.hexdigest()}; the download was deleted"
                )
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _verify(name: str, path: Path, content: bytes) -> None:
    actual = hashlib.md5(content, usedforsecurity=False).hexdigest()
    if actual != CONTENT_MD5[name]:
        raise ChecksumError(
            f"{path}: MD5 of the decompressed content is {actual}, expected {CONTENT_MD5[name]}: "
            "not Fashion-MNIST (MNIST uses the same file names) or a corrupt copy; "
            "pass verify=False to load it anyway"
        )


@functools.lru_cache(maxsize=4)
def _decode(
    files: tuple[tuple[str, int, int], ...], verify: bool
) -> tuple[tuple[np.ndarray, ...], str]:
    """Arrays and checksum for resolved paths; size and mtime in the key catch replaced files."""
    checksum = hashlib.sha256()
    arrays = []
    for name, (path_str, _, _) in zip(FILES, files, strict=True):
        path = Path(path_str)
        content = _read_content(path)
        if verify:
            _verify(name, path, content)
        checksum.update(content)
        arrays.append(_parse_idx(content, path))
    for i in (0, 2):
        images, labels, where = arrays[i], arrays[i + 1], files[i + 1][0]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{files[i][0]}: images of shape {images.shape}, not (N, 28, 28)")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{where}: {labels.shape} labels for {len(images)} images")
        if labels.size and int(labels.max()) >= len(LABELS):
            raise ValueError(f"{where}: labels go up to {labels.max()}, expected 0..9")
    return tuple(arrays), checksum.hexdigest()


def _load_from(directory: Path, files: Mapping[str, Path], verify: bool) -> FashionMNIST:
    key = []
    for name in FILES:
        resolved = files[name].resolve()
        st = resolved.stat()
        key.append((str(resolved), st.st_size, st.st_mtime_ns))
    arrays, checksum = _decode(tuple(key), verify)
    return FashionMNIST(*arrays, source=directory, checksum=checksum)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
    *,
    url_base: str = URL_BASE,
    gz_md5: Mapping[str, str] = GZ_MD5,
) -> FashionMNIST:
    """Find (or download) Fashion-MNIST and decode it, once per process for the same files.

    With `verify=False` the content MD5s are not checked, so a smaller IDX set of the same
    layout can stand in (handy for quick experiments); shapes and labels are still checked.
    """
    looked: list[str] = []
    skipped_explicit: list[str] = []
    for index, (what, directory) in enumerate(_search_dirs(data_dir)):
        if directory is None:
            looked.append(f"{what}: not set")
            continue
        found, missing = _find_files(directory)
        if not missing:
            if skipped_explicit:  # a mistyped --data-dir should not pass unnoticed
                log.warning(
                    "using Fashion-MNIST from %s: %s", directory, "; ".join(skipped_explicit)
                )
            return _load_from(directory, found, verify)
        state = "does not exist" if not directory.is_dir() else "missing " + ", ".join(missing)
        looked.append(f"{what}: {directory} ({state})")
        if index < 2:  # data_dir and $FMNIST_DIR: places the user chose
            skipped_explicit.append(looked[-1])
    if download:
        cache = cache_dir()
        try:
            download_dataset(cache, url_base=url_base, md5s=gz_md5)
        except (OSError, ValueError) as err:
            looked.append(f"download into {cache}: {err}")
        else:
            found, _ = _find_files(cache)
            return _load_from(cache, found, verify)
    else:
        looked.append(f"download from {url_base}: disabled (download=False)")
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked in:\n  " + "\n  ".join(looked) + "\n" + _INSTALL_HINT
    )


def stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and population std of uint8 pixels scaled to [0, 1], in float64.

    Counted by pixel value in chunks, so 47 million pixels never become a 376 MB float copy.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"stats expects uint8 pixels, got {images.dtype}")
    flat = images.reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[start : start + (1 << 22)], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    std = float(np.sqrt(counts @ (values - mean) ** 2 / n))
    return mean, std
