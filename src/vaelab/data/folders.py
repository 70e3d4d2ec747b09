"""Image folders as users have them: any file Pillow reads, in any mode, decoded once into the decoded cache.

Every image becomes one channel layout: grey when every image is grey, else RGB. Transparency is composited
over a background colour, EXIF orientation is applied, and `image_size` / `center_crop` bring all images to
one size. The first folder level below the root (or below train/ and test/) names the labels; a single
subfolder names no classes, so its images load unlabelled (with a warning).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ..errors import DataError
from . import cache
from .core import ImageData, split_rows

BACKGROUNDS = {"white": 255, "black": 0}
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
BAD_SHOWN = 5  # bad files named in the warning
CHUNK = 64  # images per task of the decoding pool


def parse_size(text, flag: str) -> tuple[int, int] | None:
    """'64' -> (64, 64); '64x48' -> (64, 48) as (height, width); None stays None."""
    if text is None:
        return None
    parts: list[Any]  # ints, or strings int() parses
    if isinstance(text, int | list | tuple):
        parts = [text, text] if isinstance(text, int) else list(text)
    else:
        parts = str(text).lower().replace("×", "x").split("x")
        if len(parts) == 1:
            parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError) as e:
        raise DataError(f"{flag} must be a size such as 64 or 64x48 (height x width); got {text!r}") from e
    if h < 1 or w < 1 or len(parts) != 2:
        raise DataError(f"{flag} must be a size such as 64 or 64x48 (height x width); got {text!r}")
    return h, w


def image_suffixes() -> set[str]:
    """The file suffixes Pillow can open (PNG, JPEG, WebP, BMP, TIFF, GIF, ...)."""
    from PIL import Image

    Image.init()
    return {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass(frozen=True)
class Options:
    image_size: tuple[int, int] | None = None  # (height, width): resize the shorter side, centre-crop the other
    center_crop: tuple[int, int] | None = None  # (height, width): cropped from the centre before resizing
    background: str = "white"  # what transparent pixels are composited over

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise DataError(f"--background must be one of {', '.join(BACKGROUNDS)}; got {self.background!r}")

    def describe(self) -> str:
        parts = [f"background {self.background}"]
        if self.center_crop:
            parts.insert(0, f"center crop {self.center_crop[0]}x{self.center_crop[1]}")
        if self.image_size:
            parts.insert(0, f"size {self.image_size[0]}x{self.image_size[1]}")
        return ", ".join(parts)


class BadImage(Exception):
    """One file that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------- scanning
@dataclass
class Listing:
    splits: dict[str, list[tuple[str, int | None]]]  # "all" or "train"/"test" -> (path, label index or None)
    classes: list[str]
    stamps: list[list]  # [path relative to the root, bytes, mtime in ns] per file, in the order of `splits`
    hidden: int = 0
    non_image: int = 0


def scan(root: Path) -> Listing:
    """The image files under `root` with their labels, and the hidden and non-image files skipped."""
    suffixes = image_suffixes()
    counts = {"hidden": 0, "non_image": 0}
    stamps: list[list] = []
    prefix = len(str(root)) + 1
    if (root / "train").is_dir() and (root / "test").is_dir():
        parts = {"train": _scan_split(root / "train", suffixes, counts, stamps, prefix),
                 "test": _scan_split(root / "test", suffixes, counts, stamps, prefix)}
    else:
        parts = {"all": _scan_split(root, suffixes, counts, stamps, prefix)}
    labelled = all(all(c is not None for _, c in files) for files in parts.values())
    classes = sorted({c for files in parts.values() for _, c in files if c is not None}) if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(p, index[c] if labelled and c is not None else None) for p, c in files]
              for s, files in parts.items()}
    return Listing(splits, classes, stamps, counts["hidden"], counts["non_image"])


