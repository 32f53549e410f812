"""What `cnnserve score` reads: image folders, IDX files, numpy arrays and manifests.

Every reader gives a `ScoreInput`: how many items there are, whether any carry a known label,
and an iterator of `InputItem`s in input order. Arrays and IDX files become raw 8-bit pixels
(sent as `pixels`); files stay encoded bytes, read only when sent (the server decodes them).
Labels are class indices into the model's labels, which the caller passes in. No protobuf here,
so the readers can be tested alone.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
MANIFEST_SUFFIXES = frozenset({".csv", ".parquet"})
GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE = 0x08


class InputError(ValueError):
    """The input cannot be read as asked; the message names the file and what is wrong."""


@dataclass(frozen=True)
class InputItem:
    """One image to score: raw pixels (H x W uint8) or a file sent as encoded bytes."""

    id: str
    true_label: int | None = None
    pixels: np.ndarray | None = None
    path: Path | None = None


@dataclass(frozen=True)
class ScoreInput:
    kind: str  # folder | idx | array | manifest
    source: Path
    count: int
    has_labels: bool  # some item has a known label: the output gets a true_label column
    indexed: bool  # ids are the positions 0..count-1 (written as integers)
    encoded: bool  # items are files sent as encoded bytes (the server decodes them)
    _items: Callable[[], Iterator[InputItem]]

    def items(self) -> Iterator[InputItem]:
        return self._items()

    def ids(self) -> Iterator[str]:
        """The ids alone, in order, without reading any pixels."""
        if self.indexed:
            return (str(i) for i in range(self.count))
        return (item.id for item in self._items())


def label_key(name: str) -> str:
    """Labels compare ignoring case and anything but letters and digits: `T-shirt/top` is
    `t-shirt-top`, `tshirt_top` or `T-Shirt Top` as a folder or manifest name."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def match_label(name: str, labels: Sequence[str]) -> int | None:
    """The class index a folder name or manifest value stands for: a label, or the index."""
    name = name.strip()
    if name.isdigit():
        index = int(name)
        return index if index < len(labels) else None
    keys = [label_key(label) for label in labels]
    key = label_key(name)
    return keys.index(key) if key and key in keys else None


