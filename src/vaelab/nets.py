"""Encoder and decoder networks, sized from the data's (C, H, W); nothing assumes 28x28.

Encoders map x (B, C, H, W) to the mean and log-variance of q(z|x), each (B, L).
Decoders map z (B, L) to `n_params` parameter tensors, each (B, C, H, W).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLPEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: list[int], latent_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)  # (B, L) each
        return mu, logvar


class MLPDecoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, n_params: int):
        super().__init__()
        self.shape, self.n_params = shape, n_params
        layers: list[nn.Module] = []
        width = latent_dim
        for h in reversed(hidden):
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_params * math.prod(shape)))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> list[Tensor]:
        c, h, w = self.shape
        out = self.body(z).view(-1, self.n_params * c, h, w)  # (B, K*C, H, W)
        return list(out.split(c, dim=1)) if self.n_params > 1 else [out]


def _halved(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 1) // 2  # a 3x3 stride-2 conv with padding 1 gives ceil(n / 2)
    return n


class ConvEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], channels: list[int], latent_dim: int):
        super().__init__()
        c, h, w = shape
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.ReLU()]
            c = ch
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        n = len(channels)
        self.head = nn.Linear(c * _halved(h, n) * _halved(w, n), 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Linear to a small feature map, then stride-2 transposed convs (each doubles H, W), cropped to (H, W)."""

    def __init__(self, shape: tuple[int, int, int], channels: list[int], latent_dim: int, n_params: int):
        super().__init__()
        self.shape, self.n_params = shape, n_params
        c, h, w = shape
        n = len(channels)
        self.start = (channels[-1], _halved(h, n), _halved(w, n))
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        layers: list[nn.Module] = []
        chans = list(reversed(channels)) + [n_params * c]
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(nn.ReLU(), *layers)

    def forward(self, z: Tensor) -> list[Tensor]:
        c, h, w = self.shape
        out = self.body(self.fc(z).view(-1, *self.start))[:, :, :h, :w]  # (B, K*C, H, W) after the crop
        return list(out.split(c, dim=1)) if self.n_params > 1 else [out]


ARCHS = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}


def make_nets(arch: str, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, n_params: int):
    enc_cls, dec_cls = ARCHS[arch]
    return enc_cls(shape, hidden, latent_dim), dec_cls(shape, hidden, latent_dim, n_params)