def _scan_split(top: Path, suffixes: set[str], counts: dict, stamps: list, prefix: int
                ) -> list[tuple[str, str | None]]:
    """Files under `top` in a stable order, each with the name of its first-level folder (None at the top).
    Plain strings and os.scandir, not pathlib: a folder of 200,000 files is listed and stat-ed in seconds."""
    found: list[tuple[str, str | None]] = []

    def walk(d: str, label: str | None):
        try:
            items = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            raise DataError(f"{d}: cannot list the folder ({err.strerror or err})") from err
        for e in items:
            if e.name.startswith("."):
                counts["hidden"] += 1
            elif e.is_dir():
                walk(e.path, label if label is not None else e.name)
            elif not e.is_file():
                continue
            elif os.path.splitext(e.name)[1].lower() in suffixes:
                st = e.stat()
                found.append((e.path, label))
                stamps.append([e.path[prefix:], st.st_size, st.st_mtime_ns])
            else:
                counts["non_image"] += 1

    walk(str(top), None)
    return found


# ----------------------------------------------------------------------------------------------- decoding
def decode(path: str | Path, opts: Options) -> tuple[np.ndarray, bool]:
    """One image as (H, W, 3) uint8 and whether it is grey; raises BadImage for anything unusable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise BadImage(f"{w}x{h} pixels exceeds Pillow's decompression-bomb limit "
                               f"({Image.MAX_IMAGE_PIXELS} pixels)")
            im.seek(0)  # the first frame of an animation
            im = ImageOps.exif_transpose(im)  # loads the pixels; turned upright as the camera meant
            rgb, grey = _flatten(im, BACKGROUNDS[opts.background])
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Warning) as e:
        raise BadImage(f"cannot decode it ({type(e).__name__}: {e})") from e
    return _resize(rgb, opts), grey


def _flatten(im, background: int):
    """A Pillow image of any mode -> (an 'L' or 'RGB' image, grey?) with transparency composited."""
    from PIL import Image

    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
        pal = np.asarray(im)
        grey = bool((pal[..., 0] == pal[..., 1]).all() and (pal[..., 1] == pal[..., 2]).all())
    else:
        grey = mode in GREY_MODES
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit -> 8-bit
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("La", "RGBa"):
        im = im.convert("LA" if im.mode == "La" else "RGBA")
    out_mode = "L" if grey else "RGB"
    if im.mode in ("LA", "RGBA"):
        base = Image.new(out_mode, im.size, background if grey else (background,) * 3)
        base.paste(im.convert(out_mode), mask=im.getchannel("A"))
        im = base
    elif im.mode != out_mode:
        im = im.convert(out_mode)
    return im, grey


def _resize(im, opts: Options) -> np.ndarray:
    """--center-crop (a hard crop), then --image-size: the largest centred box of the target's aspect ratio,
    resized with Pillow's bicubic filter over the whole source footprint (antialiased when shrinking)."""
    from PIL import Image

    if opts.center_crop is not None:
        w, h = im.size
        ch, cw = opts.center_crop
        if ch > h or cw > w:
            raise BadImage(f"is {w}x{h} pixels, smaller than --center-crop {ch}x{cw}")
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    if opts.image_size is not None:
        th, tw = opts.image_size
        w, h = im.size
        if w * th > h * tw:  # wider than the target: keep the height, take the width's centre
            cw = h * tw / th
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:
            ch = w * th / tw
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
        im = im.resize((tw, th), Image.Resampling.BICUBIC, box=box)
    a = np.asarray(im, dtype=np.uint8)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a  # (H, W, 3)


