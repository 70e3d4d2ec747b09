"""The colour named datasets as published: CIFAR-10's Python archive, dSprites' .npz, a local CelebA folder.

Archives are converted once into the decoded cache (uint8 (N, C, H, W) arrays) and memory-mapped from there.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache
from .core import ImageData, split_rows
from .folders import Options, load_image_folder, parse_size


# ----------------------------------------------------------------------------------------------- CIFAR-10
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are Python pickles, and unpickling can call any importable function (os.system
    included) that the file names: a tampered archive would run code. This unpickler resolves only the globals
    numpy needs to rebuild an array; any other name stops the load."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        if name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # encoding="bytes": the batches were written by Python 2; their str keys come back as bytes
        out = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: not a CIFAR-10 batch ({e})") from e
    if not isinstance(out, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(out).__name__}, not a dict)")
    return out


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def load_cifar10(archive: Path, progress: bool = False) -> ImageData:
    st = archive.stat()
    fingerprint = {"kind": "cifar10", "archive": str(archive.resolve()), "bytes": st.st_size,
                   "mtime_ns": st.st_mtime_ns}
    name = cache.entry_name("cifar10", fingerprint)
    entry = cache.lookup(name, fingerprint)
    if entry is None:
        batches, meta = _read_cifar(archive)
        with cache.Builder(name, fingerprint, {"source": str(archive), "classes": meta}) as b:
            for split, names in (("train", CIFAR_TRAIN), ("test", ("test_batch",))):
                xs = [batches[n][0] for n in names]
                out = b.create(split, (sum(len(x) for x in xs), 3, 32, 32), np.uint8)
                start = 0
                for x in xs:
                    out[start:start + len(x)] = x.reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
                    start += len(x)
                b.save(f"{split}_labels", np.concatenate([batches[n][1] for n in names]))
            entry = b.commit()
    return ImageData("cifar10", entry.array("train"), entry.array("test"), entry.array("train_labels", mmap=False),
                     entry.array("test_labels", mmap=False), entry.manifest["classes"], str(archive))


def _read_cifar(archive: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    batches, meta = {}, None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile() or base not in (*CIFAR_TRAIN, "test_batch", "batches.meta"):
                    continue
                member = tar.extractfile(m)
                if member is None:  # only for non-files, which were skipped above
                    continue
                d = _unpickle(member.read(), f"{archive}:{m.name}")
                if base == "batches.meta":
                    meta = [n.decode() if isinstance(n, bytes) else str(n) for n in d.get(b"label_names", [])]
                    continue
                x, y = d.get(b"data"), d.get(b"labels")
                if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                    raise DataError(f"{archive}:{m.name}: data must be a uint8 array (N, 3072), "
                                    f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
                y = np.asarray(y, dtype=np.int64)
                if y.shape != (len(x),):
                    raise DataError(f"{archive}:{m.name}: {len(x)} images but {y.size} labels")
                batches[base] = (x, y)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot read the CIFAR-10 archive ({e})") from e
    missing = [n for n in (*CIFAR_TRAIN, "test_batch") if n not in batches]
    if missing:
        raise DataError(f"{archive}: not the CIFAR-10 Python archive; missing {', '.join(missing)}")
    return batches, meta or [str(i) for i in range(10)]


# ----------------------------------------------------------------------------------------------- dSprites
DSPRITES_FACTORS = ("shape", "scale", "orientation", "x", "y")  # latents_classes columns 1..5 (0 is the colour)
DSPRITES_CLASSES = ["square", "ellipse", "heart"]


def load_dsprites(npz: Path, progress: bool = False) -> ImageData:
    st = npz.stat()
    fingerprint = {"kind": "dsprites", "npz": str(npz.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = cache.entry_name("dsprites", fingerprint)
    entry = cache.lookup(name, fingerprint)
    if entry is None:
        entry = _convert_dsprites(npz, name, fingerprint, progress)
    small = {k: entry.array(k, mmap=False) for k in ("train_labels", "test_labels", "train_factors", "test_factors")}
    return ImageData("dsprites", entry.array("train"), entry.array("test"), small["train_labels"],
                     small["test_labels"], DSPRITES_CLASSES, str(npz), small["train_factors"], small["test_factors"],
                     list(DSPRITES_FACTORS))


def _convert_dsprites(npz: Path, name: str, fingerprint: dict, progress: bool) -> cache.Entry:
    """Stream the 737,280 binary 64x64 images out of the .npz (3 GB once inflated) a block at a time into
    the held-out split's positions, never holding them all in memory."""
    from tqdm.auto import tqdm

    try:
        with zipfile.ZipFile(npz) as z:
            classes = _npz_member(z, "latents_classes", npz)
            with z.open("imgs.npy") as fh:
                shape, dtype = _npy_header(fh, npz)
                n = shape[0]
                if len(shape) != 3 or classes.shape != (n, 6):
                    raise DataError(f"{npz}: imgs must be (N, H, W) and latents_classes (N, 6); got {shape} "
                                    f"and {classes.shape}")
                train_rows, test_rows = split_rows(n)
                n_test = len(test_rows)
                dest = np.empty(n, dtype=np.int64)  # source row -> position in its split
                is_test = np.zeros(n, dtype=bool)
                is_test[test_rows] = True
                dest[test_rows] = np.arange(n_test)
                dest[train_rows] = np.arange(n - n_test)
                with cache.Builder(name, fingerprint, {"source": str(npz)}) as b:
                    out = {"test": b.create("test", (n_test, 1, *shape[1:]), np.uint8),
                           "train": b.create("train", (n - n_test, 1, *shape[1:]), np.uint8)}
                    row = int(np.prod(shape[1:])) * dtype.itemsize
                    block = 8192
                    for start in tqdm(range(0, n, block), desc="converting dsprites", unit="block",
                                      disable=not progress, leave=False):
                        m = min(block, n - start)
                        raw = fh.read(m * row)
                        if len(raw) != m * row:
                            raise DataError(f"{npz}: imgs.npy is truncated")
                        x = np.frombuffer(raw, dtype=dtype).reshape(m, 1, *shape[1:])
                        x = (x != 0).astype(np.uint8) * 255  # the images are 0/1
                        rows = np.arange(start, start + m)
                        for split, sel in (("test", is_test[rows]), ("train", ~is_test[rows])):
                            out[split][dest[rows[sel]]] = x[sel]
                    factors = classes[:, 1:].astype(np.float32)  # (N, 5) level indices
                    for split, rows in (("test", test_rows), ("train", train_rows)):  # source rows, split order
                        b.save(f"{split}_factors", factors[rows])
                        b.save(f"{split}_labels", classes[rows, 1].astype(np.int64))
                    return b.commit()
    except (zipfile.BadZipFile, OSError, KeyError, EOFError) as e:
        raise DataError(f"{npz}: not the dSprites .npz ({e}); expected imgs and latents_classes arrays") from e


