"""Small runs trained once per test session on real Fashion-MNIST, shared by the evaluate/plot/report tests."""

from __future__ import annotations

from pathlib import Path

from vaelab.config import TrainConfig
from vaelab.training.trainer import train

_CACHE: dict[tuple, Path] = {}


def trained_run(tmp_path_factory, **overrides) -> Path:
    """A 2-D-latent Gaussian (σ = 0.1) MLP run on the first 4000 Fashion-MNIST images, 2 epochs (a few seconds);
    `overrides` change the config (each distinct setting trains once)."""
    key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("run") / "run"
        settings = dict(dataset="fashion-mnist", likelihood="gaussian", sigma="0.1", latent_dim=2, hidden=[128],
                        epochs=2, limit=4000, batch_size=100, device="cpu", out=str(out))
        train(TrainConfig(**{**settings, **overrides}), progress=False)
        _CACHE[key] = out
    return _CACHE[key]
