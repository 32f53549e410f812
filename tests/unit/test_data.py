"""Tests for the Fashion-MNIST loader: IDX decoding, search order, checksums and downloads.

Nothing here touches the network: every test runs with a guard that refuses any URL but
file://, and the download tests serve files from a temporary folder through file:// URLs, which
go through the same urllib code path as http without opening a socket. Tests that need the real
dataset skip when no copy is installed (`apt-get install dataset-fashion-mnist`).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export import data

# sha256 over the four decompressed files in data.FILES order (the dataset checksum).
EXPECTED_CHECKSUM = "14410854cf7a289477dcfc7df3f8ec24741e281cdcc425ede0d9a748ca630214"
OFFICIAL_LABELS = [
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
]


def _installed_dir() -> Path | None:
    """A real copy to test against, found before the fixtures below rewrite the environment."""
    candidates = [os.environ.get(data.ENV_VAR), data.SYSTEM_DIR, data.cache_dir()]
    for directory in candidates:
        if directory and not data._find_files(Path(directory))[1]:
            return Path(directory)
    return None


INSTALLED = _installed_dir()
needs_real = pytest.mark.skipif(INSTALLED is None, reason="Fashion-MNIST is not installed")


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FMNIST_DIR, a private cache dir, and any non-file:// URL fails the test."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_urlopen = data.urlopen

    def local_only(url: str, *args: object, **kwargs: object) -> object:
        if not url.startswith("file:"):
            pytest.fail(f"test tried to reach the network: {url}")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(data, "urlopen", local_only)


@pytest.fixture
def real_files() -> dict[str, Path]:
    if INSTALLED is None:
        pytest.skip("Fashion-MNIST is not installed")
    found, _ = data._find_files(INSTALLED)
    return found


def _link_dir(directory: Path, files: dict[str, Path]) -> Path:
    """A fake dataset dir of symlinks (they resolve to the same files, so decoding is cached)."""
    directory.mkdir(parents=True)
    for path in files.values():
        (directory / path.name).symlink_to(path.resolve())
    return directory


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_labels_are_the_official_names_in_order() -> None:
    assert list(data.LABELS) == OFFICIAL_LABELS


@needs_real
def test_real_dataset_shapes_dtypes_and_balanced_labels() -> None:
    ds = data.load_fashion_mnist(INSTALLED, download=False)
    assert ds.train_images.shape == (60000, 28, 28)
    assert ds.test_images.shape == (10000, 28, 28)
    assert ds.train_labels.shape == (60000,)
    assert ds.test_labels.shape == (10000,)
    for array in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        assert array.dtype == np.uint8
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.source == INSTALLED


def test_read_idx_gzip_and_raw_detected_by_magic_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    # Names that lie about compression: the magic bytes decide.
    raw_named_gz = _write_idx(tmp_path / "images.gz", images)
    gz_named_raw = _write_idx(tmp_path / "images-idx3-ubyte", images, compress=True)
    labels_gz = _write_idx(tmp_path / "labels.gz", labels, compress=True)
    np.testing.assert_array_equal(data.read_idx(raw_named_gz), images)
    np.testing.assert_array_equal(data.read_idx(gz_named_raw), images)
    np.testing.assert_array_equal(data.read_idx(labels_gz), labels)
    assert data.read_idx(str(gz_named_raw)).dtype == np.uint8


def _valid_idx() -> bytes:
    return bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "wrong-magic": lambda b: b"\x12\x34" + b[2:],
    "wrong-dtype": lambda b: b[:2] + b"\x0d" + b[3:],
    "zero-dims": lambda b: b[:3] + b"\x00" + b[4:],
    "truncated-data": lambda b: b[:-1],
    "extra-data": lambda b: b + b"\x00",
    "truncated-header": lambda b: b[:6],
    "empty": lambda b: b"",
    "truncated-gzip": lambda b: gzip.compress(b)[:-12],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_idx_raises_value_error_naming_the_file(tmp_path: Path, corruption: str) -> None:
    path = tmp_path / f"{corruption}-idx2-ubyte"
    path.write_bytes(CORRUPTIONS[corruption](_valid_idx()))
    with pytest.raises(ValueError) as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_valid_idx_fixture_reads(tmp_path: Path) -> None:
    """The base of the corruptions above is itself valid, so each failure is the corruption's."""
    path = tmp_path / "ok"
    path.write_bytes(_valid_idx())
    np.testing.assert_array_equal(data.read_idx(path), np.arange(6).reshape(2, 3))


