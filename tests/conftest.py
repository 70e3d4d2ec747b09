"""Shared fixtures and the test tiers.

Markers: `slow` (trains for a while), `data` (needs real Fashion-MNIST), `browser` (needs headless Chromium),
`gpu` (needs CUDA). A test gets `data` by requesting the `fashion` or `fashion_dir` fixture (directly or through
another fixture), which also skips it where the data is missing; a test that reads a real named dataset in this
process without the marker fails, so `-m "not data"` never reaches for data.
`pytest -m "not slow"` is the quick inner loop; `make test` runs everything but `gpu`.
A missing resource skips with its reason on a developer's machine, and fails under CI=true, so CI can never
pass by skipping.
"""

import http.server
import os
import shutil
import sys
import threading
from functools import partial

# One thread per process: the suite runs many small models, and on a busy 2-core machine a second
# OpenMP thread that gets descheduled stalls every parallel region (measured: 43 s vs 3 s for one fixture).
# Set before torch is imported so the CLI subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The decoded-dataset cache of the tests lives in a folder of their own, not the user's ~/.cache
import tempfile

os.environ.setdefault("VAELAB_CACHE", tempfile.mkdtemp(prefix="vaelab-test-cache-"))
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import REGISTRY, load_dataset, locate
from vaelab.data import named as _named

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DATA_FIXTURES = {"fashion", "fashion_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)


_RUNNING: dict[str, pytest.Item] = {}  # the test being set up, run or torn down (its fixtures included)
_TMP = Path(tempfile.gettempdir()).resolve()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING["item"] = item
    try:
        yield
    finally:
        _RUNNING.pop("item", None)


def _file_in_only_with_the_data_marker(directory, f, _read=_named._file_in):
    """Every read of a named dataset's files (MNIST, Fashion-MNIST, CIFAR-10, dSprites) goes through
    named._file_in: one found outside the temporary folder is real data, which a test reads only if marked."""
    path = _read(directory, f)
    item = _RUNNING.get("item")
    if item is not None and item.get_closest_marker("data") is None and _TMP not in Path(path).resolve().parents:
        pytest.fail(f"{item.nodeid} reads the real dataset file {path} but has no `data` marker: request the "
                    "`fashion_dir` fixture (it adds the marker, and skips where the data is missing)", pytrace=False)
    return path


_named._file_in = _file_in_only_with_the_data_marker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every resource must be present: {reason}"


def missing(resource: str, how: str):
    """Skip (or, under CI=true, fail) a test whose resource is missing."""
    pytest.skip(f"{resource} is not available; {how}")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    d = locate(REGISTRY["fashion-mnist"])
    if d is None:
        missing("Fashion-MNIST", "run `make data` (the Makefile does it before the tests)")
    return d


@pytest.fixture(scope="session")
def emoji_dir() -> Path:
    """Real colour images: the 3,786 64x64 Twemoji PNGs (modes RGBA and P with transparency mixed) that
    `make images` fetches with npm (scripts/get-images.sh) into the user cache, outside the repository."""
    base = os.environ.get("VAELAB_TEST_IMAGES") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vaelab-test-images")
    d = Path(base) / "twemoji-64"
    if not (d / ".complete").is_file():
        missing("the real colour test images", "run `make images` (the Makefile does it before the tests)")
    return d


def find_browser() -> str | None:
    for name in (os.environ.get("VAELAB_BROWSER"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def browser_path() -> str:
    path = find_browser()
    if path is None:
        missing("a headless browser", "`make browser` installs Debian's chromium (or set VAELAB_BROWSER)")
    return path


@pytest.fixture(scope="session")
def fashion(fashion_dir):
    return load_dataset("fashion-mnist")


@pytest.fixture
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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
