"""Datasets: the IDX reader, the named-dataset registry with download and cache, arrays and image folders.

Everything ends in an `ImageData`: train/test arrays shaped (N, C, H, W), uint8 in 0..255 or float32 in [0, 1],
with optional integer labels. Pixels are scaled to [0, 1] per batch by `to_unit`, never stored twice.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """The data is missing or malformed; the message says what was found and what is expected."""


def _only_values(a: np.ndarray, lo, hi, chunk: int = 1 << 20) -> bool:
    """True when every element of `a` is lo or hi; checked in chunks, stopping at the first other value
    (np.isin on the whole array held ~500 MB of temporaries for Fashion-MNIST's 47 MB)."""
    flat = a.reshape(-1)
    return all(bool(((c == lo) | (c == hi)).all()) for c in (flat[i:i + chunk] for i in range(0, flat.size, chunk)))


@dataclass
class ImageData:
    name: str
    train: np.ndarray  # (N, C, H, W) uint8 or float32
    test: np.ndarray  # (M, C, H, W)
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    classes: list[str] | None = None
    source: str = ""
    # named factors of variation (shapes, dsprites): (N, F) values, one column per name; the labels above stay
    # the one class label the scatter and the k-NN agreement use
    train_factors: np.ndarray | None = None
    test_factors: np.ndarray | None = None
    factor_names: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # files left out of an image folder, by reason

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    @property
    def is_binary(self) -> bool:
        """True when every pixel is exactly 0 or 1 on the [0, 1] scale."""
        top = 255 if self.train.dtype == np.uint8 else 1
        return all(_only_values(a, 0, top) for a in (self.train, self.test))

    def limited(self, n: int | None) -> ImageData:
        if n is None:
            return self
        labels = None if self.train_labels is None else self.train_labels[:n]
        factors = None if self.train_factors is None else self.train_factors[:n]
        return replace(self, train=self.train[:n], train_labels=labels, train_factors=factors)


def to_unit(x):
    """uint8 0..255 or float [0, 1] (numpy or torch) -> float32 torch tensor in [0, 1]."""
    import torch

    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).mul_(1.0 / 255.0)
    return t.to(torch.float32)


# ----------------------------------------------------------------------------------------------- IDX format
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array, checking magic number and size."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; "
                        "expected 00 00 <type> <rank> (type 08 for uint8 images/labels)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX file is {len(raw)} bytes but its header {dims} needs {expected}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------------------------- registry
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


def locate(spec: NamedDataset, data_dir: str | None = None) -> Path | None:
    for d in search_dirs(spec, data_dir):
        if all(_find_file(d, f) for f in spec.files.values()):
            return d
    return None


def _digests(path: Path) -> tuple[str, str | None]:
    """md5 of the file as stored, sha256 of its decompressed content (None if it is not gzip)."""
    md5 = _hash_stream(open(path, "rb"), hashlib.md5(usedforsecurity=False))
    try:
        sha = _hash_stream(gzip.open(path, "rb"), hashlib.sha256())
    except (OSError, EOFError):
        sha = None
    return md5, sha


def _hash_stream(fh, h) -> str:
    with fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, f: RemoteFile) -> bool:
    if f.sha256 is None:
        return _hash_stream(open(path, "rb"), hashlib.md5(usedforsecurity=False)) == f.md5
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
    from .namedsets import fetch

    fetch(spec, dest, mirrors, timeout, progress, verify)


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
        from . import namedsets

        path = _find_file(directory, next(iter(spec.files.values())))
        return (namedsets.load_cifar10 if spec.kind == "cifar10" else namedsets.load_dsprites)(path, progress)
    arrays = {role: read_idx(_find_file(directory, f)) for role, f in spec.files.items()}  # type: ignore[arg-type]
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


# ----------------------------------------------------------------------------------------------- user data
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TEST_FRACTION = 0.1