def _npy_header(fh, where) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    if fortran or dtype.hasobject:
        raise DataError(f"{where}: imgs.npy must be a C-ordered numeric array")
    return shape, dtype


def _npz_member(z: zipfile.ZipFile, key: str, where) -> np.ndarray:
    with z.open(f"{key}.npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


# ----------------------------------------------------------------------------------------------- CelebA
CELEBA_FOLDER = "img_align_celeba"


def load_celeba(dirs: list[Path], skip_bad: bool = False, progress: bool = False, image_size=None,
                center_crop=None) -> ImageData:
    """CelebA's aligned images from a local img_align_celeba folder, centre-cropped to 140 and resized to 64
    (the usual VAE preprocessing) unless other sizes are given."""
    opts = Options(parse_size(image_size, "--image-size") or (64, 64),
                   parse_size(center_crop, "--center-crop") or (140, 140))
    for d in dirs:
        for candidate in (d / CELEBA_FOLDER, d / "celeba" / CELEBA_FOLDER):
            if candidate.is_dir():
                data = load_image_folder(candidate, opts, skip_bad, progress)
                data.name = "celeba"
                return data
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(f"celeba needs its aligned images on disk (its download host is unreliable): put the "
                    f"{CELEBA_FOLDER} folder from the CelebA site in one of {looked}, or pass --data-dir DIR "
                    f"(the folder that holds {CELEBA_FOLDER})")

