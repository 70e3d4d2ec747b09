import os
import sys

# One thread per process: the suite runs many small models, and on a busy 2-core machine a second
# OpenMP thread that gets descheduled stalls every parallel region (measured: 43 s vs 3 s for one fixture).
# Set before torch is imported so the CLI subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The decoded-dataset cache of the tests lives in a folder of their own, not the user's ~/.cache
import tempfile  # noqa: E402

os.environ.setdefault("VAELAB_CACHE", tempfile.mkdtemp(prefix="vaelab-test-cache-"))
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import REGISTRY, load_dataset, locate

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    d = locate(REGISTRY["fashion-mnist"])
    if d is None:
        pytest.fail("Fashion-MNIST is not available; run `make data` (the Makefile does it before the tests)")
    return d


@pytest.fixture(scope="session")
def fashion(fashion_dir):
    return load_dataset("fashion-mnist")


@pytest.fixture()
def tiny_npz(tmp_path) -> Path:
    """A small labelled uint8 dataset of odd size (3 x 12 x 10) for shape tests."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 3, 12, 10), dtype=np.uint8)
    y = rng.integers(0, 4, size=64)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


def vaelab_cmd() -> list[str]:
    return [sys.executable, "-m", "vaelab.cli"]
