"""A top-down hierarchical VAE of the VDVAE / NVAE family (`--arch hierarchical`).

Groups of latents sit at several resolutions, top first: 1x1, then each size of the encoder's ladder whose
larger side is at most 16 (28x28 -> 1, 4, 7, 14; 32x32 -> 1, 4, 8, 16; 64x64 -> 1, 4, 8, 16; 64x48 -> 1x1, 4x3,
8x6, 16x12), `groups` groups at each (or a count per resolution). A bottom-up pass computes features of x at
every resolution; a top-down pass draws the groups in turn, each from a diagonal Gaussian computed from the
shared top-down state:

    p(z) = Π_i p(z_i | z_<i)          q(z|x) = Π_i q(z_i | x, z_<i)       (cells.TopDownCell)
    KL   = Σ_i E_q[KL(q(z_i | x, z_<i) ‖ p(z_i | z_<i))], each term in closed form at the drawn z_<i

then refines the state up to full size and outputs the likelihood's `n_params` parameter maps.

Both passes have `width` channels at every size whose larger side is at most MAX_LATENT_SIDE (every latent size)
and, from net_version 3, half as many per doubling above it, at least MIN_WIDTH (size_widths; 64x64 at width 64:
32 channels at 32x32, 16 at 64x64: half the multiply-adds of version 2 per 64x64 image, 0.77 at 32x32). The
encoder's stride-2 convolutions and 1x1 convolutions before the decoder's upsamplings change the width.
Runs saved with net_version <= 2 rebuild their design: `width` at every size.

It has the single-latent VAE's interface, over a flat latent vector of `latent_dim` units: every group's units,
top group first, each group in (channel, row, column) order.
  forward / terms / iwae_bound   eps (B, L) (or (K, B, L)) is the standard-normal noise of every group's
                                 posterior draw, z_i = μ_q + σ_q·ε_i; kl_per_dim (B, L) holds each unit's KL
  encode(x)                      q(z_top | x) of the top group alone, (B, code_dim): the codes plots show
  reconstruct(x)                 the decoder mean with every group at its posterior mean (not decode(encode(x)))
  reconstruct_draw(x)            the decoder mean at z ~ q(z|x), every group drawn given the draws above it (not
                                 decode(encode(x).sample()), which draws the top group alone)
  decode(z)                      z (B, code_dim): the top group's z, the lower groups at their prior means;
                                 z (B, L): the top group's z, then the lower groups' standardized prior noise u,
                                 z_i = μ_p + σ_p·u_i (so decode(sample_prior(n, temperature=T)) is a prior draw
                                 at temperature T: every group's noise scaled by T)
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .cells import Block, BottomUp, TopDownCell, gaussian_kl
from .likelihoods import Likelihood, make_likelihood
from .nets import MAX_FINAL_SIDE, NET_VERSION, stage_sizes, to_channels_last
from .priors import LOG_2PI, Prior, StandardPrior, _gen_device, log_standard_normal, make_prior
from .vae import ARCH_MODELS, VAE, DiagonalGaussian, Terms, group_sums

MAX_LATENT_SIDE = 16  # latent groups at every ladder size up to this larger side (half of 32x32, a quarter of 64)
DEFAULT_GROUPS = 1
NARROW_VERSION = 3  # net_version from which the sizes above MAX_LATENT_SIDE have fewer channels (size_widths)
MIN_WIDTH = 16  # ... but never fewer than this (nor more than the width)


def ladder(shape: tuple[int, int, int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(the encoder's sizes: the image's, then each stride-2 stage's until the larger side is at most 5;
    the latent resolutions, top first: 1x1, then the stage sizes with larger side <= MAX_LATENT_SIDE)."""
    _, h, w = shape
    n = 1
    while max(math.ceil(h / 2 ** n), math.ceil(w / 2 ** n)) > MAX_FINAL_SIDE:
        n += 1
    sizes = stage_sizes(shape, n)
    latent = [(1, 1)] + [s for s in reversed(sizes[1:]) if max(s) <= MAX_LATENT_SIDE and s != (1, 1)]
    return sizes, latent


