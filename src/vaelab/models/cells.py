"""The cells of the hierarchical VAE (vaelab.models.hierarchical): the bottom-up encoder, the residual bottleneck
block both directions use, and the top-down cell that holds one group of latents.

A top-down cell (VDVAE's decoder block, Child et al. 2021) reads the state h of the top-down pass:

    prior      (μ_p, log σ²_p, h_p) = prior_net(h)                 p(z_i | z_<i), from the state alone
    posterior  (μ_q, log σ²_q)      = posterior_net([h, a])        q(z_i | x, z_<i), a: the encoder's features
    z = μ_q + σ_q·ε (training)  or  μ_p + σ_p·u (sampling)         (B, Z, h, w)
    h ← block(h + h_p + proj(z))

The top group's prior is N(0, I) (no prior_net), so its codes are comparable with a single-latent VAE's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nets import bounded_logvar, to_channels_last

MEAN_BOUND = 5.0  # each mean is soft-clamped to (−5, 5), as NVAE does


def soft_clamp(t: Tensor, bound: float) -> Tensor:
    """bound·tanh(t / bound): the identity near 0, never past ±bound, a gradient everywhere."""
    return bound * torch.tanh(t / bound)


def gaussian_stats(t: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, log-variance) from a (B, 2Z, h, w) output, (B, Z, h, w) each: the mean soft-clamped to ±MEAN_BOUND,
    the log-variance softly bounded as the single-latent encoders' (nets.bounded_logvar: [−20, 4]), for the
    posterior and the prior of every group alike."""
    mean, logvar = t.chunk(2, dim=1)
    return soft_clamp(mean, MEAN_BOUND), bounded_logvar(logvar)


def gaussian_kl(qm: Tensor, qlv: Tensor, pm: Tensor, plv: Tensor) -> Tensor:
    """KL(N(qm, e^qlv) ‖ N(pm, e^plv)) per unit, in nats, same shape as the inputs."""
    return 0.5 * (plv - qlv + (qlv.exp() + (qm - pm).square()) * torch.exp(-plv) - 1.0)


class Block(nn.Module):
    """VDVAE's bottleneck: 1x1 conv to `mid` channels, two 3x3 convs (1x1 on maps of side <= 2), 1x1 conv out,
    each after a SiLU; with `residual`, x + that, the last conv zeroed so the block starts as the identity."""

    def __init__(self, c_in: int, mid: int, c_out: int, residual: bool, small: bool = False):
        super().__init__()
        k = 1 if small else 3
        convs = [nn.Conv2d(c_in, mid, 1), nn.Conv2d(mid, mid, k, padding=k // 2),
                 nn.Conv2d(mid, mid, k, padding=k // 2), nn.Conv2d(mid, c_out, 1)]
        self.convs = nn.ModuleList(convs)
        self.residual = residual
        if residual:
            self.zero_last()

    def zero_last(self) -> None:
        """Zero the last conv: a residual block starts as the identity, an output block at 0."""
        last = self.convs[-1]
        assert isinstance(last, nn.Conv2d)
        assert last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv in self.convs:
            h = conv(F.silu(h))
        return x + h if self.residual else h


def _small(size: tuple[int, int]) -> bool:
    return max(size) <= 2


class BottomUp(nn.Module):
    """x (B, C, H, W) -> the features of each size of the ladder {(h, w): (B, widths[i], h, w)}: a 3x3 stem at full
    size, stride-2 3x3 convs down the ladder (each to the next size's width, then `blocks` bottleneck blocks of
    `mids[i]` channels inside), and a convolution over the whole smallest map down to 1x1."""

    def __init__(self, channels: int, sizes: list[tuple[int, int]], widths: list[int], blocks: int,
                 mids: list[int]):
        super().__init__()
        self.sizes = sizes  # full size, then after each stride-2 stage; widths and mids: one per size
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1),
                          *[Block(c, mid, c, True, _small(s)) for _ in range(blocks)])
            for s, c_in, c, mid in zip(sizes[1:], widths[:-1], widths[1:], mids[1:], strict=True))
        width, mid = widths[-1], mids[-1]
        self.top = nn.Sequential(nn.Conv2d(width, width, sizes[-1]),  # the smallest map -> 1x1
                                 *[Block(width, mid, width, True, small=True) for _ in range(blocks)])
        to_channels_last(self)

    def forward(self, x: Tensor) -> dict[tuple[int, int], Tensor]:
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        acts = {}
        for stage in self.stages:
            h = stage(h)
            acts[(h.shape[2], h.shape[3])] = h
        acts[(1, 1)] = self.top(F.silu(h))
        return acts


class TopDownCell(nn.Module):
    """One group of latents, Z channels at one resolution (see the module docstring); `top`: prior N(0, I)."""

    def __init__(self, width: int, mid: int, z_channels: int, size: tuple[int, int], top: bool, scale: float):
        super().__init__()
        small = _small(size)
        self.z_channels, self.top = z_channels, top
        self.prior_net = None if top else Block(width, mid, 2 * z_channels + width, False, small)
        self.posterior_net = Block(2 * width, mid, 2 * z_channels, False, small)
        self.proj = nn.Conv2d(z_channels, width, 1)
        self.proj.weight.data.mul_(scale)  # VDVAE: the sum of many groups' projections starts small
        self.block = Block(width, mid, width, True, small)
        if self.prior_net is not None:  # the prior starts as N(0, I) (log σ² −0.018: bounded) and h_p as 0
            self.prior_net.zero_last()

    def prior(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(μ_p, log σ²_p, h_p) of p(z_i | z_<i) from the state h (B, width, h, w)."""
        if self.prior_net is None:
            zeros = h.new_zeros(h.shape[0], self.z_channels, h.shape[2], h.shape[3])
            return zeros, zeros, None
        out = self.prior_net(h)
        pm, plv = gaussian_stats(out[:, :2 * self.z_channels])
        return pm, plv, out[:, 2 * self.z_channels:]

    def posterior(self, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_q, log σ²_q) of q(z_i | x, z_<i) from the state h and the encoder's features a."""
        return gaussian_stats(self.posterior_net(torch.cat([h, a], dim=1)))

    def merge(self, h: Tensor, h_p: Tensor | None, z: Tensor) -> Tensor:
        """The next state, after z (B, Z, h, w) is drawn."""
        h = h + self.proj(z)
        return self.block(h if h_p is None else h + h_p)
