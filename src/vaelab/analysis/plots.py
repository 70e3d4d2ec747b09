"""Figures from arrays and dicts, never from models: each can be drawn (and tested) on its own.

Images are float arrays in [0, 1] shaped (N, C, H, W); grids are tiled with a one-pixel gap.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """A figure bound to its own Agg canvas: no pyplot, so no global backend or figure registry is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from ..runs import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
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


def image_grid(images: np.ndarray, path: Path, ncol: int = 8, title: str = "") -> Path:
    """A plain grid of images (N, C, H, W), e.g. prior samples."""
    grid = tile(images, ncol)
    fig = _figure(0.7 * ncol + 0.5, 0.7 * grid.shape[0] / grid.shape[1] * ncol + 0.8)
    ax = fig.add_subplot(111)
    _show(ax, grid)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def latent_scatter(coords: np.ndarray, labels: np.ndarray | None, path: Path,
                   classes: list[str] | None = None, circles: Sequence[tuple[float, str]] = (),
                   axis_names: tuple[str, str] = ("z₁", "z₂"), title: str = "") -> Path:
    """Codes (N, 2) as points coloured by label (grey without labels), with dashed circles around 0 at each
    (radius, label) of `circles` (the report draws the radii that hold 68 / 95 / 99.7 % of the prior)."""
    fig = _figure(7.5, 6.5)
    ax = fig.add_subplot(111)
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=3, c="0.4", alpha=0.6, linewidths=0)
    else:
        import matplotlib

        labels = np.asarray(labels)
        cmap = matplotlib.colormaps["tab10" if labels.max() < 10 else "tab20"]
        for k in np.unique(labels):
            sel = labels == k
            name = classes[k] if classes is not None and k < len(classes) else str(k)
            ax.scatter(coords[sel, 0], coords[sel, 1], s=3, color=cmap(int(k) % cmap.N), alpha=0.7,
                       linewidths=0, label=name)
        ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    t = np.linspace(0, 2 * np.pi, 200)
    for r, name in circles:
        ax.plot(r * np.cos(t), r * np.sin(t), color="k", lw=0.8, ls="--")
        ax.annotate(name, (r * 0.71, r * 0.71), fontsize=7)
    ax.set_aspect("equal")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title or "posterior means of the test images", **({"fontsize": 9} if "\n" in title else {}))
    return _save(fig, path)


