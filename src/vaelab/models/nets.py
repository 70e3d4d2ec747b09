"""Encoder and decoder networks, sized from the data's (C, H, W); nothing assumes 28x28.

Encoders map x (B, C, H, W) to the mean and log-variance of q(z|x), each (B, L).
Decoders map z (B, L) to `n_params` parameter tensors, each (B, C, H, W).

`hidden` means, for each family:
  mlp   the widths of the hidden layers, encoder order (the decoder mirrors them): [400] or [512, 256].
  conv  the channels of the stride-2 stages. One number is the first stage's width, doubled at each later
        stage (at most 8x) over as many stages as the image needs to shrink to about 4x4 (its larger side
        <= 5: 28x28 -> 4x4 in 3 stages, 64x64 -> 4x4 in 4, 48x80 -> 3x5 in 4); several numbers give the
        stages explicitly, one per stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_FINAL_SIDE = 5  # conv stages halve the image until its larger side is at most this
MAX_GROWTH = 8  # one-number --hidden: channels double per stage up to this multiple of the first stage's
LOGVAR_MIN, LOGVAR_MAX = -20.0, 4.0  # the soft bounds of log σ² of q(z|x) (bounded_logvar)
NET_VERSION = 3  # 1: conv GroupNorm on the main path; 2: only in residual branches; 3: hierarchical narrower >16 px


def bounded_logvar(raw: Tensor) -> Tensor:
    """The encoder's log σ² of q(z|x), softly bounded to [LOGVAR_MIN, LOGVAR_MAX]: smooth, monotone, within 0.02 of
    the identity from -16 to 0. Unbounded, one step of Adam after a gradient spike moved the whole linear head at
    once and sent log σ² to +12 and -25 within a few steps (a conv VAE on `shapes`, σ = 0.1): z then lay hundreds
    of prior widths from 0 and the next gradients were larger still. σ_q above e² ≈ 7.4 prior widths is never
    useful (the KL grows as σ_q²), and below e⁻¹⁰ ≈ 5e-5 it already costs ≥ 9 nats per dimension. The lower wall
    sits far below the log σ² of well-trained encoders (a wall at -12 cost a Bernoulli MLP on Fashion-MNIST
    0.19 nats of test −ELBO after 3 epochs; at -20, 0.05)."""
    return LOGVAR_MAX - F.softplus(LOGVAR_MAX - (LOGVAR_MIN + F.softplus(raw - LOGVAR_MIN)))


class MLPEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, blocks: int = 0):
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
        return mu, bounded_logvar(logvar)


class MLPDecoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, n_params: int,
                 blocks: int = 0):
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


# ------------------------------------------------------------------------------------------------ conv nets
def _halved(n: int) -> int:
    return (n + 1) // 2  # a 3x3 stride-2 conv with padding 1 gives ceil(n / 2)


def conv_channels(shape: tuple[int, int, int], hidden: list[int]) -> list[int]:
    """The channels of each stride-2 stage for images of `shape` (see the module docstring)."""
    if len(hidden) > 1:
        return list(hidden)
    _, h, w = shape
    chans = [hidden[0]]
    h, w = _halved(h), _halved(w)
    while max(h, w) > MAX_FINAL_SIDE:
        chans.append(min(chans[-1] * 2, hidden[0] * MAX_GROWTH))
        h, w = _halved(h), _halved(w)
    return chans


def stage_sizes(shape: tuple[int, int, int], n_stages: int) -> list[tuple[int, int]]:
    """(H, W) of the input and after each stage: n_stages + 1 sizes, the decoder retraces them in reverse."""
    _, h, w = shape
    sizes = [(h, w)]
    for _ in range(n_stages):
        h, w = _halved(h), _halved(w)
        sizes.append((h, w))
    return sizes


def _groups(channels: int, most: int = 8) -> int:
    """GroupNorm groups: up to 8, with at least 2 channels each where possible (a norm over one channel would
    undo the bias of the conv before it, leaving that bias a gradient of pure rounding noise)."""
    return max(g for g in range(1, most + 1) if channels % g == 0 and (channels // g >= 2 or g == 1))


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))): pre-activation, GroupNorm (statistics of each image alone, so
    nothing from the rest of the batch enters an example's ELBO), the last conv zeroed so a block starts as
    the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        last = self.branch[-1]
        assert isinstance(last, nn.Conv2d)
        assert last.bias is not None
        nn.init.zeros_(last.weight)  # each block starts as the identity
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def _norm_act(channels: int, norm: bool) -> list[nn.Module]:
    """SiLU on the main path after each resampling convolution (and after the decoder's linear layer), preceded by
    GroupNorm in the design of net_version 1 only.

    A per-image norm on the main path removes the scale of each image's features, and a linear map of the input
    hands it nothing else: GN(W(c·x) + b) = GN(Wx + b/c), so only the bias tells c apart, and Adam moves it by
    about the learning rate per step. Version 1's encoder saw flat images of grey 0.6 and 1.0 as nearly the same
    (1e-3 apart with b = 0) and its decoder read the direction of z, not its length; each later norm removed what
    was left of the scale in its stage. A conv VAE on `shapes` then spent its first hundreds of steps telling only
    light from dark backgrounds, with no object (test MSE about 0.05; 0.035 after 79 steps without the norms;
    docs/models.md, "What happens on `shapes`"). The norms now sit inside the residual branches only (ResBlock),
    whose output is added to a main path that keeps each image's scale."""
    return [nn.GroupNorm(_groups(channels), channels), nn.SiLU()] if norm else [nn.SiLU()]


class ConvEncoder(nn.Module):
    """Stages of [3x3 stride-2 conv, SiLU, `blocks` residual blocks], then one linear layer to
    (μ, log σ²). GroupNorm after each stage's convolution only with `main_norm` (net_version 1; see _norm_act)."""

    def __init__(self, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, blocks: int = 1,
                 main_norm: bool = False):
        super().__init__()
        chans = conv_channels(shape, hidden)
        h, w = stage_sizes(shape, len(chans))[-1]
        layers: list[nn.Module] = []
        c = shape[0]
        for ch in chans:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), *_norm_act(ch, main_norm)]
            layers += [ResBlock(ch) for _ in range(blocks)]
            c = ch
        self.body = nn.Sequential(*layers, nn.Flatten())  # (B, C_last * h * w)
        self.head = nn.Linear(c * h * w, 2 * latent_dim)
        to_channels_last(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)  # see to_channels_last
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, bounded_logvar(logvar)