# ----------------------------------------------------------------------------------------------- loading
def load_image_folder(folder: Path, opts: Options | None = None, skip_bad: bool = False,
                      progress: bool = False, workers: int | None = None) -> ImageData:
    """Decode `folder` into the cache (first load, or after a change), then memory-map it."""
    opts = opts or Options()
    folder = folder.resolve()
    listing = scan(folder)
    if not listing.stamps:
        raise DataError(f"{folder}: no images found (looked for files Pillow reads: "
                        f"{', '.join(sorted(s for s in image_suffixes() if s in _COMMON))}, ...)")
    fingerprint = {"kind": "folder", "root": str(folder), "options": asdict(opts), "files": listing.stamps}
    name = cache.entry_name(folder.name, {"root": str(folder), "options": asdict(opts)})
    entry = cache.lookup(name, fingerprint)
    if entry is None:
        entry = _build(folder, listing, opts, name, fingerprint, skip_bad, progress, workers)
    bad = [tuple(b) for b in entry.manifest["bad"]]
    if bad and not skip_bad:
        _bad_files_error(bad)
    if bad:
        named = "; ".join(f"{Path(p).name} ({why})" for p, why in bad[:BAD_SHOWN])
        warnings.warn(f"skipped {len(bad)} bad image file{'s' if len(bad) > 1 else ''} in {folder}: {named}"
                      + (" ..." if len(bad) > BAD_SHOWN else ""), UserWarning, stacklevel=3)
    m = entry.manifest
    classes = m["classes"] or None
    train_labels, test_labels = entry.optional("train_labels", mmap=False), entry.optional("test_labels", mmap=False)
    if classes is not None and len(classes) == 1:  # one class tells no images apart: a label score would be 100 %
        warnings.warn(f"all images in {folder} are in one subfolder ({classes[0]}): treated as unlabelled",
                      UserWarning, stacklevel=3)
        classes = train_labels = test_labels = None
    return ImageData(folder.name, entry.array("train"), entry.array("test"), train_labels, test_labels, classes,
                     str(folder), skipped={"hidden": m["hidden"], "non_image": m["non_image"], "bad": len(bad)})


def _bad_files_error(bad: list[tuple[str, str]]) -> NoReturn:
    path, why = bad[0]
    more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
    raise DataError(f"{path}: {why}{more}; fix or remove it, or pass --skip-bad-images to leave bad files out")


_COMMON = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _build(folder: Path, listing: Listing, opts: Options, name: str, fingerprint: dict, skip_bad: bool,
           progress: bool, workers: int | None) -> cache.Entry:
    """Decode every file (in parallel, Pillow releases the GIL while decoding and resizing) into a scratch
    array, then write the splits in their final layout and order."""

    files = [(p, y) for part in listing.splits.values() for p, y in part]
    n = len(files)
    bad: dict[int, str] = {}
    grey = np.zeros(n, dtype=bool)
    sizes: dict[int, tuple[int, int]] = {}
    first = _first_good(files, opts, bad)  # (index, decoded array, grey): fixes the size without --image-size
    with cache.Builder(name, fingerprint, {"source": str(folder), "options": opts.describe()}) as b:
        if first is None:
            if not skip_bad:
                _bad_files_error(_bad_list(files, bad))
            shape = (0, 1, 1, 3)
        else:
            shape = (n, *first[1].shape)
        scratch = b.scratch("decoded", shape, np.uint8)  # (N, H, W, 3), in listing order
        if first is not None:
            scratch[first[0]] = first[1]
            grey[first[0]] = first[2]
            _decode_all(files, first[0] + 1, opts, scratch, grey, bad, sizes, progress, workers)
        good = _good_rows(folder, files, first, shape, bad, sizes, skip_bad)
        channels = 1 if grey[good].all() else 3
        labels = np.array([-1 if y is None else y for _, y in files], dtype=np.int64)
        for split, rows in _split_rows(folder, listing, good).items():
            out = b.create(split, (len(rows), channels, shape[1], shape[2]), np.uint8)  # (N, C, H, W)
            for start in range(0, len(rows), 4096):
                block = scratch[rows[start:start + 4096]]  # (b, H, W, 3)
                out[start:start + len(block)] = block[..., :channels].transpose(0, 3, 1, 2)
            if listing.classes:
                b.save(f"{split}_labels", labels[rows])
        b.info.update(classes=listing.classes, hidden=listing.hidden, non_image=listing.non_image,
                      bad=[list(item) for item in _bad_list(files, bad)])
        entry = b.commit()
    if progress:
        print(f"vaelab: decoded {len(good)} images from {folder} ({opts.describe()}; {len(bad)} bad, "
              f"{listing.hidden} hidden and {listing.non_image} non-image files skipped) into {entry.path}",
              file=sys.stderr)
    return entry