# IDX ----------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of uint8 (gzip or raw, told by its magic bytes) as an array of its shape."""
    raw = path.read_bytes()
    if raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise InputError(f"{path}: corrupt gzip data: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InputError(f"{path}: not an IDX file (magic number {raw[:4].hex()!r})")
    if raw[2] != IDX_UBYTE:
        raise InputError(f"{path}: IDX data type {raw[2]:#04x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise InputError(f"{path}: truncated IDX header ({ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise InputError(
            f"{path}: IDX header says {dims} ({size} bytes), file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_labels_path(images: Path) -> Path | None:
    """The labels file beside an images file: `images` -> `labels` and `idx3` -> `idx1` in the
    name (`t10k-images-idx3-ubyte.gz` -> `t10k-labels-idx1-ubyte.gz`), gzipped or not."""
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    if name == images.name:
        return None
    stem = name.removesuffix(".gz")
    for candidate in (
        images.with_name(name),
        images.with_name(stem),
        images.with_name(stem + ".gz"),
    ):
        if candidate.is_file():
            return candidate
    return None


def _pixel_items(images: np.ndarray, labels: np.ndarray | None) -> Iterator[InputItem]:
    for i in range(len(images)):
        label = None if labels is None else int(labels[i])
        yield InputItem(id=str(i), true_label=label, pixels=_as_uint8(images[i]))


def _as_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        return np.rint(np.asarray(image, dtype=np.float64) * 255).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def _check_labels(labels: np.ndarray, count: int, classes: int, where: str) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != count:
        raise InputError(f"{where}: {labels.shape} labels for {count} images")
    if labels.dtype.kind not in "iu":
        raise InputError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(
            f"{where}: labels go from {labels.min()} to {labels.max()}, expected 0..{classes - 1}"
        )
    return labels


def open_idx(path: Path, labels: Sequence[str], limit: int | None) -> ScoreInput:
    images = read_idx(path)
    if images.ndim != 3:
        raise InputError(f"{path}: IDX images must be N x height x width, got shape {images.shape}")
    images = images[:limit]
    label_path = idx_labels_path(path)
    true = None
    if label_path is not None:
        true = read_idx(label_path)[:limit]
        _check_labels(true, len(images), len(labels), str(label_path))
    return ScoreInput(
        "idx", path, len(images), true is not None, True, False, lambda: _pixel_items(images, true)
    )


# numpy arrays -------------------------------------------------------------------------------


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise InputError(
            f"{where}: images must be N x 28 x 28 or N x 1 x 28 x 28, got {images.shape}"
        )
    if images.dtype.kind == "f":
        if images.size and not np.isfinite(images).all():
            raise InputError(f"{where}: images hold NaN or infinity")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise InputError(
                f"{where}: float images must be in [0, 1], got {images.min()}..{images.max()}"
            )
    elif images.dtype.kind in "iu":
        if images.size and (images.min() < 0 or images.max() > 255):
            raise InputError(f"{where}: integer images must be in 0..255")
    else:
        raise InputError(f"{where}: images of dtype {images.dtype}, expected uint8 or float32")
    return images


def open_array(path: Path, labels: Sequence[str], limit: int | None) -> ScoreInput:
    """`.npy`: the images. `.npz`: keys `images` (or `x`) and optional `labels` (or `y`)."""
    try:
        if path.suffix == ".npy":
            images, true = np.load(path, mmap_mode="r", allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as archive:
                keys = set(archive.files)
                image_key = next((k for k in ("images", "x") if k in keys), None)
                if image_key is None:
                    raise InputError(
                        f"{path}: no `images` or `x` array (it holds {', '.join(sorted(keys))})"
                    )
                label_key_ = "labels" if image_key == "images" else "y"
                images = archive[image_key]
                true = archive[label_key_] if label_key_ in keys else None
    except InputError:
        raise
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read: {error}") from None
    images = _check_images(images[:limit], str(path))
    if true is not None:
        true = _check_labels(true[:limit], len(images), len(labels), f"{path} labels")
    return ScoreInput(
        "array",
        path,
        len(images),
        true is not None,
        True,
        False,
        lambda: _pixel_items(images, true),
    )


# files: folders and manifests ------------------------------------------------------------------


def _file_items(entries: list[tuple[str, Path, int | None]]) -> Iterator[InputItem]:
    for item_id, path, label in entries:
        yield InputItem(id=item_id, true_label=label, path=path)


def _file_input(kind: str, source: Path, entries: list[tuple[str, Path, int | None]]) -> ScoreInput:
    has_labels = any(label is not None for _, _, label in entries)
    return ScoreInput(
        kind, source, len(entries), has_labels, False, True, lambda: _file_items(entries)
    )


def open_folder(
    root: Path, labels: Sequence[str], limit: int | None, exclude: frozenset[Path] = frozenset()
) -> ScoreInput:
    """Images under `root` (any depth, hidden files and folders skipped), sorted by their
    relative path, which is the id; the label is the parent folder's name where it matches."""
    entries = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(
            part.startswith(".") for part in relative.parts
        ):
            continue
        if not path.is_file() or path.resolve() in exclude:
            continue
        parent = relative.parts[-2] if len(relative.parts) > 1 else None
        label = match_label(parent, labels) if parent is not None else None
        entries.append((relative.as_posix(), path, label))
    entries.sort(key=lambda entry: entry[0])
    if not entries:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"{root}: no image files ({suffixes}) in this folder or below")
    return _file_input("folder", root, entries[:limit])


def _manifest_rows(path: Path) -> tuple[list[str], list[str] | None]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(
                f"{path}: reading Parquet needs pyarrow: pip install 'cnnserve[score]'"
            ) from None
        table = pq.read_table(path)
        columns = table.column_names
        paths = table.column("path").to_pylist() if "path" in columns else None
        values = table.column("label").to_pylist() if "label" in columns else None
    else:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        paths = [row["path"] for row in rows] if "path" in columns else None
        values = [row["label"] for row in rows] if "label" in columns else None
    if paths is None:
        raise InputError(f"{path}: a manifest needs a `path` column (it has {', '.join(columns)})")
    label_values = None if values is None else ["" if v is None else str(v) for v in values]
    return ["" if p is None else str(p) for p in paths], label_values


def open_manifest(path: Path, labels: Sequence[str], limit: int | None) -> ScoreInput:
    """A CSV or Parquet table: `path` (relative to the manifest's folder; the id) and an
    optional `label` (a class index or name; empty for unknown)."""
    paths, values = _manifest_rows(path)
    entries, seen = [], set()
    for row, item in enumerate(paths[:limit]):
        where = f"{path}, row {row + 1}"
        if not item:
            raise InputError(f"{where}: empty path")
        if item in seen:
            raise InputError(f"{where}: {item} is listed twice; ids must be unique")
        seen.add(item)
        label = None
        if values is not None and values[row].strip():
            label = match_label(values[row], labels)
            if label is None:
                raise InputError(
                    f"{where}: label {values[row]!r} is neither a class index 0..{len(labels) - 1} "
                    f"nor one of {', '.join(labels)}"
                )
        entries.append((item, path.parent / item, label))
    return _file_input("manifest", path, entries)


def open_input(
    path: Path,
    labels: Sequence[str],
    limit: int | None = None,
    exclude: frozenset[Path] = frozenset(),
) -> ScoreInput:
    """Reads `path` by what it is: a folder, .npy/.npz, .csv/.parquet, else an IDX file."""
    if path.is_dir():
        return open_folder(path, labels, limit, exclude)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return open_array(path, labels, limit)
    if suffix in MANIFEST_SUFFIXES:
        return open_manifest(path, labels, limit)
    try:
        return open_idx(path, labels, limit)
    except InputError as error:
        raise InputError(
            f"{error}; expected a folder of images, .npy/.npz arrays, a .csv/.parquet manifest, "
            "or a Fashion-MNIST IDX images file"
        ) from None
