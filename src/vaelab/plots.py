"""Figures from arrays and dicts, never from models: each can be drawn (and tested) on its own.

Images are float arrays in [0, 1] shaped (N, C, H, W); grids are tiled with a one-pixel gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tile(images: np.ndarray, ncol: int, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (H', W', C) image, row-major, `ncol` per row."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    return out


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from .runs import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def _show(ax, img: np.ndarray) -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def manifold(images: np.ndarray, z1: np.ndarray, z2: np.ndarray, path: Path, title: str = "",
             axis_names: tuple[str, str] = ("z₁", "z₂")) -> Path:
    """Decoded images on a grid: images (len(z2) * len(z1), C, H, W), row i = z2[i] (top = largest)."""
    n1 = len(z1)
    grid = tile(images, n1, pad=0)
    fig = _figure(7, 7)
    ax = fig.add_subplot(111)
    _show(ax, grid)
    h = grid.shape[0] / len(z2)
    w = grid.shape[1] / n1
    step = max(1, n1 // 5)
    ax.set_xticks([w * (i + 0.5) for i in range(0, n1, step)], [f"{v:.1f}" for v in z1[::step]])
    ax.set_yticks([h * (i + 0.5) for i in range(0, len(z2), step)], [f"{v:.1f}" for v in z2[::step]])
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title or "decoder mean f(z) over a grid of z at Gaussian quantiles")
    return _save(fig, path)


def image_rows(rows: list[tuple[str, np.ndarray]], path: Path, title: str = "") -> Path:
    """One labelled row per (label, images (N, C, H, W)); all rows hold the same number of images."""
    ncol = max(len(imgs) for _, imgs in rows)
    fig = _figure(max(6, 0.55 * ncol + 1.5), 0.6 * len(rows) + 0.8)
    for i, (label, imgs) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        _show(ax, tile(imgs, ncol))
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