def _first_good(files, opts: Options, bad: dict[int, str]) -> tuple[int, np.ndarray, bool] | None:
    """The first file that decodes, as (index, array, grey); the bad files before it go into `bad`."""
    for i, (p, _) in enumerate(files):
        try:
            return (i, *decode(p, opts))
        except BadImage as e:
            bad[i] = str(e)
    return None


def _bad_list(files, bad: dict[int, str]) -> list[tuple[str, str]]:
    return [(str(files[i][0]), why) for i, why in sorted(bad.items())]


def _good_rows(folder: Path, files, first, shape: tuple[int, ...], bad: dict[int, str],
               sizes: dict[int, tuple[int, int]], skip_bad: bool) -> np.ndarray:
    """The listing indices of the files that decoded to the first good image's size; a DataError for bad files
    (unless they are skipped), for images of another size, or when none decoded."""
    if bad and not skip_bad:
        _bad_files_error(_bad_list(files, bad))
    if sizes:
        assert first is not None, "sizes are compared with the first good image"
        i, (h, w) = next(iter(sizes.items()))
        raise DataError(f"images differ in size: {files[first[0]][0]} is {shape[2]}x{shape[1]} pixels but "
                        f"{files[i][0]} is {w}x{h} ({len(sizes)} differ from the first); pass --image-size N "
                        "(or HxW) to resize and centre-crop them all to one size")
    n = len(files)
    good = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
    if len(good) == 0:
        raise DataError(f"{folder}: none of its {n} image files could be decoded (first: {files[0][0]}: "
                        f"{bad.get(0, '?')})")
    return good


def _split_rows(folder: Path, listing: Listing, good: np.ndarray) -> dict[str, np.ndarray]:
    """The listing indices of each split: the folder's own train/ and test/, or a held-out share of one folder."""
    if "all" in listing.splits:
        if len(good) < 2:
            raise DataError(f"{folder}: need at least 2 images to hold out a test split; got {len(good)}")
        train_rows, test_rows = split_rows(len(good))
        return {"test": good[test_rows], "train": good[train_rows]}
    n_train = len(listing.splits["train"])
    parts = {"train": good[good < n_train], "test": good[good >= n_train]}
    for s in ("train", "test"):
        if len(parts[s]) == 0:
            raise DataError(f"{folder / s}: no decodable images")
    return parts


def _decode_all(files, start: int, opts: Options, scratch: np.ndarray, grey: np.ndarray, bad: dict,
                sizes: dict, progress: bool, workers: int | None) -> None:
    from tqdm.auto import tqdm

    expected = scratch.shape[1:]
    lock = threading.Lock()

    def work(lo: int, hi: int) -> int:
        for i in range(lo, hi):
            try:
                a, g = decode(files[i][0], opts)
            except BadImage as e:
                with lock:
                    bad[i] = str(e)
                continue
            if a.shape != expected:
                with lock:
                    sizes[i] = a.shape[:2]
                continue
            scratch[i] = a
            grey[i] = g
        return hi - lo

    workers = workers or os.cpu_count() or 1
    n = len(files)
    with tqdm(total=n, initial=start, desc="decoding images", unit="img", disable=not progress,
              leave=False) as bar:
        if workers == 1 or n - start <= CHUNK:
            bar.update(work(start, n))
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="vaelab-decode")
        try:
            for done in pool.map(lambda lo: work(lo, min(lo + CHUNK, n)), range(start, n, CHUNK)):
                bar.update(done)
        finally:  # on Ctrl-C the chunks not started yet are dropped, not decoded first
            pool.shutdown(wait=True, cancel_futures=True)
