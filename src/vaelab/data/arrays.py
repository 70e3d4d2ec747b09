"""User arrays: .npy files (memory-mapped; split once into the decoded cache) and .npz files (read whole)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache
from .core import ImageData, split_rows

CHUNK_BYTES = 64 << 20  # rows are validated and copied this much at a time


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
    fmin, fmax = float(x.min()), float(x.max())
    if fmin < 0 or fmax > 1:
        raise DataError(f"{where}: float pixel values must lie in [0, 1] (or use uint8 0-255); "
                        f"got range [{fmin:g}, {fmax:g}]")
    return np.ascontiguousarray(x)


def _check_labels(y, n: int, where: str) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels must be a 1-D array of length {n} (one per image); got shape {y.shape}")
    return y.astype(np.int64)


_NPZ_KEYS = {"train": ("x_train", "train_images", "train"), "test": ("x_test", "test_images", "test"),
             "train_labels": ("y_train", "train_labels"), "test_labels": ("y_test", "test_labels"),
             "all": ("x", "images", "data", "arr_0"), "labels": ("y", "labels", "arr_1")}


def _pick(z, role):
    for k in _NPZ_KEYS[role]:
        if k in z:
            return z[k]
    return None


def load_array_file(path: Path, progress: bool = False) -> ImageData:
    if path.suffix.lower() == ".npy":
        return load_npy(path, progress)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
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


def _split(x: np.ndarray, y: np.ndarray | None):
    tr, te = split_rows(len(x))
    return x[tr], x[te], (None if y is None else y[tr]), (None if y is None else y[te])


def load_npy(path: Path, progress: bool = False) -> ImageData:
    """One array of images in a .npy file, memory-mapped: its train/test split is written once, a chunk at a
    time, into the decoded cache (validated and in (N, C, H, W) layout), and mapped from there."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read as a numpy file ({e})") from e
    st = path.stat()
    fingerprint = {"kind": "npy", "path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = cache.entry_name(path.stem, fingerprint)
    entry = cache.lookup(name, fingerprint)
    if entry is None:
        layout = _layout(x, str(path))  # a view: (N, C, H, W)
        train_rows, test_rows = split_rows(len(layout))
        rows = {"train": train_rows, "test": test_rows}
        first = check_images(np.array(layout[:1]), str(path))  # the stored dtype (uint8 or float32)
        per_row = max(1, layout[0].nbytes)
        with cache.Builder(name, fingerprint, {"source": str(path)}) as b:
            for split, r in rows.items():
                out = b.create(split, (len(r), *layout.shape[1:]), first.dtype)
                step = max(1, CHUNK_BYTES // per_row)
                for start in range(0, len(r), step):
                    chunk = r[start:start + step]
                    sel = np.sort(chunk)  # read in file order, then put back in split order
                    block = check_images(np.take(layout, sel, axis=0), str(path))
                    out[start:start + len(sel)] = block[np.searchsorted(sel, chunk)]
            entry = b.commit()
    return ImageData(path.stem, entry.array("train"), entry.array("test"), source=str(path))


def _layout(x: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W), (N, C, H, W) or (N, H, W, C) -> an (N, C, H, W) view, without reading the pixels."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = np.moveaxis(x, -1, 1)
    else:
        raise DataError(f"{where}: images must have rank 3 (N,H,W) or 4 (N,C,H,W); got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: no images (shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: images must be uint8 0-255 or float in [0, 1]; got dtype {x.dtype}")
    return x
