"""Named datasets: the registry (mnist, fashion-mnist, cifar10, dsprites), where each is looked for, and the
download (through pooch, checksums verified before a file is moved into place)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pooch
import requests

from ..errors import DataError
from . import archives
from .core import ImageData
from .idx import read_idx


@dataclass(frozen=True)
class RemoteFile:
    name: str  # e.g. train-images-idx3-ubyte.gz
    md5: str  # of the published .gz
    sha256: str | None = None  # of the decompressed content (accepted for re-compressed copies)


@dataclass(frozen=True)
class NamedDataset:
    name: str
    mirrors: tuple[str, ...]
    files: dict[str, RemoteFile]  # role (train_images, ...) -> file
    system_dirs: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    homepage: str = ""
    kind: str = "idx"  # how the files are read: idx, cifar10 (Python archive), dsprites (.npz)


REGISTRY: dict[str, NamedDataset] = {
    "mnist": NamedDataset(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files={
            "train_images": RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train_labels": RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            "test_images": RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            "test_labels": RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        system_dirs=("/usr/share/datasets/mnist",),
        classes=tuple(str(i) for i in range(10)),
        homepage="the MNIST database (yann.lecun.com/exdb/mnist)",
    ),
    "fashion-mnist": NamedDataset(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        files={
            "train_images": RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            "train_labels": RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                                       "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            "test_images": RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                                      "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            "test_labels": RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                                      "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
        homepage="github.com/zalandoresearch/fashion-mnist (Debian: apt-get install dataset-fashion-mnist)",
    ),
    "cifar10": NamedDataset(
        name="cifar10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files={"archive": RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")},
        homepage="the CIFAR-10 page (www.cs.toronto.edu/~kriz/cifar.html), its Python version",
        kind="cifar10",
    ),
    "dsprites": NamedDataset(
        name="dsprites",
        mirrors=("https://github.com/google-deepmind/dsprites-dataset/raw/master/",),
        files={"npz": RemoteFile("dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
                                 "7da33b31b13a06f4b04a70402ce90c2e")},
        homepage="github.com/google-deepmind/dsprites-dataset",
        kind="dsprites",
    ),
}
NAMES = (*REGISTRY, "celeba", "shapes")  # celeba: a local folder only; shapes: generated


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vaelab"


def search_dirs(spec: NamedDataset, data_dir: str | None = None) -> list[Path]:
    """Where a named dataset is looked for, in order."""
    dirs: list[Path] = []
    for base in (data_dir, os.environ.get("VAELAB_DATA")):
        if base:
            dirs += [Path(base) / spec.name, Path(base)]
    dirs.append(cache_dir() / spec.name)
    dirs += [Path(d) for d in spec.system_dirs]
    return dirs


def _find_file(directory: Path, f: RemoteFile) -> Path | None:
    for candidate in dict.fromkeys((f.name, f.name.removesuffix(".gz"))):
        p = directory / candidate
        if p.is_file():
            return p
    return None


def _file_in(directory: Path, f: RemoteFile) -> Path:
    """`f` in a folder that locate() or download() found complete."""
    p = _find_file(directory, f)
    if p is None:
        raise DataError(f"{directory}: {f.name} is missing")
    return p


def locate(spec: NamedDataset, data_dir: str | None = None) -> Path | None:
    for d in search_dirs(spec, data_dir):
        if all(_find_file(d, f) for f in spec.files.values()):
            return d
    return None


def _digests(path: Path) -> tuple[str, str | None]:
    """md5 of the file as stored, sha256 of its decompressed content (None if it is not gzip)."""
    with open(path, "rb") as fh:
        md5 = _hash_stream(fh, hashlib.md5(usedforsecurity=False))
    try:
        with gzip.open(path, "rb") as gz:
            sha = _hash_stream(gz, hashlib.sha256())
    except (OSError, EOFError):
        sha = None
    return md5, sha


def _hash_stream(fh, h) -> str:
    while chunk := fh.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def verify(path: Path, f: RemoteFile) -> bool:
    if f.sha256 is None:
        with open(path, "rb") as fh:
            return _hash_stream(fh, hashlib.md5(usedforsecurity=False)) == f.md5
    md5, sha = _digests(path)
    return md5 == f.md5 or (f.sha256 is not None and sha == f.sha256)


def download(name: str, dest: str | os.PathLike | None = None, mirrors: Sequence[str] | None = None,
             timeout: float = 60.0, progress: bool = True) -> Path:
    """Download a named dataset into `dest` (default: the user cache), verifying every file's checksum.

    Files are written to a temporary name and moved into place only after their checksum matches, so an
    interrupted or corrupt download never leaves a file that looks complete.
    """
    spec = get_spec(name)
    dest = Path(dest) if dest is not None else cache_dir() / spec.name
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = list(mirrors) if mirrors is not None else list(spec.mirrors)
    try:
        _download_files(spec, dest, mirrors, timeout, progress)
    except DataError:
        if created:  # a folder this call made and nothing verified landed in: leave no empty cache behind
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise
    return dest


def _download_files(spec: NamedDataset, dest: Path, mirrors: list[str], timeout: float, progress: bool) -> None:
    """Every file of `spec` into `dest`, trying the mirrors in turn. pooch downloads (temporary file, progress
    bar, MD5 check); a file is moved into `dest` only once its checksum matches, so nothing half-downloaded
    or corrupt is ever found there."""
    staging = dest / ".download"
    try:
        for f in spec.files.values():
            target = dest / f.name
            if target.is_file() and verify(target, f):
                continue
            errors = []
            for mirror in mirrors:
                url = mirror.rstrip("/") + "/" + f.name
                # Fashion-MNIST also exists re-compressed (e.g. Debian's copy): its .gz then has another MD5, so
                # those files are checked here on their decompressed content instead of by pooch
                known = None if f.sha256 else f"md5:{f.md5}"
                try:
                    got = Path(pooch.retrieve(url, known, fname=f.name, path=staging, progressbar=progress,
                                              downloader=pooch.HTTPDownloader(progressbar=progress,
                                                                              timeout=timeout)))
                except ValueError as e:  # pooch: the hash does not match (it has deleted the file)
                    errors.append(f"{url}: checksum mismatch ({e})")
                    continue
                except (requests.RequestException, OSError) as e:
                    errors.append(f"{url}: {_reason(e)}")
                    continue
                if not verify(got, f):
                    got.unlink(missing_ok=True)
                    errors.append(f"{url}: checksum mismatch")
                    continue
                got.replace(target)
                break
            else:
                raise DataError(f"could not download {spec.name} file {f.name}: " + "; ".join(errors))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reason(e: Exception) -> str:
    text = str(e)
    for needle in ("Connection refused", "timed out", "Name or service not known", "404", "403"):
        if needle in text:
            return needle
    return text[:200]


def get_spec(name: str) -> NamedDataset:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; named datasets: {', '.join(NAMES)}, "
                        "or give a path to a .npz/.npy file or an image folder")
    return REGISTRY[name]


def load_named(name: str, data_dir: str | None = None, allow_download: bool = True,
               progress: bool = False) -> ImageData:
    spec = get_spec(name)
    directory = locate(spec, data_dir)
    if directory is None:
        looked = [str(d) for d in search_dirs(spec, data_dir)]
        if not allow_download:
            raise DataError(f"{name} not found; looked in {', '.join(looked)}")
        try:
            directory = download(name, progress=progress)
        except DataError as e:
            what = "the four IDX files" if spec.kind == "idx" else f"{next(iter(spec.files.values())).name}"
            raise DataError(
                f"{name} not found and the download failed ({e}). Looked in: {', '.join(looked)}. "
                f"Put {what} from {spec.homepage} in one of those folders, or pass --data-dir DIR "
                "or set VAELAB_DATA") from e
    if spec.kind != "idx":
        path = _file_in(directory, next(iter(spec.files.values())))
        return (archives.load_cifar10 if spec.kind == "cifar10" else archives.load_dsprites)(path, progress)
    arrays = {role: read_idx(_file_in(directory, f)) for role, f in spec.files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{directory}: {split} images must be rank 3 and labels rank 1, "
                            f"got shapes {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
    return ImageData(name, arrays["train_images"][:, None], arrays["test_images"][:, None],
                     arrays["train_labels"].astype(np.int64), arrays["test_labels"].astype(np.int64),
                     list(spec.classes), str(directory))
