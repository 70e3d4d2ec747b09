"""`shapes`: a built-in colour dataset that needs no download. Procedural 64x64 RGB images of one object each
(square, circle, triangle or cross) with known factors of variation, deterministic from a seed.

Each image is drawn from seven factors: shape, hue, scale, x, y, rotation and background. The factors are
kept with the images (ImageData.train_factors, factor_names); the shape is also the class label.
"""

from __future__ import annotations

import numpy as np

from . import cache
from .core import ImageData

SHAPES = ("square", "circle", "triangle", "cross")
FACTORS = ("shape", "hue", "scale", "x", "y", "rotation", "background")
BACKGROUNDS = (0.0, 0.25, 0.6, 1.0)  # grey levels of the background factor
SIZE = 64
SUPERSAMPLE = 2  # sub-pixel samples per axis: edges are antialiased by averaging them
N_TRAIN, N_TEST = 20000, 2000
VERSION = 1  # bump when the drawing changes, so cached copies are rebuilt


def sample_factors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 7) factor values: shape index, hue in [0, 1), scale in [0.5, 1], centre x and y in [0.25, 0.75]
    of the width, rotation in degrees [0, 90) and background index."""
    rng = np.random.default_rng(seed)
    f = np.empty((n, len(FACTORS)), dtype=np.float32)
    f[:, 0] = rng.integers(0, len(SHAPES), n)
    f[:, 1] = rng.random(n)
    f[:, 2] = rng.uniform(0.5, 1.0, n)
    f[:, 3] = rng.uniform(0.25, 0.75, n)
    f[:, 4] = rng.uniform(0.25, 0.75, n)
    f[:, 5] = rng.uniform(0.0, 90.0, n)
    f[:, 6] = rng.integers(0, len(BACKGROUNDS), n)
    return f


def hue_to_rgb(h: np.ndarray) -> np.ndarray:
    """Fully saturated, full-value colours for hues in [0, 1): (n,) -> (n, 3)."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _inside(kind: int, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Whether object coordinates (u, v) lie inside the shape `kind` of radius r (a share of the width)."""
    if kind == 0:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == 1:  # circle
        return u * u + v * v <= r * r
    if kind == 2:  # equilateral triangle with circumradius r: three half-planes at distance r/2
        out = v <= r / 2
        for t in (np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            out &= (np.float32(np.cos(t)) * u + np.float32(np.sin(t)) * v) <= r / 2
        return out
    au, av = np.abs(u), np.abs(v)  # cross
    return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))


def render(factors: np.ndarray) -> np.ndarray:
    """Images (n, 3, 64, 64) uint8 for factor rows (n, 7), vectorised over the batch."""
    factors = np.asarray(factors, dtype=np.float32)
    n = len(factors)
    s = SIZE * SUPERSAMPLE
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s  # sub-pixel centres in [0, 1]
    alpha = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for kind in range(len(SHAPES)):
        sel = np.flatnonzero(factors[:, 0] == kind)
        if len(sel) == 0:
            continue
        f = factors[sel]
        r = (0.12 + 0.1 * f[:, 2])[:, None, None]  # (m, 1, 1) object radius, a share of the width
        dx = grid[None, None, :] - f[:, 3, None, None]  # (m, 1, s)
        dy = grid[None, :, None] - f[:, 4, None, None]  # (m, s, 1)
        a = np.deg2rad(f[:, 5])[:, None, None]
        c, sn = np.cos(a), np.sin(a)
        u = c * dx + sn * dy  # (m, s, s) object coordinates
        v = c * dy - sn * dx
        inside = _inside(kind, u, v, r)
        # coverage of each pixel by the object: the mean of its sub-pixel samples
        alpha[sel] = inside.reshape(len(sel), SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((2, 4), dtype=np.float32)
    colour = hue_to_rgb(factors[:, 1]).astype(np.float32)[:, :, None, None]  # (n, 3, 1, 1)
    bg = np.asarray(BACKGROUNDS, dtype=np.float32)[factors[:, 6].astype(np.int64)][:, None, None, None]
    img = bg + (colour - bg) * alpha[:, None]  # (n, 3, 64, 64)
    return np.rint(img * 255.0).astype(np.uint8)


def generate(n: int, seed: int = 0, out: np.ndarray | None = None, batch: int = 256,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 3, 64, 64) uint8 and their factors (n, 7), the same for the same (n, seed)."""
    from tqdm.auto import tqdm

    factors = sample_factors(n, seed)
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8) if out is None else out
    for start in tqdm(range(0, n, batch), desc="drawing shapes", unit="batch", disable=not progress, leave=False):
        images[start:start + batch] = render(factors[start:start + batch])
    return images, factors


def load_shapes(n_train: int | None = None, n_test: int | None = None, seed: int = 0, progress: bool = False):
    """The `shapes` dataset (N_TRAIN + N_TEST images), drawn once into the decoded cache and memory-mapped from
    there. The test images are drawn from seed + 1."""
    n_train = N_TRAIN if n_train is None else n_train
    n_test = N_TEST if n_test is None else n_test
    fingerprint = {"kind": "shapes", "version": VERSION, "n_train": n_train, "n_test": n_test, "seed": seed}
    name = cache.entry_name("shapes", fingerprint)
    entry = cache.lookup(name, fingerprint)
    if entry is None:
        with cache.Builder(name, fingerprint, {"source": f"shapes (generated, seed {seed})"}) as b:
            for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
                _, factors = generate(n, s, b.create(split, (n, 3, SIZE, SIZE), np.uint8), progress=progress)
                b.save(f"{split}_factors", factors)
                b.save(f"{split}_labels", factors[:, 0].astype(np.int64))
            entry = b.commit()
    return ImageData("shapes", entry.array("train"), entry.array("test"), entry.array("train_labels", mmap=False),
                     entry.array("test_labels", mmap=False), list(SHAPES), f"shapes (generated, seed {seed})",
                     entry.array("train_factors", mmap=False), entry.array("test_factors", mmap=False), list(FACTORS),
                     renderer=render)
