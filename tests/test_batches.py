"""Data bigger than memory: .npy files and the decoded cache stay memory-mapped, batches come from a background
thread, and training on mapped data gives the same model bit for bit as on resident data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaelab import TrainConfig, train
from vaelab.data import BatchSource, ImageData, StoredImages, load_dataset, prepare_data
from vaelab.data.core import split_rows
from vaelab.errors import DataError


@pytest.fixture(params=["c", "r"])
def mapped(tmp_path, request) -> np.ndarray:
    """A memory-mapped array: copy-on-write (as the decoded cache maps, read as a tensor) or read-only (numpy)."""
    x = np.random.default_rng(0).integers(0, 256, (50, 3, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    return np.load(tmp_path / "x.npy", mmap_mode=request.param)


@pytest.mark.parametrize("start_step", [0, 3])
def test_stored_batches_equal_index_select(mapped, start_step):
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    resident = BatchSource(torch.from_numpy(np.array(mapped)), 8)
    stored = BatchSource(StoredImages(mapped), 8)
    a, b = list(resident.epoch(order, start_step)), list(stored.epoch(order, start_step))
    assert len(a) == len(b) == 7 - start_step
    assert b[-1].shape == (2, 3, 6, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(b[0], torch.from_numpy(np.array(mapped))[order[start_step * 8:(start_step + 1) * 8]])


def test_batches_can_stop_early(mapped):
    it = BatchSource(StoredImages(mapped), 8).epoch(torch.arange(50))
    assert next(it).shape[0] == 8
    it.close()  # the prefetching thread finishes and the pool shuts down


def test_stored_images_read_in_slices(mapped):
    s = StoredImages(mapped)
    assert (s.rows is not None) == (mapped.mode == "c")
    assert len(s) == 50
    assert s.shape == (50, 3, 6, 5)
    assert s.device.type == "cpu"
    assert torch.equal(s[10:13], torch.from_numpy(np.array(mapped[10:13])))
    with pytest.raises(TypeError):
        s[3]


def test_npy_is_memory_mapped_and_split_like_in_memory(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 7, 9, 3), dtype=np.uint8)  # channels last
    np.save(tmp_path / "x.npy", x)
    data = load_dataset(str(tmp_path / "x.npy"))
    assert isinstance(data.train, np.memmap)
    assert data.shape == (3, 7, 9)
    tr, te = split_rows(40)
    assert np.array_equal(data.train, x[tr].transpose(0, 3, 1, 2))
    assert np.array_equal(data.test, x[te].transpose(0, 3, 1, 2))


def test_npy_float_is_checked_in_chunks(tmp_path):
    x = np.random.default_rng(0).random((30, 4, 4)).astype(np.float32)
    x[17, 2, 2] = 1.5
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"float pixel values must lie in \[0, 1\]"):
        load_dataset(str(tmp_path / "x.npy"))


def test_prepare_keeps_mapped_data_mapped(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((30, 1, 4, 4), np.uint8))
    prep = prepare_data(TrainConfig(dataset=str(tmp_path / "x.npy"), batch_size=8), torch.device("cpu"))
    assert isinstance(prep.train, StoredImages)
    assert isinstance(prep.train.array, np.memmap)
    assert isinstance(prep.test, StoredImages)


@pytest.mark.slow
def test_training_on_mapped_data_is_bit_identical_to_resident(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "tr.npy", x[:260])
    np.save(tmp_path / "te.npy", x[260:])
    mapped = ImageData("m", np.load(tmp_path / "tr.npy", mmap_mode="r"), np.load(tmp_path / "te.npy", mmap_mode="r"))
    resident = ImageData("r", x[:260].copy(), x[260:].copy())
    runs = []
    for name, data in (("mapped", mapped), ("resident", resident)):
        config = TrainConfig(dataset=name, hidden=[32], latent_dim=3, batch_size=32, epochs=2, seed=3,
                             out=str(tmp_path / name))
        runs.append(train(config, progress=False, data=data))
    a, b = (dict(r.model.state_dict()) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    def numbers(run):  # every metric but the wall time
        return [{k: v for k, v in row.items() if k != "seconds"} for row in run.metrics]

    assert numbers(runs[0]) == numbers(runs[1])


def test_unplanned_batches_are_gathered_at_once(mapped):
    source = BatchSource(StoredImages(mapped), 8)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(2))
    source.plan(order)
    other = torch.tensor([5, 1, 4])
    assert torch.equal(source(other), torch.from_numpy(np.array(mapped))[other])  # not the planned batch
    assert torch.equal(source(order[:8]), torch.from_numpy(np.array(mapped))[order[:8]])
    source.close()


@pytest.mark.slow
def test_resume_on_a_mapped_npy_dataset_is_exact(tmp_path):
    from vaelab import resume

    x = np.random.default_rng(1).integers(0, 256, (200, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    common = dict(dataset=str(tmp_path / "x.npy"), hidden=[16], latent_dim=2, batch_size=16, seed=5)
    whole = train(TrainConfig(**common, epochs=2, out=str(tmp_path / "whole")), progress=False)
    train(TrainConfig(**common, epochs=1, out=str(tmp_path / "half")), progress=False)
    resumed = resume(tmp_path / "half", progress=False, epochs=2)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