def check_images(x: np.ndarray, where: str) -> np.ndarray:
    """Validate an image array and return it as (N, C, H, W) uint8 or float32 in [0, 1]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = np.moveaxis(x, -1, 1)  # channels-last -> (N, C, H, W)
    else:
        raise DataError(f"{where}: images must have rank 3 (N,H,W) or 4 (N,C,H,W); got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: no images (shape {x.shape})")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return np.ascontiguousarray(x.astype(np.uint8) * 255)
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer pixel values must lie in 0-255; got range [{lo}, {hi}]")
        return np.ascontiguousarray(x.astype(np.uint8))
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 0-255 or float in [0, 1]; got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{where}: float pixel values must lie in [0, 1] (or use uint8 0-255); "
                        f"got range [{lo:g}, {hi:g}]")
    return np.ascontiguousarray(x)


def _check_labels(y, n: int, where: str) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels must be a 1-D array of length {n} (one per image); got shape {y.shape}")
    return y.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray | None, seed: int = 0):
    n = len(x)
    if n < 2:
        raise DataError(f"need at least 2 images to hold out a test split; got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    te, tr = order[:n_test], order[n_test:]
    return x[tr], x[te], (None if y is None else y[tr]), (None if y is None else y[te])


_NPZ_KEYS = {"train": ("x_train", "train_images", "train"), "test": ("x_test", "test_images", "test"),
             "train_labels": ("y_train", "train_labels"), "test_labels": ("y_test", "test_labels"),
             "all": ("x", "images", "data", "arr_0"), "labels": ("y", "labels", "arr_1")}


def _pick(z, role):
    for k in _NPZ_KEYS[role]:
        if k in z:
            return z[k]
    return None


def load_array_file(path: Path) -> ImageData:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as a numpy file ({e})") from e
    if isinstance(z, np.ndarray):
        x = check_images(z, str(path))
        return ImageData(path.stem, *_split(x, None), source=str(path))  # type: ignore[misc]
    with z:
        train, test = _pick(z, "train"), _pick(z, "test")
        if train is not None:
            if test is None:
                raise DataError(f"{path}: has a train array but no test array (x_test or test_images)")
            tr, te = check_images(train, f"{path}[train]"), check_images(test, f"{path}[test]")
            if tr.shape[1:] != te.shape[1:]:
                raise DataError(f"{path}: train images are {tr.shape[1:]} but test images are {te.shape[1:]}")
            ytr = _check_labels(_pick(z, "train_labels"), len(tr), f"{path}[train labels]")
            yte = _check_labels(_pick(z, "test_labels"), len(te), f"{path}[test labels]")
            return ImageData(path.stem, tr, te, ytr, yte, source=str(path))
        x = _pick(z, "all")
        if x is None:
            raise DataError(f"{path}: no image array found; keys present: {sorted(z.keys())}; expected "
                            "x (and optional y) or x_train/x_test (and optional y_train/y_test)")
        x = check_images(x, str(path))
        y = _check_labels(_pick(z, "labels"), len(x), f"{path}[labels]")
        return ImageData(path.stem, *_split(x, y), source=str(path))  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- entry point
def load_dataset(dataset: str, data_dir: str | None = None, limit: int | None = None,
                 allow_download: bool = True, *, image_size=None, center_crop=None, background: str = "white",
                 skip_bad_images: bool = False, progress: bool = False) -> ImageData:
    """A registered name (mnist, fashion-mnist) or a path to a .npz/.npy file or an image folder.

    Image folders: `image_size` (N or (H, W)) resizes the shorter side and centre-crops, `center_crop` crops
    first, transparent pixels are composited over `background` (white or black); `skip_bad_images` leaves
    undecodable files out instead of stopping at the first."""
    if dataset == "shapes":
        from .shapes import load_shapes

        data = load_shapes(progress=progress)
    elif dataset == "celeba":
        from .namedsets import load_celeba

        dirs = [Path(d) for d in (data_dir, os.environ.get("VAELAB_DATA")) if d] + [cache_dir()]
        data = load_celeba(dirs, skip_bad_images, progress)
    elif dataset in REGISTRY:
        data = load_named(dataset, data_dir, allow_download, progress)
    else:
        path = Path(dataset).expanduser()
        if path.is_dir():
            from .imagefolders import Options, load_image_folder, parse_size

            opts = Options(parse_size(image_size, "--image-size"), parse_size(center_crop, "--center-crop"),
                           background)
            data = load_image_folder(path, opts, skip_bad_images, progress)
        elif path.is_file() and path.suffix.lower() in (".npz", ".npy"):
            data = load_array_file(path)
        elif path.exists():
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz, .npy or an image folder")
        else:
            raise DataError(f"--dataset {dataset!r} is neither a named dataset ({', '.join(NAMES)}) "
                            "nor an existing .npz/.npy file or image folder")
    return data.limited(limit)


def binarize_static(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """One fixed Bernoulli draw per pixel (the 'static binarization' of Larochelle & Murray)."""
    p = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    return (np.random.default_rng(seed).random(p.shape, dtype=np.float32) < p).astype(np.uint8) * 255