def group_counts(shape: tuple[int, int, int], groups: int | list[int] | None) -> list[int]:
    """Latent groups per latent resolution of `shape`, top first: one count for all (None: DEFAULT_GROUPS) or each."""
    latent = ladder(shape)[1]
    groups = DEFAULT_GROUPS if groups is None else groups
    if isinstance(groups, int):
        return [groups] * len(latent)
    if len(groups) != len(latent):
        names = ", ".join(f"{h}x{w}" for h, w in latent)
        raise ConfigError(f"--groups gives {len(groups)} counts, but {shape[1]}x{shape[2]} images have "
                          f"{len(latent)} latent resolutions ({names}): give one count, or {len(latent)}, top first")
    return list(groups)


def latent_resolutions(shape: tuple[int, int, int], groups: int | list[int] | None) -> list[tuple[int, int]]:
    """The latent resolutions of `shape` that hold at least one group under --groups, top first."""
    return [s for s, g in zip(ladder(shape)[1], group_counts(shape, groups), strict=True) if g > 0]


def size_widths(sizes: list[tuple[int, int]], width: int, version: int = NET_VERSION) -> list[int]:
    """Channels of both passes at each of the encoder's sizes (full size first): `width` where the larger side is
    at most MAX_LATENT_SIDE; above it, from net_version 3, half as many per size (64x64: 16 channels at 64x64, 32
    at 32x32), at least MIN_WIDTH (at most `width`). net_version <= 2: `width` at every size."""
    above = sum(max(s) > MAX_LATENT_SIDE for s in sizes) if version >= NARROW_VERSION else 0
    return [min(width, max(MIN_WIDTH, width >> (above - i))) if i < above else width for i in range(len(sizes))]


def _upsample(h: Tensor, size: tuple[int, int]) -> Tensor:
    """h (N, c, h, w) -> (N, c, *size), nearest, stored channels-last as the convolutions' weights are (an NCHW
    state would be copied to channels-last by every convolution and back by every residual sum)."""
    return F.interpolate(h, size=size, mode="nearest").contiguous(memory_format=torch.channels_last)


@dataclass
class Draws:
    """One top-down pass, every group flattened and concatenated, top first, (N, L) each: the drawn z, the
    prior's mean and log-variance at it, and the posterior's (None where a group came from the prior)."""

    z: Tensor
    pm: Tensor
    plv: Tensor
    qm: Tensor | None = None
    qlv: Tensor | None = None
    closed: int | None = None  # the first unit of the groups drawn from their prior (q = p there), if any

    def posterior(self) -> DiagonalGaussian:
        assert self.qm is not None, "a pass that drew every group from q(z|x)"
        assert self.qlv is not None
        return DiagonalGaussian(self.qm, self.qlv)

    def kl_per_dim(self) -> Tensor:
        """KL(q(z_i | x, z_<i) ‖ p(z_i | z_<i)) of each unit, (N, L), in closed form at the drawn z_<i."""
        q = self.posterior()
        kl = gaussian_kl(q.mean, q.logvar, self.pm, self.plv)
        if self.closed is None:
            return kl
        return torch.cat([kl[:, :self.closed], torch.zeros_like(kl[:, self.closed:])], dim=1)  # 0, not rounding

    def log_p(self, start: int = 0) -> Tensor:
        """Σ_i log p(z_i | z_<i), (N,), over the units from `start` on."""
        z, pm, plv = self.z[:, start:], self.pm[:, start:], self.plv[:, start:]
        return -0.5 * ((z - pm).square() * torch.exp(-plv) + plv + LOG_2PI).sum(-1)

    def log_q(self, eps: Tensor) -> Tensor:
        """Σ_i log q(z_i | x, z_<i), (N,), for z drawn as μ_q + σ_q·eps."""
        return -0.5 * (eps.square() + self.posterior().logvar + LOG_2PI).sum(-1)