def factor_scatter(coords: np.ndarray, factors: np.ndarray, names: list[str], path: Path,
                   axis_names: tuple[str, str] = ("z₁", "z₂"), title: str = "",
                   level_names: dict[str, list[str]] | None = None) -> Path:
    """Codes (N, 2) once per factor (N, F), coloured by its value: a legend for a factor of a few integer
    levels (named by level_names[factor] where given), a colour bar for a continuous one (a cyclic colour map
    for hue and angles)."""
    import matplotlib

    n = factors.shape[1]
    ncol = min(4, n)
    nrow = -(-n // ncol)
    fig = _figure(4.2 * ncol, 3.8 * nrow)
    for j, name in enumerate(names):
        ax = fig.add_subplot(nrow, ncol, j + 1)
        v = factors[:, j]
        levels = np.unique(v)
        if len(levels) <= 10 and np.all(levels == np.round(levels)):
            cmap = matplotlib.colormaps["tab10"]
            named = (level_names or {}).get(name)
            for k, level in enumerate(levels):
                sel = v == level
                label = named[int(level)] if named is not None and 0 <= level < len(named) else f"{level:g}"
                ax.scatter(coords[sel, 0], coords[sel, 1], s=3, color=cmap(k % 10), alpha=0.7, linewidths=0,
                           label=label)
            ax.legend(markerscale=3, fontsize=6, loc="best", frameon=False)
        else:
            cyclic = name in ("hue", "rotation", "orientation")
            sc = ax.scatter(coords[:, 0], coords[:, 1], s=3, c=v, cmap="hsv" if cyclic else "viridis",
                            alpha=0.8, linewidths=0)
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
        if j % ncol == 0:
            ax.set_ylabel(axis_names[1], fontsize=8)
        if j >= n - ncol:
            ax.set_xlabel(axis_names[0], fontsize=8)
    fig.suptitle(title or "posterior means of the test images, coloured by each factor of variation")
    fig.tight_layout()
    return _save(fig, path)


CURVES = (("loss", "−ELBO (nats/image)"), ("rec", "reconstruction (nats)"), ("kl", "KL (nats)"))


def training_curves(metrics: list[dict], path: Path, title: str = "") -> Path:
    """loss, rec and kl per epoch for the train and test splits, from the rows of metrics.jsonl."""
    fig = _figure(12, 3.6)
    for i, (key, label) in enumerate(CURVES):
        ax = fig.add_subplot(1, len(CURVES), i + 1)
        for split, style in (("train", "-o"), ("test", "--s")):
            rows = [r for r in metrics if r.get("split") == split and key in r]
            if rows:
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0 and ax.lines:
            ax.legend()
    if not metrics:
        fig.text(0.5, 0.5, "no metrics recorded", ha="center")
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    return _save(fig, path)


def kl_per_dim(kl: list[float], path: Path, variance: list[float] | None = None, threshold: float = 0.01,
               title: str = "", xlabel: str = "latent dimension") -> Path:
    """A bar per latent dimension: its KL in nats; inactive dimensions (variance ≤ threshold) in grey."""
    values = np.asarray(kl, dtype=float)
    colors = ["C0"] * len(values)
    if variance is not None:
        colors = ["C0" if v > threshold else "0.7" for v in variance]
    fig = _figure(max(5, 0.35 * len(values) + 2), 3.5)
    ax = fig.add_subplot(111)
    ax.bar(np.arange(1, len(values) + 1), values, color=colors)
    ax.set_xticks(np.arange(1, len(values) + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL (nats/image)")
    ax.set_title(title or f"KL per latent dimension (total {values.sum():.2f} nats)"
                 + ("; grey: inactive" if variance is not None else ""))
    return _save(fig, path)


def manifold_panels(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> Path:
    """Several decoded grids side by side: (title, images (n*n, C, H, W), z1, z2) per panel."""
    fig = _figure(3.2 * len(panels), 3.6)
    for i, (title, images, z1, _z2) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _show(ax, tile(images, len(z1), pad=0))
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def study_curves(series: dict[str, dict[str, list[float]]], threshold: float | None, path: Path) -> Path:
    """Test MSE (log scale) and KL against epoch, one line per setting: {label: {"mse": [...], "kl": [...]}}."""
    fig = _figure(11, 4)
    for j, (key, name) in enumerate((("mse", "test MSE per pixel"), ("kl", "test KL (nats)"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for label, s in series.items():
            ax.plot(range(1, len(s[key]) + 1), s[key], marker="o", ms=3, label=f"σ={label}")
        if key == "mse":
            ax.set_yscale("log")
            if threshold is not None:
                ax.axhline(threshold, color="gray", ls="--", lw=1, label="MSE threshold")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    return _save(fig, path)


def against_sigma(rows: list[dict], path: Path) -> Path:
    """KL and sharpness (reconstructions, samples; data as a line) against the final σ of each setting.

    Rows with "fixed": False (learned or optimal σ) are drawn as stars at the σ they ended with."""
    fig = _figure(11, 4)
    fixed = sorted((r for r in rows if r.get("fixed", True)), key=lambda r: r["sigma"])
    other = [r for r in rows if r not in fixed]
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([r["sigma"] for r in fixed], [r["kl"] for r in fixed], marker="o", label="fixed σ")
    for r in other:
        ax.scatter([r["sigma"]], [r["kl"]], marker="*", s=120, zorder=3, label=f"σ {r['setting']}")
    ax.set_xscale("log")
    ax.set_xlabel("σ")
    ax.set_ylabel("test KL (nats)")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for key, name in (("sharpness_recon", "reconstructions"), ("sharpness_samples", "prior samples")):
        ax.plot([r["sigma"] for r in fixed], [r[key] for r in fixed], marker="o", label=name)
        for r in other:
            ax.scatter([r["sigma"]], [r[key]], marker="*", s=120, zorder=3)
    if rows:
        ax.axhline(rows[0]["sharpness_data"], color="gray", ls="--", label="data")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("σ")
    ax.set_ylabel("sharpness (variance of the Laplacian)")
    ax.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.35)
    return _save(fig, path)
