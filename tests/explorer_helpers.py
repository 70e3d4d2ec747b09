"""Shared by the explorer tests: a generated 64x64 colour dataset and its conv run, and small HTTP helpers."""

from __future__ import annotations

import http.client
import io
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from vaelab.config import TrainConfig
from vaelab.training.trainer import train

CLASSES = ("disc", "square", "bar")
_RUNS: dict[str, Path] = {}


def colour_images(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n RGB images (n, 3, size, size) uint8: one shape (disc, square or bar) of a random colour, position and size
    on a background of another colour; the label is the shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    x = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, len(CLASSES), n)
    for i, k in enumerate(labels):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.28)
        if k == 0:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        elif k == 1:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
        else:
            mask = (abs(xx - cx) < r * 1.4) & (abs(yy - cy) < r * 0.35)
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        x[i] = np.where(mask[None], fg[:, None, None], bg[:, None, None])
    return x, labels


def colour_npz(directory: Path) -> Path:
    path = directory / "colour64.npz"
    if not path.exists():
        xtr, ytr = colour_images(768, seed=0)
        xte, yte = colour_images(256, seed=1)
        np.savez(path, x_train=xtr, x_test=xte, y_train=ytr, y_test=yte)
    return path


def conv_run(tmp_path_factory) -> Path:
    """A conv VAE (latent 4) on 64x64 RGB images, one short epoch: what matters is its decoder's cost and shape."""
    if "conv" not in _RUNS:
        d = tmp_path_factory.mktemp("colour")
        config = TrainConfig(dataset=str(colour_npz(d)), arch="conv", hidden=[16, 32], latent_dim=4,
                             likelihood="gaussian", sigma="0.1", epochs=1, batch_size=64, device="cpu",
                             out=str(d / "run"))
        train(config, progress=False)
        _RUNS["conv"] = d / "run"
    return _RUNS["conv"]


def get(port: int, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request to the explorer on 127.0.0.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send bytes as they are (malformed requests included) and return whatever comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def png_pixels(png: bytes) -> np.ndarray:
    """A PNG as uint8 (H, W, C)."""
    a = np.asarray(Image.open(io.BytesIO(png)))
    return a[:, :, None] if a.ndim == 2 else a


def expected_pixels(model, z) -> np.ndarray:
    """run.model.decode_mean(z) as the 8-bit images the explorer shows, (B, H, W, C)."""
    import torch

    with torch.inference_mode():
        x = model.decode_mean(torch.as_tensor(np.asarray(z, dtype=np.float32)).reshape(-1, model.latent_dim))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, state = fields[1], fields[3]
            host, _, hex_port = addr.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(host)
    return found


def start_explore(*args: str, env: dict[str, str] | None = None, wait: float = 90
                  ) -> tuple[subprocess.Popen, str, int]:
    """`vaelab explore ARGS` in its own process: (the process, the URL it serves, its port), once it has printed
    its address. The caller stops the process."""
    proc = subprocess.Popen([sys.executable, "-m", "vaelab.cli", "explore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=wait)
    if not lines or " at http://127.0.0.1:" not in lines[0]:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"the explorer printed no address: {lines}")
    url = lines[0].split(" at ")[1].split()[0]
    return proc, url, int(url.rsplit(":", 1)[1].strip("/"))
