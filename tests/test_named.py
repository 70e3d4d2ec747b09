"""Named datasets downloaded from a real HTTP server on 127.0.0.1 that serves small files made here in exactly the
published formats: CIFAR-10's Python archive (Python 2 pickles in a .tar.gz), dSprites' .npz, gzipped IDX."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vaelab import data as D
from vaelab.data import load_dataset
from vaelab.errors import DataError


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _serve_as(monkeypatch, name: str, url: str, root: Path) -> None:
    """Point the registry entry at the local server, with the checksums of the files it serves."""
    spec = D.REGISTRY[name]
    files = {role: dataclasses.replace(f, md5=_md5(root / f.name), sha256=None) for role, f in spec.files.items()}
    monkeypatch.setitem(D.REGISTRY, name, dataclasses.replace(spec, mirrors=(url,), files=files))


# ------------------------------------------------------------------------------------------- CIFAR-10
class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's cPickle wrote str (BINSTRING), as in the published CIFAR-10 batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1 (which wrote the archive) named its array rebuilder numpy.core.multiarray._reconstruct
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_archive(path: Path, n: int = 6, evil: bytes | None = None) -> dict:
    rng = np.random.default_rng(0)
    made = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, payload: bytes):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, n).tolist()
            made[name] = (x, y)
            add(name, evil if evil is not None and name == "test_batch" else _py2_pickle(
                {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}))
        add("batches.meta", _py2_pickle({b"label_names": [c.encode() for c in (
            "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": n, b"num_vis": 3072}))
        add("readme.html", b"<html>CIFAR-10</html>")
    return made


def test_cifar10_downloads_and_reads_the_python_archive(http_root, tmp_path, monkeypatch):
    root, url = http_root
    made = _cifar_archive(root / "cifar-10-python.tar.gz")
    _serve_as(monkeypatch, "cifar10", url, root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    data = load_dataset("cifar10")
    assert (tmp_path / "home-cache" / "vaelab" / "cifar10" / "cifar-10-python.tar.gz").is_file()
    assert data.train.shape == (30, 3, 32, 32)
    assert data.test.shape == (6, 3, 32, 32)
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
    assert isinstance(data.train, np.memmap)
    x, y = made["data_batch_2"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32
    assert np.array_equal(data.train[6], x[0].reshape(3, 32, 32))
    assert data.train_labels[6] == y[0]
    assert data.train[6, 1, 0, 0] == x[0, 1024]
    assert np.array_equal(data.test_labels, made["test_batch"][1])


def test_cifar10_pickle_naming_anything_but_numpy_is_refused(tmp_path, monkeypatch):
    evil = b"cos\nsystem\n(S'echo owned > " + str(tmp_path / "owned").encode() + b"'\ntR."
    d = tmp_path / "data"
    d.mkdir()
    _cifar_archive(d / "cifar-10-python.tar.gz", evil=evil)
    spec = D.REGISTRY["cifar10"]
    files = {r: dataclasses.replace(f, md5=_md5(d / f.name)) for r, f in spec.files.items()}
    monkeypatch.setitem(D.REGISTRY, "cifar10", dataclasses.replace(spec, files=files))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR-10 batch \(refusing to load os.system"):
        load_dataset("cifar10", data_dir=str(d))
    assert not (tmp_path / "owned").exists()


# ------------------------------------------------------------------------------------------- dSprites
def _dsprites_npz(path: Path, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(1)
    imgs = (rng.random((n, 64, 64)) < 0.1).astype(np.uint8)  # 0/1, as published
    classes = np.stack([np.zeros(n, np.int64), rng.integers(0, 3, n), rng.integers(0, 6, n),
                        rng.integers(0, 40, n), rng.integers(0, 32, n), rng.integers(0, 32, n)], axis=1)
    values = classes.astype(np.float64) / 10
    metadata = np.array({"date": "April 2017", "latents_names": ("color", "shape", "scale", "orientation",
                                                                  "posX", "posY")}, dtype=object)
    np.savez_compressed(path, imgs=imgs, latents_classes=classes, latents_values=values, metadata=metadata)
    return imgs, classes


def test_dsprites_downloads_and_keeps_its_factors(http_root, tmp_path, monkeypatch):
    root, url = http_root
    imgs, classes = _dsprites_npz(root / D.REGISTRY["dsprites"].files["npz"].name)
    _serve_as(monkeypatch, "dsprites", url, root)
    dest = D.download("dsprites", tmp_path / "dl", timeout=10, progress=False)
    data = load_dataset("dsprites", data_dir=str(dest))
    assert data.shape == (1, 64, 64)
    assert len(data.train) == 36
    assert len(data.test) == 4
    assert data.factor_names == ["shape", "scale", "orientation", "x", "y"]
    assert data.classes == ["square", "ellipse", "heart"]
    assert set(np.unique(data.train)) <= {0, 255}
    train_rows, test_rows = D.core.split_rows(40)
    assert np.array_equal(data.train[:, 0], imgs[train_rows] * 255)
    assert np.array_equal(data.test_factors, classes[test_rows, 1:].astype(np.float32))
    assert np.array_equal(data.train_labels, classes[train_rows, 1])


def test_a_wrong_checksum_is_refused_and_leaves_nothing(http_root, tmp_path, monkeypatch):
    root, url = http_root
    _dsprites_npz(root / D.REGISTRY["dsprites"].files["npz"].name)
    spec = D.REGISTRY["dsprites"]
    monkeypatch.setitem(D.REGISTRY, "dsprites", dataclasses.replace(spec, mirrors=("http://127.0.0.1:9/", url)))
    with pytest.raises(DataError, match=r"127.0.0.1:9.*Connection refused.*checksum mismatch"):
        D.download("dsprites", tmp_path / "dl", timeout=10, progress=False)
    assert not (tmp_path / "dl").exists()


# ------------------------------------------------------------------------------------------- MNIST (IDX .gz)
def _idx(dims, payload: bytes) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def test_mnist_downloads_tiny_idx_files(http_root, tmp_path, monkeypatch):
    root, url = http_root
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    payloads = {"train-images-idx3-ubyte.gz": _idx([7, 28, 28], x.tobytes()),
                "train-labels-idx1-ubyte.gz": _idx([7], bytes(range(7))),
                "t10k-images-idx3-ubyte.gz": _idx([2, 28, 28], bytes(2 * 784)),
                "t10k-labels-idx1-ubyte.gz": _idx([2], bytes(2))}
    for name, payload in payloads.items():
        (root / name).write_bytes(gzip.compress(payload))
    _serve_as(monkeypatch, "mnist", url, root)
    dest = D.download("mnist", tmp_path / "dl", timeout=10, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(payloads)  # no partial files left
    data = load_dataset("mnist", data_dir=str(dest))
    assert np.array_equal(data.train[:, 0], x)
    assert data.train_labels.tolist() == list(range(7))


def test_celeba_needs_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    with pytest.raises(DataError, match=r"img_align_celeba.*--data-dir"):
        load_dataset("celeba", data_dir=str(tmp_path))


def test_celeba_folder_is_cropped_and_resized_to_64(tmp_path):
    from PIL import Image

    d = tmp_path / "celeba" / "img_align_celeba"
    d.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (178, 218), (10 * i, 100, 200)).save(d / f"{i:06d}.jpg", quality=95)
    data = load_dataset("celeba", data_dir=str(tmp_path))
    assert data.name == "celeba"
    assert data.shape == (3, 64, 64)


def test_image_size_is_refused_where_it_does_not_apply(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 4), np.uint8))
    for dataset in ("shapes", str(tmp_path / "x.npy")):
        with pytest.raises(DataError, match="--image-size and --center-crop apply to image folders and celeba"):
            load_dataset(dataset, image_size=32)
