"""What every dataset ends in: `ImageData`, train/test arrays shaped (N, C, H, W), uint8 in 0..255 or float32 in
[0, 1], with optional integer labels and named factors. Pixels are scaled to [0, 1] per batch by `to_unit`,
never stored twice. Arrays may be memory-mapped files (the decoded cache): code that reads a whole split does
so in chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import DataError

TEST_FRACTION = 0.1  # share of the images held out as the test split when a source has no split of its own


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
    # draws images as stored from factor rows (generated data): lets reconstructions be compared with redraws
    renderer: Callable[[np.ndarray], np.ndarray] | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # files left out of an image folder, by reason

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

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


class StoredImages:
    """(N, C, H, W) images as stored (uint8 or float32), read onto `device` a slice or a batch at a time.

    Supports what the evaluation code does with a split tensor: len(), .shape, .device and x[a:b] (a tensor).
    """

    def __init__(self, array: np.ndarray, device: torch.device | str = "cpu"):
        self.array = array
        self.device = torch.device(device)
        self.shape = torch.Size(array.shape)
        self.dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        # A writable mapping (the decoded cache maps copy-on-write: nothing is ever written back) is viewed as
        # one tensor without copying, so a batch is one index_select, which reads the rows (and waits for any
        # page not in the page cache) without holding the GIL. A read-only array is read through numpy.
        self.rows = torch.from_numpy(array) if array.flags.writeable and array.flags.c_contiguous else None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> torch.Tensor:
        if not isinstance(key, slice):
            raise TypeError("StoredImages is read in slices (x[a:b]) or with gather(idx)")
        return self._placed(torch.from_numpy(np.array(self.array[key])))  # a copy of those rows only

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (1-D, in that order) as one (B, C, H, W) tensor on the device."""
        if self.rows is not None:
            return self._placed(self.rows.index_select(0, idx.cpu()))
        return self._placed(torch.from_numpy(np.take(self.array, idx.cpu().numpy(), axis=0)))

    def _placed(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def to_unit(x):
    """uint8 0..255 or float [0, 1] (numpy, torch or StoredImages) -> float32 torch tensor in [0, 1]."""
    if isinstance(x, StoredImages):
        x = x[:]  # the whole split, copied: code that reads large splits takes slices x[a:b] instead
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).mul_(1.0 / 255.0)
    return t.to(torch.float32)


def split_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of a fixed random split of n images, TEST_FRACTION of them held out."""
    if n < 2:
        raise DataError(f"need at least 2 images to hold out a test split; got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * TEST_FRACTION))
    return order[n_test:], order[:n_test]


def binarize_static(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """One fixed Bernoulli draw per pixel (the 'static binarization' of Larochelle & Murray)."""
    p = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    return (np.random.default_rng(seed).random(p.shape, dtype=np.float32) < p).astype(np.uint8) * 255
