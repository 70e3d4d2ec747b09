"""Datasets: the IDX reader on real files, user arrays and folders, validation, lookup and download."""

import dataclasses
import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaelab import data as D
from vaelab.data import load_dataset, read_idx
from vaelab.errors import DataError


def test_fashion_mnist_official_split(fashion):
    assert fashion.train.shape == (60000, 1, 28, 28)
    assert fashion.train.dtype == np.uint8
    assert fashion.test.shape == (10000, 1, 28, 28)
    assert sorted(np.unique(fashion.train_labels)) == list(range(10))
    assert np.bincount(fashion.test_labels).tolist() == [1000] * 10  # the official test split is balanced
    assert fashion.classes[9] == "Ankle boot"
    assert not fashion.is_binary


def test_idx_reads_plain_and_gzipped_identically(fashion_dir, tmp_path):
    gz = fashion_dir / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    assert np.array_equal(read_idx(gz), read_idx(raw))


def _idx(dims, payload: bytes) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@pytest.mark.parametrize(("content", "needle"), [
    (b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad IDX magic"),
    (b"", "bad IDX magic"),
    (_idx([5, 2, 2], bytes(19)), "truncated or corrupt"),
    (bytes([0, 0, 8, 3, 0, 0]), "truncated IDX header"),
])
def test_idx_validation(tmp_path, content, needle):
    p = tmp_path / "bad-idx"
    p.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        read_idx(p)


def test_truncated_gzip_is_a_clear_error(fashion_dir, tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes((fashion_dir / "train-labels-idx1-ubyte.gz").read_bytes()[:5000])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(p)


def _make_idx_dir(tmp_path, n_train=12, n_train_labels=12):
    d = tmp_path / "idx"
    d.mkdir()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": _idx([n_train, 4, 4], rng.integers(0, 255, n_train * 16, np.uint8).tobytes()),
             "train-labels-idx1-ubyte": _idx([n_train_labels], bytes(n_train_labels)),
             "t10k-images-idx3-ubyte": _idx([3, 4, 4], bytes(48)),
             "t10k-labels-idx1-ubyte": _idx([3], bytes(3))}
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


def test_data_dir_is_looked_at_first(tmp_path):
    d = _make_idx_dir(tmp_path)
    data = load_dataset("fashion-mnist", data_dir=str(d))
    assert data.train.shape == (12, 1, 4, 4)
    assert data.source == str(d)


def test_image_label_count_mismatch(tmp_path):
    d = _make_idx_dir(tmp_path, n_train=12, n_train_labels=11)
    with pytest.raises(DataError, match="12 images but 11 labels"):
        load_dataset("fashion-mnist", data_dir=str(d))


def test_vaelab_data_env_is_used(tmp_path, monkeypatch):
    d = _make_idx_dir(tmp_path)
    monkeypatch.setenv("VAELAB_DATA", str(d))
    assert load_dataset("mnist").train.shape == (12, 1, 4, 4)


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    closed = dataclasses.replace(D.REGISTRY["mnist"], mirrors=("http://127.0.0.1:9/",))  # a closed port
    monkeypatch.setitem(D.REGISTRY, "mnist", closed)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg
    assert "cache" in msg
    assert "download failed" in msg
    assert "--data-dir" in msg


def test_limit_takes_the_first_images(fashion):
    small = fashion.limited(100)
    assert np.array_equal(small.train, fashion.train[:100])
    assert len(small.test) == 10000


# ------------------------------------------------------------------------------------------- user arrays
@pytest.mark.parametrize("shape", [(20, 9, 7), (20, 1, 9, 7), (20, 3, 9, 7), (20, 9, 7, 3)])
def test_npy_shapes_become_nchw(tmp_path, shape):
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    p = tmp_path / "x.npy"
    np.save(p, x)
    data = load_dataset(str(p))
    c = 3 if 3 in shape[1:2] + shape[3:] else 1
    assert data.shape == (c, 9, 7)
    assert len(data.train) + len(data.test) == 20
    assert len(data.test) == 2


def test_npz_with_splits_and_labels_and_float(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rng.random((10, 5, 6)).astype(np.float32), x_test=rng.random((4, 5, 6)),
             y_train=np.arange(10) % 3, y_test=np.arange(4) % 3)
    data = load_dataset(str(p))
    assert data.train.dtype == np.float32
    assert data.train.shape == (10, 1, 5, 6)
    assert data.test_labels.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize(("arrays", "needle"), [
    ({"x": np.full((5, 4, 4), np.nan, np.float32)}, "NaN"),
    ({"x": np.full((5, 4, 4), 1.5, np.float32)}, r"float pixel values must lie in \[0, 1\]"),
    ({"x": np.full((5, 4, 4), 300, np.int32)}, "0-255"),
    ({"x": np.zeros((5, 4), np.uint8)}, "rank 3"),
    ({"x": np.zeros((0, 4, 4), np.uint8)}, "no images"),
    ({"x": np.zeros((5, 4, 4), np.uint8), "y": np.zeros(4)}, "length 5"),
    ({"x_train": np.zeros((5, 4, 4), np.uint8)}, "no test array"),
    ({"x_train": np.zeros((5, 4, 4), np.uint8), "x_test": np.zeros((5, 4, 3), np.uint8)}, "test images are"),
    ({"pixels": np.zeros((5, 4, 4), np.uint8)}, "keys present"),
])
def test_bad_arrays(tmp_path, arrays, needle):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=needle):
        load_dataset(str(p))


