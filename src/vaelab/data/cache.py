"""The decoded cache: datasets that take work to decode (image folders, split .npy files, generated shapes,
converted archives) stored once as uint8/float arrays in .npy files and memory-mapped on every later load.

An entry is a folder holding the arrays and a manifest.json naming what it was built from (paths, sizes,
mtimes, the preprocessing options). It is built in a temporary folder, the manifest is written last, and the
folder is renamed into place: a build killed part-way leaves only a `.tmp-*` folder, which no load trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError

CACHE_VERSION = 1
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """Where decoded datasets live: $VAELAB_CACHE, else <user cache>/vaelab/decoded."""
    env = os.environ.get("VAELAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vaelab" / "decoded"


def entry_name(label: str, key: dict) -> str:
    """A readable, stable folder name: the dataset's name and a hash of what identifies the entry."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:40] or "data"
    return f"{slug}-{digest}"


@dataclass
class Entry:
    path: Path
    manifest: dict

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        """A stored array, memory-mapped (its pages are the kernel's page cache, not this process's memory),
        copy-on-write: a write would change this process's copy of a page, never the file; mmap=False reads it
        into memory (labels and factors: small, and handed to code that may write)."""
        return np.load(self.path / f"{name}.npy", mmap_mode="c" if mmap else None, allow_pickle=False)

    def optional(self, name: str, mmap: bool = True) -> np.ndarray | None:
        return self.array(name, mmap) if (self.path / f"{name}.npy").is_file() else None


def as_stored(fingerprint: dict) -> dict:
    """`fingerprint` as manifest.json gives it back (tuples become lists, keys strings), so a fingerprint
    compares equal to the one stored from the same inputs: a (64, 64) image size is never != [64, 64]."""
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def lookup(name: str, fingerprint: dict) -> Entry | None:
    """The entry `name` if it is complete and was built from exactly `fingerprint`, else None."""
    path = cache_root() / name
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != CACHE_VERSION or manifest.get("fingerprint") != as_stored(fingerprint):
        return None
    for array, spec in manifest.get("arrays", {}).items():
        f = path / f"{array}.npy"
        if not f.is_file() or f.stat().st_size != spec["bytes"]:
            return None
    return Entry(path, manifest)


class Builder:
    """Writes one entry: arrays go to a temporary folder (`create` gives a writable memory map), `commit`
    writes the manifest last and renames the folder into place. Leaving the `with` block without a commit
    (an error, Ctrl-C) removes the temporary folder."""

    def __init__(self, name: str, fingerprint: dict, info: dict | None = None):
        self.name, self.fingerprint, self.info = name, as_stored(fingerprint), dict(info or {})
        self.root = cache_root()
        self.tmp: Path | None = None
        self.arrays: dict[str, np.memmap] = {}

    def __enter__(self) -> Builder:
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(self.root)
        self.tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{os.getpid()}-"))
        return self

    def create(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        arr = np.lib.format.open_memmap(self._path(f"{name}.npy"), mode="w+", dtype=dtype, shape=tuple(shape))
        self.arrays[name] = arr
        return arr

    def scratch(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        """A working array inside the temporary folder, deleted at commit."""
        return np.lib.format.open_memmap(self._path(f"{name}.scratch"), mode="w+", dtype=dtype, shape=tuple(shape))

    def _path(self, filename: str) -> Path:
        if self.tmp is None:
            raise RuntimeError("a Builder writes arrays only inside its `with` block")
        return self.tmp / filename

    def save(self, name: str, arr: np.ndarray) -> None:
        self.create(name, arr.shape, arr.dtype)[...] = arr

    def commit(self) -> Entry:
        assert self.tmp is not None
        specs = {}
        for name, arr in self.arrays.items():
            arr.flush()
            specs[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                           "bytes": (self.tmp / f"{name}.npy").stat().st_size}
        self.arrays.clear()
        for p in self.tmp.glob("*.scratch"):
            p.unlink()
        manifest = {"version": CACHE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "fingerprint": self.fingerprint, "arrays": specs, **self.info}
        with open(self.tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        final = self.root / self.name
        old = None
        if final.exists():  # a stale entry (its files changed): move it aside, then swap the new one in
            old = Path(tempfile.mkdtemp(dir=self.root, prefix=f".old-{os.getpid()}-"))
            os.replace(final, old / "entry")
        os.replace(self.tmp, final)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Entry(final, manifest)

    def __exit__(self, *exc) -> Literal[False]:
        self.arrays.clear()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        return False


def _remove_abandoned(root: Path) -> None:
    """Temporary folders of builds whose process is gone (killed mid-write) are never trusted: remove them."""
    for p in root.glob(".*-*"):
        m = re.match(r"\.(tmp|old)-(\d+)-", p.name)
        if m and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------- ls / clear
@dataclass
class Listed:
    name: str
    path: Path
    bytes: int
    manifest: dict | None  # None: an incomplete build (no manifest)


def entries() -> Iterator[Listed]:
    root = cache_root()
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        manifest = None
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((p / MANIFEST).read_text())
        yield Listed(p.name, p, size, manifest)


def describe(e: Listed) -> str:
    if e.manifest is None or e.name.startswith("."):
        return f"{e.name}  {human_size(e.bytes)}  incomplete (an interrupted build; `vaelab cache clear` removes it)"
    m = e.manifest
    shapes = ", ".join(f"{k} {'x'.join(map(str, v['shape']))}" for k, v in m.get("arrays", {}).items()
                       if k in ("train", "test"))
    options = f" ({m['options']})" if m.get("options") else ""
    return (f"{e.name}  {human_size(e.bytes)}  {m.get('source', '?')}{options}  [{shapes}]  "
            f"built {m.get('created', '?')}")


def clear(name: str | None = None) -> list[Path]:
    """Remove every entry (or the one named); returns what was removed."""
    root = cache_root()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        if name is None or p.name == name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def listing() -> str:
    """What `vaelab cache ls` prints: one line per entry (name, size, source, shapes), then the count, the total
    size and the cache folder."""
    listed = list(entries())
    total = sum(e.bytes for e in listed)
    return "\n".join([*(describe(e) for e in listed),
                      f"{len(listed)} {_entries_word(len(listed))}, {human_size(total)} in {cache_root()}"])


def clear_entries(entry: str | None = None) -> str:
    """Remove every entry, or the one named (ConfigError if there is none of that name); returns what `vaelab
    cache clear` prints."""
    root = cache_root()
    removed = clear(entry)
    if entry is not None and not removed:
        raise ConfigError(f"no cache entry named {entry!r} in {root}; `vaelab cache ls` lists them")
    return f"removed {len(removed)} {_entries_word(len(removed))} from {root}"


def _entries_word(n: int) -> str:
    return "entry" if n == 1 else "entries"


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