class ConvDecoder(nn.Module):
    """The encoder mirrored: linear to the smallest map (SiLU), then stages of [`blocks` residual blocks, 3x3
    stride-2 transposed conv, SiLU] that retrace the encoder's sizes exactly (odd sides included), the last one
    giving the likelihood's parameters at full size (no activation). With `main_norm` (net_version 1) a GroupNorm
    precedes each of those SiLUs (see _norm_act)."""

    def __init__(self, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, n_params: int,
                 blocks: int = 1, main_norm: bool = False):
        super().__init__()
        self.shape, self.n_params = shape, n_params
        chans = conv_channels(shape, hidden)
        sizes = stage_sizes(shape, len(chans))
        self.start = (chans[-1], *sizes[-1])
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        layers: list[nn.Module] = _norm_act(chans[-1], main_norm)
        outs = [*reversed(chans[:-1]), n_params * shape[0]]
        for i, (a, b) in enumerate(zip(reversed(chans), outs, strict=True)):
            layers += [ResBlock(a) for _ in range(blocks)]
            (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
            pad = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))  # 0 for an odd side, 1 for an even one
            layers.append(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=pad))
            if i < len(chans) - 1:
                layers += _norm_act(b, main_norm)
        self.body = nn.Sequential(*layers)
        to_channels_last(self)

    def forward(self, z: Tensor) -> list[Tensor]:
        c = self.shape[0]
        h = self.fc(z).view(-1, *self.start).contiguous(memory_format=torch.channels_last)
        out = self.body(h)  # (B, K*C, H, W), stored channels-last
        return list(out.split(c, dim=1)) if self.n_params > 1 else [out]


ARCHS = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}
DEFAULT_HIDDEN = {"mlp": [400], "conv": [32], "hierarchical": [64]}  # hierarchical: its width (models.hierarchical)
DEFAULT_BLOCKS = {"mlp": 0, "conv": 1, "hierarchical": 1}


def make_nets(arch: str, shape: tuple[int, int, int], hidden: list[int], latent_dim: int, n_params: int,
              blocks: int | None = None, version: int = NET_VERSION):
    """The encoder and decoder of `arch`; `version` 1 builds the conv design of runs saved before NET_VERSION 2."""
    enc_cls, dec_cls = ARCHS[arch]
    blocks = DEFAULT_BLOCKS[arch] if blocks is None else blocks
    if arch == "conv":
        main_norm = version < 2
        return (ConvEncoder(shape, hidden, latent_dim, blocks, main_norm),
                ConvDecoder(shape, hidden, latent_dim, n_params, blocks, main_norm))
    return enc_cls(shape, hidden, latent_dim, blocks), dec_cls(shape, hidden, latent_dim, n_params, blocks)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_channels_last(module: nn.Module) -> nn.Module:
    """Conv weights in channels-last layout (NHWC), the layout oneDNN's CPU convolutions prefer: the conv VAE's
    training step was 15-27 % faster than in the default layout (benchmarks/conv_speed.py). Only the storage
    order changes; every value, and every saved file (written contiguous), is the same."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module