def test_not_a_numpy_file(tmp_path):
    p = tmp_path / "x.npy"
    p.write_text("hello")
    with pytest.raises(DataError, match="cannot read as a numpy file"):
        load_dataset(str(p))


# ------------------------------------------------------------------------------------------- image folders
def _save_png(path: Path, value: int, size=(6, 5), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_image_folder_subfolders_become_labels(tmp_path):
    for cls, v in (("cat", 10), ("dog", 200)):
        for i in range(10):
            _save_png(tmp_path / "imgs" / cls / f"{i}.png", v)
    data = load_dataset(str(tmp_path / "imgs"))
    assert data.classes == ["cat", "dog"]
    assert data.shape == (1, 5, 6)
    x = np.concatenate([data.train, data.test])
    y = np.concatenate([data.train_labels, data.test_labels])
    assert set(x[y == 0].ravel()) == {10}
    assert set(x[y == 1].ravel()) == {200}


def test_image_folder_rgb_and_train_test(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            _save_png(tmp_path / "rgb" / split / f"{i}.jpg", 100, size=(8, 3), mode="RGB")
    data = load_dataset(str(tmp_path / "rgb"))
    assert data.train.shape == (4, 3, 3, 8)
    assert data.test.shape == (2, 3, 3, 8)
    assert data.train_labels is None


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))


def test_unreadable_image(tmp_path):
    _save_png(tmp_path / "f" / "a.png", 1)
    (tmp_path / "f" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png: cannot decode it.*--skip-bad-images"):
        load_dataset(str(tmp_path / "f"))


def test_mixed_sizes(tmp_path):
    _save_png(tmp_path / "f" / "a.png", 1, size=(4, 4))
    _save_png(tmp_path / "f" / "b.png", 1, size=(5, 4))
    with pytest.raises(DataError, match=r"images differ in size.*--image-size"):
        load_dataset(str(tmp_path / "f"))


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="mnist, fashion-mnist"):
        load_dataset("cifar-99")


# ------------------------------------------------------------------------------------------- download
def test_download_real_files_from_local_mirror(fashion_dir, http_root, tmp_path):
    root, url = http_root
    for f in D.REGISTRY["fashion-mnist"].files.values():
        shutil.copy(fashion_dir / f.name, root / f.name)
    dest = D.download("fashion-mnist", tmp_path / "cache", mirrors=["http://127.0.0.1:9/", url], timeout=10,
                      progress=False)
    got = sorted(p.name for p in dest.iterdir())
    assert got == sorted(f.name for f in D.REGISTRY["fashion-mnist"].files.values())  # no .part files left
    for f in D.REGISTRY["fashion-mnist"].files.values():  # checked on the decompressed content
        assert hashlib.sha256(gzip.decompress((dest / f.name).read_bytes())).hexdigest() == f.sha256
    assert read_idx(dest / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)


def test_download_rejects_bad_checksum_and_leaves_nothing(fashion_dir, http_root, tmp_path):
    root, url = http_root
    for f in D.REGISTRY["fashion-mnist"].files.values():
        shutil.copy(fashion_dir / f.name, root / f.name)
    corrupt = bytearray(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    corrupt[100] ^= 1
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(corrupt)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*checksum mismatch"):
        D.download("fashion-mnist", tmp_path / "cache", mirrors=[url], timeout=10, progress=False)
    assert not (tmp_path / "cache" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((tmp_path / "cache").glob("*.part"))


def test_failed_download_leaves_no_empty_cache_folder(tmp_path):
    dest = tmp_path / "cache" / "fashion-mnist"
    with pytest.raises(DataError, match="could not download fashion-mnist"):
        D.download("fashion-mnist", dest, mirrors=["http://127.0.0.1:9/"], timeout=5, progress=False)
    assert not dest.exists()
