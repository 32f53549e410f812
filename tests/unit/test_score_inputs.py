"""The readers of `cnnserve score`: IDX, arrays, folders and manifests, on real Fashion-MNIST."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.data import LABELS as FASHION_MNIST_LABELS
from service.scoring.inputs import (
    InputError,
    idx_labels_path,
    label_key,
    match_label,
    open_input,
    read_idx,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = list(FASHION_MNIST_LABELS)  # the official order, as the models' model.json has it


@pytest.fixture(scope="module")
def test_set(fmnist) -> tuple[np.ndarray, np.ndarray]:
    return fmnist.test_images, fmnist.test_labels


def save_png(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("Ankle boot", 9),
        ("ankle_boot", 9),
        ("ANKLE-BOOT", 9),
        ("T-shirt_top", 0),
        ("tshirt top", 0),
        ("t-shirt-top", 0),
        ("3", 3),
        ("10", None),
        ("boots", None),
        ("", None),
        ("---", None),
    ],
)
def test_match_label(name: str, index: int | None) -> None:
    assert match_label(name, LABELS) == index


def test_label_key_ignores_case_and_punctuation() -> None:
    assert label_key("T-shirt/top") == label_key("T shirt_Top") == "tshirttop"


# IDX ----------------------------------------------------------------------------------------


def test_idx_reads_gzip_and_raw_like_the_exporter(tmp_path: Path, test_set) -> None:
    from export.data import read_idx as export_read_idx

    images, labels = test_set
    gz = FMNIST_DIR / "t10k-images-idx3-ubyte.gz"
    np.testing.assert_array_equal(read_idx(gz), export_read_idx(gz))
    np.testing.assert_array_equal(read_idx(gz), images)
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), images)
    labels_gz = FMNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    np.testing.assert_array_equal(read_idx(labels_gz), labels)


def test_idx_input_pixels_labels_and_limit(test_set) -> None:
    images, labels = test_set
    source = open_input(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", LABELS, limit=50)
    assert (source.kind, source.count, source.has_labels, source.indexed) == ("idx", 50, True, True)
    assert not source.encoded
    items = list(source.items())
    assert [item.id for item in items] == [str(i) for i in range(50)] == list(source.ids())
    for i, item in enumerate(items):
        assert item.pixels is not None and item.pixels.dtype == np.uint8
        np.testing.assert_array_equal(item.pixels, images[i])
        assert item.true_label == labels[i]


def test_idx_labels_found_beside_by_name(tmp_path: Path) -> None:
    images = tmp_path / "train-images.idx3-ubyte"
    images.write_bytes(gzip.decompress((FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()))
    assert idx_labels_path(images) is None
    assert not open_input(images, LABELS, limit=3).has_labels
    shutil.copy(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", tmp_path / "train-labels.idx1-ubyte.gz")
    assert idx_labels_path(images) == tmp_path / "train-labels.idx1-ubyte.gz"
    assert open_input(images, LABELS, limit=3).has_labels
    assert idx_labels_path(FMNIST_DIR / "t10k-images-idx3-ubyte.gz") == (
        FMNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c" + bytes(10),
            "file has",
        ),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01" + bytes(4), "expected 0x08"),
        (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
        (b"\x1f\x8bnot really gzip", "corrupt gzip"),
    ],
)
def test_idx_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_unknown_file_lists_what_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="a folder of images, .npy/.npz arrays"):
        open_input(path, LABELS)
    with pytest.raises(InputError, match="no such file or folder"):
        open_input(tmp_path / "missing", LABELS)


# numpy arrays -------------------------------------------------------------------------------


def test_npy_uint8_and_float_in_both_shapes(tmp_path: Path, test_set) -> None:
    images, _ = test_set
    first = images[:20]
    np.save(tmp_path / "u8.npy", first)
    np.save(tmp_path / "f32.npy", (first.astype(np.float32) / 255)[:, None])
    for name in ("u8.npy", "f32.npy"):
        source = open_input(tmp_path / name, LABELS)
        assert (source.kind, source.count, source.has_labels) == ("array", 20, False)
        pixels = np.stack([item.pixels for item in source.items()])
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, first)  # float / 255 round-trips exactly


@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y")])
def test_npz_images_and_labels(tmp_path: Path, test_set, keys: tuple[str, str]) -> None:
    images, labels = test_set
    path = tmp_path / "set.npz"
    np.savez(path, **{keys[0]: images[:30], keys[1]: labels[:30].astype(np.int64)})
    source = open_input(path, LABELS, limit=25)
    assert (source.count, source.has_labels) == (25, True)
    assert [item.true_label for item in source.items()] == labels[:25].tolist()
    np.savez(tmp_path / "nolabels.npz", images=images[:5])
    assert not open_input(tmp_path / "nolabels.npz", LABELS).has_labels


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.full((2, 28, 28), 1.5, np.float32)}, r"must be in \[0, 1\]"),
        ({"images": np.full((2, 28, 28), np.nan, np.float32)}, "NaN"),
        ({"images": np.zeros((2, 3, 28, 28), np.uint8)}, "N x 28 x 28"),
        ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.array([0, 10])}, "0..9"),
        ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.array([0])}, "labels for 2"),
        ({"pictures": np.zeros((2, 28, 28), np.uint8)}, "no `images` or `x`"),
        ({"images": np.zeros((2, 28, 28), np.complex64)}, "dtype complex64"),
    ],
)
def test_bad_arrays_are_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        open_input(path, LABELS)


# folders ------------------------------------------------------------------------------------


def test_folder_recursive_sorted_with_labels_from_parent_names(tmp_path: Path, test_set) -> None:
    images, _ = test_set
    root = tmp_path / "photos"
    save_png(images[0], root / "Ankle boot" / "b.png")
    save_png(images[1], root / "ankle_boot" / "a.jpg")
    save_png(images[2], root / "shop" / "t-shirt_top" / "x.webp")
    save_png(images[3], root / "7" / "z.bmp")
    save_png(images[4], root / "unsorted" / "y.gif")
    save_png(images[5], root / "top.PNG")
    save_png(images[6], root / ".hidden" / "skip.png")
    (root / "notes.txt").write_text("not an image")
    (root / "ankle_boot" / "a.jpg.txt").write_text("not an image either")
    source = open_input(root, LABELS)
    assert (source.kind, source.indexed, source.encoded) == ("folder", False, True)
    items = list(source.items())
    ids = [item.id for item in items]
    assert (
        ids
        == sorted(ids)
        == [
            "7/z.bmp",
            "Ankle boot/b.png",
            "ankle_boot/a.jpg",
            "shop/t-shirt_top/x.webp",
            "top.PNG",
            "unsorted/y.gif",
        ]
    )
    assert [item.true_label for item in items] == [7, 9, 9, 0, None, None]
    assert all(item.path == root / item.id and item.pixels is None for item in items)
    assert source.has_labels
    limited = open_input(root, LABELS, limit=2, exclude=frozenset({(root / "7/z.bmp").resolve()}))
    assert [item.id for item in limited.items()] == ["Ankle boot/b.png", "ankle_boot/a.jpg"]


def test_folder_without_images_or_labels(tmp_path: Path, test_set) -> None:
    with pytest.raises(InputError, match="no image files"):
        open_input(tmp_path, LABELS)
    save_png(test_set[0][0], tmp_path / "misc" / "a.png")
    assert not open_input(tmp_path, LABELS).has_labels


# manifests ----------------------------------------------------------------------------------


def _manifest_files(root: Path, images: np.ndarray) -> list[str]:
    return [
        save_png(images[i], root / "img" / f"{i}.png").relative_to(root).as_posix()
        for i in range(4)
    ]


def test_csv_manifest_paths_and_labels(tmp_path: Path, test_set) -> None:
    images, _ = test_set
    paths = _manifest_files(tmp_path, images)
    manifest = tmp_path / "list.csv"
    rows = [
        ("path", "label"),
        (paths[2], "Pullover"),
        (paths[0], "9"),
        (paths[1], ""),
        (paths[3], "dress"),
    ]
    manifest.write_text("\n".join(",".join(row) for row in rows) + "\n")
    source = open_input(manifest, LABELS)
    items = list(source.items())
    assert [item.id for item in items] == [paths[2], paths[0], paths[1], paths[3]]
    assert [item.true_label for item in items] == [2, 9, None, 3]
    assert all(item.path == tmp_path / item.id for item in items)
    assert (source.kind, source.has_labels, source.indexed) == ("manifest", True, False)

    manifest.write_text(f"path\n{paths[0]}\n{paths[1]}\n")
    assert not open_input(manifest, LABELS).has_labels


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.png,1\n", "needs a `path` column"),
        ("path,label\na.png,boots\n", "row 1: label 'boots'"),
        ("path\na.png\nb.png\na.png\n", "row 3: a.png is listed twice"),
        ("path\na.png\n\n,\n", "row 2: empty path"),
    ],
)
def test_bad_manifests_name_the_row(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text(text)
    with pytest.raises(InputError, match=message):
        open_input(manifest, LABELS)


def test_parquet_manifest(tmp_path: Path, test_set) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = _manifest_files(tmp_path, test_set[0])
    table = pa.table({"path": paths, "label": ["Bag", None, "0", "Sneaker"]})
    pq.write_table(table, tmp_path / "list.parquet")
    source = open_input(tmp_path / "list.parquet", LABELS, limit=3)
    items = list(source.items())
    assert [item.id for item in items] == paths[:3]
    assert [item.true_label for item in items] == [8, None, 0]
    pq.write_table(pa.table({"path": paths, "label": [9, 1, 2, 3]}), tmp_path / "ints.parquet")
    assert [i.true_label for i in open_input(tmp_path / "ints.parquet", LABELS).items()] == [
        9,
        1,
        2,
        3,
    ]