class TopDown(nn.Module):
    """The decoder: a learned 1x1 start state, the latent cells from the top resolution down (the state upsampled,
    nearest, plus a learned bias, at each new resolution), then at each larger size up to the image's a 1x1 conv
    to that size's width where it is narrower (before upsampling) and `blocks` bottleneck blocks, and a 3x3 conv to
    n_params * C maps. `widths` and `mids`: channels and bottleneck channels at each of the encoder's sizes (full
    size first; `width` at every latent size). Called with noise alone it decodes from the prior."""

    def __init__(self, shape: tuple[int, int, int], width: int, blocks: int, groups: int | list[int] | None,
                 z_channels: int, n_params: int, mid: int, widths: list[int], mids: list[int]):
        super().__init__()
        self.shape, self.n_params = shape, n_params
        sizes, latent = ladder(shape)
        chans = dict(zip(sizes, zip(widths, mids, strict=True), strict=True))  # size -> (channels, mid)
        self.cell_sizes = [s for s, g in zip(latent, group_counts(shape, groups), strict=True) for _ in range(g)]
        used = list(dict.fromkeys(self.cell_sizes))  # the resolutions that hold latents, top first
        scale = (1.0 / len(self.cell_sizes)) ** 0.5
        cells = [TopDownCell(width, mid, z_channels, s, i == 0, scale) for i, s in enumerate(self.cell_sizes)]
        self.cells = nn.ModuleList(cells)
        self.group_sizes = [z_channels * h * w for h, w in self.cell_sizes]
        self.latent_dim = sum(self.group_sizes)
        self.start = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(1, width, h, w)) for h, w in used[1:])
        self.refine_sizes = [s for s in reversed(sizes) if max(s) > max(used[-1])]
        c_in = [width] + [chans[s][0] for s in self.refine_sizes]
        self.narrow = nn.ModuleList(nn.Conv2d(a, b, 1) if a != b else nn.Identity() for a, b in pairwise(c_in))
        self.refine = nn.ModuleList(nn.Sequential(*[Block(c, m, c, True) for _ in range(blocks)])
                                    for c, m in (chans[s] for s in self.refine_sizes))
        self.out = nn.Conv2d(c_in[-1], n_params * shape[0], 3, padding=1)
        to_channels_last(self)

    def forward(self, noise: Tensor, acts: dict[tuple[int, int], Tensor] | None = None,
                keep: int | None = None) -> tuple[list[Tensor], Draws]:
        """Parameter maps (each (N, C, H, W)) and the draws, for noise (N, L). With the encoder's features
        `acts` (of N images), group i is drawn from q(z_i | x, z_<i) (z = μ_q + σ_q·noise) when i < keep (every
        group when keep is None), else from the prior (z = μ_p + σ_p·noise), which is then its posterior too:
        q(z_i | x, z_<i) = p(z_i | z_<i), so it holds nothing of x and its KL is 0. Such a draw passes no gradient
        to the prior (the prior would otherwise learn to shrink the noise it adds); the group's posterior network
        stays in the graph with a zero gradient, so DistributedDataParallel finds a gradient for every weight."""
        n = noise.shape[0]
        h = self.start.expand(n, -1, -1, -1)
        size, level, offset = (1, 1), 0, 0
        parts: list[list[Tensor]] = [[], [], [], [], []]  # z, pm, plv, qm, qlv
        cells = typing.cast(list[TopDownCell], list(self.cells))
        for i, (cell, cs) in enumerate(zip(cells, self.cell_sizes, strict=True)):
            if cs != size:
                h = _upsample(h, cs) + self.biases[level]
                size, level = cs, level + 1
            e = noise[:, offset:offset + self.group_sizes[i]].reshape(n, -1, *cs)  # (N, Z, h, w)
            offset += self.group_sizes[i]
            pm, plv, h_p = cell.prior(h)
            pm, plv = pm.to(noise.dtype), plv.to(noise.dtype)  # under autocast the stats stay in noise's precision
            if acts is None:
                z = pm + torch.exp(0.5 * plv) * e
            elif keep is None or i < keep:
                qm, qlv = (t.to(noise.dtype) for t in cell.posterior(h, acts[cs]))
                z = qm + torch.exp(0.5 * qlv) * e
            else:
                z = (pm + torch.exp(0.5 * plv) * e).detach()
                if torch.is_grad_enabled():  # the zero-gradient tie; without a graph it would be wasted work
                    unused_m, unused_lv = cell.posterior(h, acts[cs])
                    z = z + 0.0 * (unused_m.sum() + unused_lv.sum())
                qm, qlv = pm.detach(), plv.detach()
            if acts is not None:
                parts[3].append(qm.flatten(1))
                parts[4].append(qlv.flatten(1))
            for j, t in enumerate((z, pm, plv)):
                parts[j].append(t.flatten(1))
            h = cell.merge(h, h_p, z)
        for s, narrow, blocks in zip(self.refine_sizes, self.narrow, self.refine, strict=True):
            h = blocks(_upsample(narrow(h), s))  # (N, widths at s, *s)
        out = self.out(F.silu(h))  # (N, n_params * C, H, W)
        params = list(out.split(self.shape[0], dim=1)) if self.n_params > 1 else [out]
        z, pm, plv = (torch.cat(p, 1) for p in parts[:3])
        if acts is None:
            return params, Draws(z, pm, plv)
        closed = None if keep is None or keep >= len(self.cells) else sum(self.group_sizes[:keep])
        return params, Draws(z, pm, plv, torch.cat(parts[3], 1), torch.cat(parts[4], 1), closed)

    def top_posterior(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_q, log σ²_q) of the top group, each (B, code_dim), from the encoder's 1x1 features a."""
        h = self.start.expand(a.shape[0], -1, -1, -1)
        qm, qlv = typing.cast(TopDownCell, self.cells[0]).posterior(h, a)
        return qm.flatten(1), qlv.flatten(1)