@needs_real
def test_search_order(
    real_files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    explicit = _link_dir(tmp_path / "explicit", real_files)
    env = _link_dir(tmp_path / "env", real_files)
    system = _link_dir(tmp_path / "system", real_files)
    cache = _link_dir(data.cache_dir(), real_files)
    monkeypatch.setattr(data, "SYSTEM_DIR", system)
    monkeypatch.setenv(data.ENV_VAR, str(env))

    assert data.load_fashion_mnist(explicit, download=False).source == explicit
    assert data.load_fashion_mnist(download=False).source == env
    monkeypatch.delenv(data.ENV_VAR)
    assert data.load_fashion_mnist(download=False).source == system
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system")
    assert data.load_fashion_mnist(download=False).source == cache

    # An explicit dir without the data falls through, but says so.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(env))
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        assert data.load_fashion_mnist(empty, download=False).source == env
    assert str(empty) in caplog.text


@needs_real
def test_raw_files_load_with_the_same_checksum(real_files: dict[str, Path], tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, path in real_files.items():
        content = path.read_bytes()
        (raw / name).write_bytes(
            gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
        )
    from_raw = data.load_fashion_mnist(raw, download=False)
    from_gz = data.load_fashion_mnist(INSTALLED, download=False)
    assert from_raw.source == raw
    assert from_raw.checksum == from_gz.checksum == EXPECTED_CHECKSUM
    np.testing.assert_array_equal(from_raw.test_images, from_gz.test_images)
    np.testing.assert_array_equal(from_raw.train_labels, from_gz.train_labels)


@needs_real
def test_checksum_is_sha256_of_contents_in_fixed_order(real_files: dict[str, Path]) -> None:
    expected = hashlib.sha256()
    for name in data.FILES:
        expected.update(gzip.decompress(real_files[name].read_bytes()))
    data._decode.cache_clear()
    first = data.load_fashion_mnist(INSTALLED, download=False)
    data._decode.cache_clear()
    second = data.load_fashion_mnist(INSTALLED, download=False)
    assert first.checksum == second.checksum == expected.hexdigest() == EXPECTED_CHECKSUM


@needs_real
def test_repeated_loads_share_decoded_arrays() -> None:
    first = data.load_fashion_mnist(INSTALLED, download=False)
    second = data.load_fashion_mnist(INSTALLED, download=False)
    assert second.train_images is first.train_images
    assert not first.train_images.flags.writeable  # shared, so nobody may change them


def _fake_dataset(directory: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """A valid IDX set of the right layout whose content is not Fashion-MNIST."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, compress=True)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return directory


def test_verify_rejects_other_content_and_verify_false_accepts_it(tmp_path: Path) -> None:
    fake = _fake_dataset(tmp_path / "fake")
    with pytest.raises(data.ChecksumError) as err:
        data.load_fashion_mnist(fake, download=False)
    message = str(err.value)
    assert str(fake / "train-images-idx3-ubyte.gz") in message
    assert data.CONTENT_MD5["train-images-idx3-ubyte"] in message
    actual = hashlib.md5(gzip.decompress((fake / "train-images-idx3-ubyte.gz").read_bytes()))
    assert actual.hexdigest() in message

    ds = data.load_fashion_mnist(fake, download=False, verify=False)
    assert ds.train_images.shape == (20, 28, 28)
    assert ds.test_labels.tolist() == list(range(10))
    assert ds.source == fake


def test_mismatched_image_and_label_counts_are_rejected(tmp_path: Path) -> None:
    fake = _fake_dataset(tmp_path / "fake")
    _write_idx(fake / "t10k-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.load_fashion_mnist(fake, download=False, verify=False)


def _serve(directory: Path, files: dict[str, Path]) -> tuple[str, dict[str, str]]:
    """A file:// URL base serving the .gz files, and the MD5 table that those files satisfy."""
    directory.mkdir()
    md5s = {}
    for name, path in files.items():
        content = path.read_bytes()
        if content[:2] != b"\x1f\x8b":
            content = gzip.compress(content)
        (directory / f"{name}.gz").write_bytes(content)
        md5s[name] = hashlib.md5(content).hexdigest()
    return directory.as_uri() + "/", md5s


@needs_real
def test_download_with_matching_md5s_fills_the_cache(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system")
    url_base, md5s = _serve(tmp_path / "server", real_files)
    ds = data.load_fashion_mnist(url_base=url_base, gz_md5=md5s)
    cache = data.cache_dir()
    assert ds.source == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in data.FILES)
    assert ds.checksum == EXPECTED_CHECKSUM
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10


@needs_real
def test_corrupt_download_is_deleted_and_named(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system")
    url_base, md5s = _serve(tmp_path / "server", real_files)
    served = tmp_path / "server" / "t10k-labels-idx1-ubyte.gz"
    corrupt = bytearray(served.read_bytes())
    corrupt[100] ^= 0xFF
    served.write_bytes(bytes(corrupt))
    actual = _md5(served)

    dest = tmp_path / "dest"
    with pytest.raises(data.ChecksumError) as err:
        data.download_dataset(dest, url_base=url_base, md5s=md5s)
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert md5s["t10k-labels-idx1-ubyte"] in message and actual in message
    # The good files stay (they were verified); the bad one and every temporary file are gone.
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in data.FILES[:3])

    # Through the loader it is one more place that failed, with the same detail.
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_fashion_mnist(url_base=url_base, gz_md5=md5s)
    assert md5s["t10k-labels-idx1-ubyte"] in str(err.value) and actual in str(err.value)
    assert not (data.cache_dir() / "t10k-labels-idx1-ubyte.gz").exists()


def test_download_checks_the_official_md5s_by_default(tmp_path: Path) -> None:
    server = tmp_path / "server"
    server.mkdir()
    (server / "train-images-idx3-ubyte.gz").write_bytes(b"not the real file")
    dest = tmp_path / "dest"
    with pytest.raises(data.ChecksumError) as err:
        data.download_dataset(dest, url_base=server.as_uri() + "/")
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in message
    assert hashlib.md5(b"not the real file").hexdigest() in message
    assert list(dest.iterdir()) == []


def test_not_found_lists_every_place_and_the_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "explicit"
    env = tmp_path / "env"
    env.mkdir()
    _write_idx(env / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    system = tmp_path / "no-system"
    monkeypatch.setattr(data, "SYSTEM_DIR", system)
    monkeypatch.setenv(data.ENV_VAR, str(env))
    empty_server = tmp_path / "server"
    empty_server.mkdir()
    url_base = empty_server.as_uri() + "/"

    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_fashion_mnist(explicit, url_base=url_base)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    for place in (explicit, env, system, data.cache_dir()):
        assert str(place) in message
    assert "missing train-images-idx3-ubyte, t10k-images" in message  # env holds one file
    assert f"{url_base}train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FMNIST_DIR" in message and "--data-dir" in message and "download" in message

    with pytest.raises(data.DatasetNotFoundError, match="download=False"):
        data.load_fashion_mnist(explicit, download=False)


def test_stats_of_known_pixels() -> None:
    mean, std = data.stats(np.array([[0, 255], [0, 255]], dtype=np.uint8))
    assert (mean, std) == (0.5, 0.5)
    with pytest.raises(TypeError):
        data.stats(np.zeros(3, dtype=np.float32))


@needs_real
def test_training_stats_match_the_model_constants() -> None:
    base = pytest.importorskip("export.models.base")  # needs torch (the export extra)
    ds = data.load_fashion_mnist(INSTALLED, download=False)
    mean, std = data.stats(ds.train_images)
    assert mean == pytest.approx(base.FMNIST_MEAN, abs=5e-4)
    assert std == pytest.approx(base.FMNIST_STD, abs=5e-4)
