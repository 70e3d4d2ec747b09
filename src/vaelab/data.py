"""Datasets: the IDX reader, the named-dataset registry with download and cache, arrays and image folders.

Everything ends in an `ImageData`: train/test arrays shaped (N, C, H, W), uint8 in 0..255 or float32 in [0, 1],
with optional integer labels. Pixels are scaled to [0, 1] per batch by `to_unit`, never stored twice.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, NotNormalizedWarning


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
        return ImageData(self.name, self.train[:n], self.test, labels, self.test_labels, self.classes, self.source)


def to_unit(x):
    """uint8 0..255 or float [0, 1] (numpy or torch) -> float32 torch tensor in [0, 1]."""
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
}


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
    for candidate in (f.name, f.name.removesuffix(".gz")):
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
    md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    try:
        with gzip.open(path, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
    except (OSError, EOFError):
        sha = None
    return md5, sha


def verify(path: Path, f: RemoteFile) -> bool:
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
    for f in spec.files.values():
        target = dest / f.name
        if target.is_file() and verify(target, f):
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + f.name
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{f.name}.", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    _copy_with_progress(resp, out, f.name, progress)
                if not verify(tmp, f):
                    errors.append(f"{url}: checksum mismatch")
                    continue
                os.replace(tmp, target)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"could not download {spec.name} file {f.name}: " + "; ".join(errors))


def _copy_with_progress(resp, out, label: str, progress: bool) -> None:
    total = int(resp.headers.get("Content-Length") or 0) or None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {label}", leave=False)
    while chunk := resp.read(1 << 16):
        out.write(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def get_spec(name: str) -> NamedDataset:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; named datasets: {', '.join(REGISTRY)}, "
                        "or give a path to a .npz/.npy file or an image folder")
    return REGISTRY[name]


def load_named(name: str, data_dir: str | None = None, allow_download: bool = True) -> ImageData:
    spec = get_spec(name)
    directory = locate(spec, data_dir)
    if directory is None:
        looked = [str(d) for d in search_dirs(spec, data_dir)]
        if not allow_download:
            raise DataError(f"{name} not found; looked in {', '.join(looked)}")
        try:
            directory = download(name)
        except DataError as e:
            raise DataError(
                f"{name} not found and the download failed ({e}). Looked in: {', '.join(looked)}. "
                f"Put the four IDX files from {spec.homepage} in one of those folders, or pass --data-dir DIR "
                "or set VAELAB_DATA") from e
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


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "LA") and im.mode != "LA" else "L")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from e


def _folder_images(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if files or not subdirs:
        return files, [], []
    paths, labels, classes = [], [], []
    for i, d in enumerate(subdirs):
        imgs = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths += imgs
        labels += [i] * len(imgs)
        classes.append(d.name)
    return paths, labels, classes


def _stack(paths: list[Path], where: Path) -> np.ndarray:
    if not paths:
        raise DataError(f"{where}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = [_read_image(p) for p in paths]
    first = arrays[0].shape
    for p, a in zip(paths, arrays, strict=True):
        if a.shape != first:
            raise DataError(f"{p}: image is {a.shape} but {paths[0].name} is {first}; all images must share a size")
    x = np.stack(arrays)  # (N, H, W) or (N, H, W, 3)
    return x[:, None] if x.ndim == 3 else np.ascontiguousarray(np.moveaxis(x, -1, 1))


def load_image_folder(folder: Path) -> ImageData:
    """PNG/JPEG images; subfolders become labels; train/ and test/ subfolders give the split."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        ptr, ytr, classes = _folder_images(folder / "train")
        pte, yte, classes_te = _folder_images(folder / "test")
        xtr, xte = _stack(ptr, folder / "train"), _stack(pte, folder / "test")
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"{folder}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}")
        labelled = bool(classes) and classes == classes_te
        return ImageData(folder.name, xtr, xte, np.array(ytr) if labelled else None,
                         np.array(yte) if labelled else None, classes or None, str(folder))
    paths, labels, classes = _folder_images(folder)
    x = _stack(paths, folder)
    y = np.array(labels, dtype=np.int64) if classes else None
    return ImageData(folder.name, *_split(x, y), classes=classes or None, source=str(folder))  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- entry point
def load_dataset(dataset: str, data_dir: str | None = None, limit: int | None = None,
                 allow_download: bool = True) -> ImageData:
    """A registered name (mnist, fashion-mnist) or a path to a .npz/.npy file or an image folder."""
    if dataset in REGISTRY:
        data = load_named(dataset, data_dir, allow_download)
    else:
        path = Path(dataset).expanduser()
        if path.is_dir():
            data = load_image_folder(path)
        elif path.is_file() and path.suffix.lower() in (".npz", ".npy"):
            data = load_array_file(path)
        elif path.exists():
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz, .npy or an image folder")
        else:
            raise DataError(f"--dataset {dataset!r} is neither a named dataset ({', '.join(REGISTRY)}) "
                            "nor an existing .npz/.npy file or image folder")
    return data.limited(limit)


def binarize_static(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """One fixed Bernoulli draw per pixel (the 'static binarization' of Larochelle & Murray)."""
    p = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    return (np.random.default_rng(seed).random(p.shape, dtype=np.float32) < p).astype(np.uint8) * 255


# ----------------------------------------------------------------------------------------------- as trained on
@dataclass
class Prepared:
    """The data as the loop uses it: resident tensors and the function that turns a stored batch into x."""

    data: ImageData
    train: torch.Tensor
    test: torch.Tensor
    train_eval: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor]
    prepare_train: Callable[[torch.Tensor], torch.Tensor]
    normalized: bool


def prepare_data(config, device: torch.device, data: ImageData | None = None) -> Prepared:
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.limit)
    else:  # data the caller loaded once (tests, studies): --limit still applies, as it would on reload/resume
        data = data.limited(config.limit)
    train, test = data.train, data.test
    if config.binarize == "static":
        train, test = binarize_static(train, config.seed), binarize_static(test, config.seed + 1)
    train_t = torch.from_numpy(np.ascontiguousarray(train)).to(device)
    test_t = torch.from_numpy(np.ascontiguousarray(test)).to(device)
    train_eval = train_t
    if config.binarize == "dynamic":  # evaluate on one fixed binarization; train on a fresh one every step
        test_t = torch.from_numpy(binarize_static(test, config.seed + 1)).to(device)
        train_eval = torch.from_numpy(binarize_static(train, config.seed)).to(device)

    def prepare(xb: torch.Tensor) -> torch.Tensor:
        return to_unit(xb)

    def prepare_train(xb: torch.Tensor) -> torch.Tensor:
        x = to_unit(xb)
        return torch.bernoulli(x) if config.binarize == "dynamic" else x

    normalized = True
    if config.likelihood == "bernoulli" and config.binarize == "none" and not data.is_binary:
        normalized = False
        warnings.warn("the Bernoulli likelihood on non-binary pixels is not a normalized density: its "
                      "'loss' is a cross-entropy, not a negative log-likelihood (use --binarize dynamic or "
                      "static, or a continuous likelihood such as continuous-bernoulli)",
                      NotNormalizedWarning, stacklevel=3)
    return Prepared(data, train_t, test_t, train_eval, prepare, prepare_train, normalized)