class HierarchyPrior(Prior):
    """The prior in decode's coordinates (see the module docstring): the top group's own prior over its first
    units (N(0, I), or a learned one: --prior mog | vamp), then the lower groups' standardized noise u ~ N(0, I),
    from which the top-down pass computes z_i = μ_p + σ_p·u_i. So a draw decodes to a sample of the model."""

    def __init__(self, top: Prior, latent_dim: int):
        super().__init__(latent_dim)
        self.top = top
        self.name, self.closed_form_kl = top.name, top.closed_form_kl

    def describe(self) -> str:
        return f"{self.top.describe()} for the top group, p(z_i | z_<i) below it"

    def log_prob(self, z: Tensor) -> Tensor:
        k = self.top.latent_dim
        return self.top.log_prob(z[..., :k]) + log_standard_normal(z[..., k:])

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        u = torch.randn(n, self.latent_dim, generator=generator, device=_gen_device(generator)) * temperature
        if not isinstance(self.top, StandardPrior):  # N(0, I) over the top too: one (n, L) draw, as for every unit
            u[:, :self.top.latent_dim] = self.top.sample(n, generator, temperature).to(u)
        return u

    def init_from_data(self, x: Tensor) -> None:
        self.top.init_from_data(x)


class HierarchicalVAE(VAE):
    """The hierarchy behind VAE's interface (see the module docstring). `width` channels in both passes (fewer above
    MAX_LATENT_SIDE from net_version 3: size_widths), `blocks` bottleneck blocks per encoder stage and per decoder
    refinement size, `groups` latent groups per resolution (or a list of counts, top first), `z_channels`
    channels per group (so the top group, at 1x1, has z_channels units). `prior` is the top group's prior
    (--prior: standard, mog, vamp); a learned one's KL is estimated at the drawn z_top (Terms.kl_estimate), the
    lower groups' stays in closed form."""

    def __init__(self, shape: tuple[int, int, int], width: int, blocks: int, groups: int | list[int] | None,
                 z_channels: int, likelihood: Likelihood, version: int = NET_VERSION, prior: str = "standard",
                 prior_components: int | None = None):
        nn.Module.__init__(self)  # VAE's single-latent networks are not built: the hierarchy replaces them
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.likelihood = likelihood
        sizes, _ = ladder(self.shape)
        mid = max(8, width // 4)
        widths = size_widths(sizes, width, version)
        self.widths = dict(zip(sizes, widths, strict=True))  # size -> channels of both passes, full size first
        mids = [mid if c == width else min(mid, c) for c in widths]  # a narrower size: at most c inside its blocks
        self.encoder = BottomUp(self.shape[0], sizes, widths, blocks, mids)
        self.decoder = TopDown(self.shape, width, blocks, groups, z_channels, likelihood.n_params, mid, widths, mids)
        self.latent_dim = self.decoder.latent_dim
        self.code_dim = z_channels
        # sample_prior draws the top group's z and the lower groups' standardized noise u ~ N(0, T² I) (see decode)
        top = make_prior(prior, z_channels, prior_components, self.shape, self._top_posterior)
        self.prior: HierarchyPrior = HierarchyPrior(top, self.latent_dim)
        self.opened: int | None = None  # groups drawn from q(z|x) in training and its ELBO; None: every group

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """The resolutions that hold latent groups, top first."""
        return list(dict.fromkeys(self.decoder.cell_sizes))

    def open_resolutions(self, k: int | None) -> None:
        """Let the groups of the top k resolutions (every one: None) learn from x; the groups below are drawn from
        their priors, q(z_i | x, z_<i) = p(z_i | z_<i), in forward, terms and the IWAE bound (--progressive). The
        bound stays a bound on log p(x): a posterior restricted so is still a posterior."""
        assert k is None or k >= 1, "the top resolution is always open"
        sizes = self.decoder.cell_sizes
        self.opened = None if k is None or k >= len(self.resolutions) else sizes.index(self.resolutions[k])

    @classmethod
    def from_config(cls, config, shape: tuple[int, int, int]) -> HierarchicalVAE:
        m = getattr(config, "model", config)
        lik = make_likelihood(m.likelihood, m.sigma, m.mixtures)
        return cls(shape, m.hidden[0], m.blocks, m.groups, m.latent_dim, lik, m.net_version, m.prior,
                   m.prior_components)

    @property
    def group_sizes(self) -> list[int]:
        """Units of each latent group, top first."""
        return list(self.decoder.group_sizes)

    def group_names(self) -> list[str]:
        """'1x1', '4x4', ... per group, top first ('7x7 #2' for a resolution's second group)."""
        names: list[str] = []
        seen: dict[tuple[int, int], int] = {}
        for h, w in self.decoder.cell_sizes:
            seen[(h, w)] = seen.get((h, w), 0) + 1
            names.append(f"{h}x{w}" + (f" #{seen[(h, w)]}" if seen[(h, w)] > 1 else ""))
        return names

    def per_group(self, per_unit: Tensor) -> Tensor:
        """Sums over each group's units: (..., L) -> (..., G)."""
        return group_sums(per_unit, self.group_sizes)

    def _top_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_q, log σ²_q) of the top group for images x, (B, code_dim) each: what a VampPrior encodes."""
        return self.decoder.top_posterior(self.encoder(x)[(1, 1)])

    @property
    def code_prior(self) -> Prior:
        return self.prior.top

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z_top | x): the top group's posterior, (B, code_dim)."""
        mean, logvar = self._top_posterior(x)
        return DiagonalGaussian(mean.to(x.dtype), logvar.to(x.dtype))

    def decode(self, z: Tensor) -> list[Tensor]:
        """Parameter maps for z (B, code_dim): the top group, the others at their prior means; or z (B, L): the
        top group, then the others' standardized prior noise u_i (z_i = μ_p + σ_p·u_i)."""
        if z.shape[-1] == self.code_dim and self.code_dim != self.latent_dim:
            z = torch.cat([z, z.new_zeros(z.shape[0], self.latent_dim - self.code_dim)], dim=1)
        elif z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must have {self.code_dim} (top group) or {self.latent_dim} (every group) "
                             f"columns; got {z.shape[-1]}")
        params, _ = self.decoder(z)
        return [p.to(z.dtype) for p in params]

    def _noise(self, x: Tensor, *lead: int) -> Tensor:
        return torch.randn((*lead, x.shape[0], self.latent_dim), dtype=x.dtype, device=x.device)

    def terms(self, x: Tensor, extras: bool = True, eps: Tensor | None = None) -> Terms:
        """One draw of every group per example; `eps` (B, L) is its noise (see the module docstring)."""
        eps = self._noise(x) if eps is None else eps
        params, draws = self.decoder(eps, self.encoder(x), keep=self.opened)
        rec, sq_err, sigma = self.observe(params, x, extras)
        kl, kl_top = self._kl(draws)
        return Terms(rec, kl, sq_err, sigma, q=draws.posterior(), z=draws.z, kl_estimate=kl_top,
                     group_sizes=tuple(self.group_sizes))

    def _kl(self, draws: Draws) -> tuple[Tensor, Tensor | None]:
        """(each unit's KL in closed form, (N, L); None, or with a learned top prior the top group's KL estimated
        at its draw, log q(z_top|x) − log p(z_top), (N,), its units then 0 in the first)."""
        kl = draws.kl_per_dim()
        if self.prior.closed_form_kl:
            return kl, None
        k, q = self.code_dim, draws.posterior()
        z = draws.z[:, :k]
        log_q = DiagonalGaussian(q.mean[:, :k], q.logvar[:, :k]).log_prob(z)
        return F.pad(kl[:, k:], (k, 0)), log_q - self.prior.top.log_prob(z)

    def _log_prior(self, draws: Draws) -> Tensor:
        """Σ_i log p(z_i | z_<i), (N,), with the top group's own prior."""
        if self.prior.closed_form_kl:
            return draws.log_p()
        k = self.code_dim
        return draws.log_p(k) + self.prior.top.log_prob(draws.z[:, :k])

    def forward(self, x: Tensor, eps: Tensor | None = None, samples: int = 1) -> Terms:
        """As VAE.forward. With K > 1 draws per example, kl_per_dim is the mean over the draws of each unit's
        KL, and q and z are (K, B, L): the lower groups' posteriors depend on the draws above them."""
        if samples == 1:
            return self.terms(x, extras=False, eps=eps)
        eps = self._noise(x, samples) if eps is None else eps  # (K, B, L)
        log_px_z, log_w, draws = self._weights(x, self.encoder(x), eps)
        q = draws.posterior()
        shape = eps.shape
        kl, kl_top = self._kl(draws)
        return Terms(-log_px_z.mean(0), kl.view(shape).mean(0), None, None, log_w,
                     q=DiagonalGaussian(q.mean.view(shape), q.logvar.view(shape)), z=draws.z.view(shape),
                     kl_estimate=None if kl_top is None else kl_top.view(shape[:2]).mean(0),
                     group_sizes=tuple(self.group_sizes))

    def _weights(self, x: Tensor, acts: dict, eps: Tensor) -> tuple[Tensor, Tensor, Draws]:
        """(log p(x|z_k), log w_k = log p(x|z_k) + Σ_i log p(z_i|z_<i) − Σ_i log q(z_i|x, z_<i)), each (K, B),
        for the noise eps (K, B, L) of K draws per example, and the draws ((K·B, L), draw-major)."""
        k, b = eps.shape[0], x.shape[0]
        flat = eps.reshape(k * b, -1)
        params, draws = self.decoder(flat, {s: a.repeat(k, 1, 1, 1) for s, a in acts.items()}, keep=self.opened)
        params = [p.reshape(k, *x.shape) for p in params]  # (K, B, C, H, W)
        log_px_z = self.likelihood.log_prob(params, x)  # (K, B)
        return log_px_z, log_px_z + (self._log_prior(draws) - draws.log_q(flat)).view(k, b), draws

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int, chunk: int = 100, eps: Tensor | None = None) -> Tensor:
        """As VAE.iwae_bound, with q(z|x) = Π_i q(z_i | x, z_<i) as the proposal; eps (K, B, L)."""
        acts = self.encoder(x)
        total = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
        for done in range(0, k, chunk):
            n = min(chunk, k - done)
            noise = self._noise(x, n) if eps is None else eps[done:done + n]  # (n, B, L)
            _, log_w, _ = self._weights(x, acts, noise)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        return total - math.log(k)

    @torch.no_grad()
    def unit_means(self, x: Tensor) -> Tensor:
        """Every group's posterior mean, (B, L), each group given the means of the groups above it."""
        _, draws = self.decoder(self._noise(x).zero_(), self.encoder(x))
        return draws.posterior().mean

    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder mean with every group at its posterior mean, each given the means above it, (B, C, H, W)."""
        params, _ = self.decoder(self._noise(x).zero_(), self.encoder(x))
        return self.likelihood.mean([p.to(x.dtype) for p in params])

    @torch.no_grad()
    def path_code(self, x: Tensor) -> Tensor:
        """Every group at its posterior mean (each given the means above it) in decode's coordinates, (B, L): the
        top group's mean, then each lower group's standardized offset u_i = (μ_q − μ_p) / σ_p from its prior. So
        decode(path_code(x)) is reconstruct(x), and a point between two images' codes decodes with each lower
        group as far from its prior, given the groups above it, as the images' codes put it."""
        _, draws = self.decoder(self._noise(x).zero_(), self.encoder(x))
        u = (draws.z - draws.pm) * torch.exp(-0.5 * draws.plv)
        top = self.group_sizes[0]
        return torch.cat([draws.z[:, :top], u[:, top:]], dim=1)

    @torch.no_grad()
    def decode_posterior(self, x: Tensor, noise: Tensor) -> list[Tensor]:
        """Parameter maps with every group drawn from q(z_i | x, z_<i), each given the draws above it, as the
        training pass draws them: z_i = μ_q + σ_q·noise_i, noise (B, L): 0 for every posterior mean (what
        reconstruct decodes), N(0, I) for a draw z ~ q(z|x)."""
        return self.decode_keeping(x, len(self.group_sizes), noise)

    @torch.no_grad()
    def reconstruct_draw(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """The decoder mean at z ~ q(z|x), (B, C, H, W): every group drawn from its posterior given the draws
        above it (decode_posterior), with `noise` (B, L) or fresh N(0, I) noise."""
        noise = self._noise(x) if noise is None else noise
        return self.likelihood.mean(self.decode_posterior(x, noise))

    @torch.no_grad()
    def decode_keeping(self, x: Tensor, keep: int, noise: Tensor) -> list[Tensor]:
        """Parameter maps with the top `keep` groups drawn from q(z|x) and the rest from the prior, both with
        `noise` (B, L): 0 for the posterior means and prior means, N(0, T²) for draws at temperature T."""
        params, _ = self.decoder(noise, self.encoder(x), keep=keep)
        return [p.to(x.dtype) for p in params]


ARCH_MODELS["hierarchical"] = HierarchicalVAE
