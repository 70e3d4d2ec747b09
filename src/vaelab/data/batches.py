"""Batches for the training loop from data that stays where it is stored.

A `StoredImages` (core) is a split kept as a numpy array, usually memory-mapped from the decoded cache or a .npy
file: it is read a slice or a batch at a time, never copied whole into the process's memory. `BatchSource` hands the
training loop one epoch's batches in the epoch's order; for stored images a background thread gathers the
next batch while the current step runs. Either way a batch holds exactly the rows `train.index_select(0, idx)`
would, in the same order, so training on mapped or resident data gives the same result bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .core import StoredImages


def resident(array: np.ndarray, device: torch.device, chunk: int = 1 << 14) -> torch.Tensor:
    """The whole array as one tensor on `device`, copied a chunk at a time (a mapped file never passes
    through the process's memory whole on its way to a GPU)."""
    if device.type == "cpu" and not isinstance(array, np.memmap):
        return torch.from_numpy(np.ascontiguousarray(array))  # already in memory: shared, not copied
    out = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, device=device)
    for start in range(0, len(array), chunk):
        out[start:start + chunk] = torch.from_numpy(np.array(array[start:start + chunk]))
    return out


class BatchSource:
    """The training set's batches: `source(idx)` is rows `idx` of the set, in that order, as stored.

    For a resident tensor (in memory, or on a GPU) a batch is one index_select. For StoredImages, once
    `plan(order, start_step)` has told it the epoch's order, a background thread gathers the batch of the next
    step while the caller trains on the current one (reading its pages from disk where they are not cached).
    A batch that is not ready when asked for, or not the planned one, is gathered by the caller at once: the
    result never depends on the thread."""

    def __init__(self, train: torch.Tensor | StoredImages, batch_size: int, prefetch: bool = True):
        self.train, self.batch_size = train, batch_size
        self.resident = not isinstance(train, StoredImages)
        self.prefetch = prefetch and not self.resident
        self._pool: ThreadPoolExecutor | None = None
        self._order: torch.Tensor | None = None
        self._pending: tuple[int, Future] | None = None  # (step, its batch being gathered)

    def __len__(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.train, StoredImages):
            return self.train.gather(idx)
        # index_select copies whole rows; plain indexing (train[idx]) gathers element by element, far slower
        return self.train.index_select(0, idx)

    def plan(self, order: torch.Tensor, start_step: int = 0) -> None:
        """This epoch's order of the training set; the first batch is gathered from here on."""
        if not self.prefetch:
            return
        self._drop()
        self._order = order.cpu()
        self._ahead(start_step)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            step, future = self._pending
            planned = self._step_idx(step)
            if len(planned) == len(idx) and torch.equal(planned, idx.cpu()):
                # not ready (on a busy machine the thread may not have had a core yet): gather the rows here
                # rather than wait for the thread to be scheduled; both give the same batch
                xb = future.result() if future.done() else self.gather(idx)
                future.cancel()
                self._ahead(step + 1)
                return xb
            self._drop()
        return self.gather(idx)

    def epoch(self, order: torch.Tensor, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The batches of every step from `start_step` on, in `order`."""
        self.plan(order, start_step)
        try:
            for step in range(start_step, len(self)):
                yield self(order[step * self.batch_size:(step + 1) * self.batch_size])
        finally:
            self._drop()

    def close(self) -> None:
        self._drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _step_idx(self, step: int) -> torch.Tensor:
        assert self._order is not None, "a batch is only pending after plan() set the order"
        return self._order[step * self.batch_size:(step + 1) * self.batch_size]

    def _ahead(self, step: int) -> None:
        self._pending = None
        if self._order is None or step >= len(self):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="vaelab-batches")
        self._pending = (step, self._pool.submit(self.gather, self._step_idx(step)))

    def _drop(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
