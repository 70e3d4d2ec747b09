"""Families on 8-bit pixels: a continuous location-scale law rounded to the 256 levels (PixelCNN++'s
discretized logistic, and the discretized Gaussian), optionally a mixture of K per pixel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .base import LOG_2PI, ScaledLikelihood, _parse_positive, _soft_bounds, _sum_pixels

LEVELS = 256  # 8-bit pixels: x = k / 255, k = 0..255
HALF_BIN = 0.5 / (LEVELS - 1)
LOG_SQRT_2PI = 0.5 * LOG_2PI
SQRT2 = math.sqrt(2.0)
NARROW = 1e-2  # a bin narrower than this many σ is integrated by the midpoint rule (error ~ width⁴/1920)


def _bins(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each pixel's 8-bit bin: (lower edge, upper edge, is the first bin, is the last bin), on the [0, 1] scale.

    8-bit data (x = k/255) falls exactly on a level; other values are rounded to the nearest of the 256."""
    k = torch.round(x * (LEVELS - 1)).clamp_(0, LEVELS - 1)
    centre = k / (LEVELS - 1)
    return centre - HALF_BIN, centre + HALF_BIN, k == 0, k == LEVELS - 1


def to_levels(y: Tensor) -> Tensor:
    """Values on the real line -> the nearest of the 256 8-bit levels in [0, 1]."""
    return torch.round(y.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)


def log_diff_sigmoid(a: Tensor, b: Tensor, width: Tensor) -> Tensor:
    """log(sigmoid(a) − sigmoid(b)) for a − b = width > 0, in a form that is exact in both tails:
    sigmoid(a) − sigmoid(b) = sigmoid(a)·sigmoid(−b)·(1 − exp(−(a − b)))."""
    return -F.softplus(-a) - F.softplus(b) + torch.log(-torch.expm1(-width))


def log_ndtr(u: Tensor) -> Tensor:
    """log Φ(u) with a gradient that stays right in float32 far into the lower tail (torch.special.log_ndtr's
    is off by 4 % at u = −1000 and meaningless beyond): Φ(u) = erfcx(−u/√2)·exp(−u²/2)/2 for u < 0."""
    left = torch.log(0.5 * torch.special.erfcx(-u.clamp(max=0) / SQRT2)) - 0.5 * u.square()
    right = torch.log1p(-0.5 * torch.special.erfc(u.clamp(min=0) / SQRT2))
    return torch.where(u < 0, left, right)


def log_diff_ndtr(u: Tensor, lo: Tensor) -> Tensor:
    """log(Φ(u) − Φ(lo)) for u > lo: the midpoint rule with its second-order term for a narrow bin (where the
    difference of two CDF values would cancel), else a difference of log-CDFs on the side of the lower tail."""
    width, mid = u - lo, 0.5 * (u + lo)
    narrow = width < NARROW
    midpoint = (-0.5 * mid.square() - LOG_SQRT_2PI + torch.log(width)
                + torch.log1p((mid.square() - 1) * width.square() / 24))
    flip = lo > 0  # Φ(u) − Φ(lo) = Φ(−lo) − Φ(−u): keep both arguments where the log-CDF is accurate
    hi_, lo_ = torch.where(flip, -lo, u), torch.where(flip, -u, lo)
    log_hi, log_lo = log_ndtr(hi_), log_ndtr(lo_)
    gap = torch.where(narrow, -torch.ones_like(log_hi), log_lo - log_hi)  # a safe value where unused
    wide = log_hi + torch.log(-torch.expm1(gap))
    return torch.where(narrow, midpoint, wide)


class Discretized(ScaledLikelihood):
    """A continuous location-scale law on the pixel scale, rounded to the 256 levels of 8-bit data with open
    end bins: P(k) = F(upper edge of bin k) − F(lower edge), the first bin taking everything below, the last
    everything above. A probability mass (bits/dim need no log 256 term), normalized for any parameters.

    With `--mixtures K`, each pixel's value (each channel) is a mixture of K such laws: the decoder gives K
    logits, K locations and K log-scales per pixel.
    """

    continuous = False
    default_sigma = "learned-pixel"
    SCALE_MIN, SCALE_MAX = 1e-4, 10.0

    def __init__(self, scale: float = 0.1, learned: bool = False, pixel: bool = False, mixtures: int = 1):
        super().__init__(scale, learned, pixel)
        self.mixtures = mixtures
        if mixtures > 1:
            self.n_params = 3 * mixtures  # logits, locations, raw log-scales: K tensors each

    def _parts(self, params: list[Tensor]) -> tuple[Tensor | None, Tensor, Tensor]:
        """(log mixture weights or None, locations, log scales); with K > 1 each is stacked (K, ..., C, H, W)."""
        if self.mixtures == 1:
            return None, params[0], self.log_scale_for(params)
        k = self.mixtures
        logits, locs, raws = (torch.stack(params[i * k:(i + 1) * k]) for i in range(3))
        log_s = _soft_bounds(raws + self.log_scale, math.log(self.SCALE_MIN), math.log(self.SCALE_MAX))
        return torch.log_softmax(logits, dim=0), locs, log_s

    def location(self, params):
        if self.mixtures == 1:
            return params[0]
        k = self.mixtures
        return (torch.softmax(torch.stack(params[:k]), 0) * torch.stack(params[k:2 * k])).sum(0)

    def raw_log_scale(self, params):
        return torch.stack(params[-self.mixtures:]) if self.mixtures > 1 else params[-1]

    def log_bins(self, mu: Tensor, log_s: Tensor, x: Tensor) -> Tensor:
        """log P(bin of x) per pixel for location mu and log-scale log_s (broadcast together)."""
        raise NotImplementedError

    def log_prob(self, params, x):
        log_w, mu, log_s = self._parts(params)
        log_p = self.log_bins(mu, log_s, x)
        if log_w is not None:
            log_p = torch.logsumexp(log_w + log_p, dim=0)  # (..., C, H, W)
        return _sum_pixels(log_p)

    def clipped_mean(self, mu: Tensor, s: Tensor) -> Tensor:
        """E[clip(Y, 0, 1)] for Y of this law: the 8-bit mean to within half a level."""
        raise NotImplementedError

    def mean(self, params):
        log_w, mu, log_s = self._parts(params)
        m = self.clipped_mean(mu, torch.exp(log_s))
        return m if log_w is None else (torch.exp(log_w) * m).sum(0)

    def draw(self, mu: Tensor, s: Tensor) -> Tensor:
        """Draws of the continuous law (location mu, scale s, same shape) before rounding."""
        raise NotImplementedError

    def sample(self, params, scale=None):
        """A draw on the 256 levels; `scale` replaces every component's scale (0: the rounded location)."""
        self._check_scale(scale)
        log_w, mu, log_s = self._parts(params)
        s = torch.exp(log_s).expand_as(mu) if scale is None else torch.full_like(mu, scale)
        if log_w is not None:  # pick one component per pixel
            pick = torch.distributions.Categorical(logits=log_w.movedim(0, -1)).sample().unsqueeze(0)
            mu, s = mu.gather(0, pick).squeeze(0), s.gather(0, pick).squeeze(0)
        return to_levels(self.draw(mu, s))

    def scale(self, params):
        log_w, mu, log_s = self._parts(params)
        s = torch.exp(log_s)
        if log_w is not None:
            s = (torch.exp(log_w) * s).sum(0)
        return s.expand(mu.shape[0]) if s.dim() == 0 else s.flatten(1).mean(1)

    def describe(self):
        if self.mixtures == 1:
            return super().describe()
        return f"{self.name} (mixture of {self.mixtures} per pixel, scales from the decoder)"

    @classmethod
    def make(cls, arg, mixtures=1):
        allowed = "learned, learned-pixel"
        if mixtures > 1 and arg != "learned-pixel":
            raise ConfigError(f"--mixtures {mixtures} takes its scales from the decoder: use --sigma learned-pixel "
                              f"(the default for {cls.name}); got --sigma {arg}")
        if arg == "learned":
            return cls(learned=True)
        if arg == "learned-pixel":
            return cls(pixel=True, mixtures=mixtures)
        return cls(_parse_positive(arg, f"--sigma (the {cls.scale_name} of {cls.name})", allowed))


class DiscretizedLogistic(Discretized):
    """The logistic law (location μ, scale s; sd = s·π/√3) on 256 levels, as in PixelCNN++."""

    name, scale_name = "discretized-logistic", "s"
    mixtures_allowed = True

    def log_bins(self, mu, log_s, x):
        lower, upper, first, last = _bins(x)
        inv_s = torch.exp(-log_s)
        a, b = (upper - mu) * inv_s, (lower - mu) * inv_s  # standardized bin edges
        inner = log_diff_sigmoid(a, b, (2 * HALF_BIN) * inv_s)
        return torch.where(first, -F.softplus(-a), torch.where(last, -F.softplus(b), inner))

    def clipped_mean(self, mu, s):
        # E clip(Y,0,1) = 1 − ∫₀¹ F(t) dt, and ∫ sigmoid((t−μ)/s) dt = s·softplus((t−μ)/s)
        return 1 - s * (F.softplus((1 - mu) / s) - F.softplus(-mu / s))

    def draw(self, mu, s):
        u = torch.rand_like(mu).clamp_(1e-6, 1 - 1e-6)
        return mu + s * (torch.log(u) - torch.log1p(-u))

    def mle_log_scale(self, mu, x):
        mse = (x - mu).square().mean().clamp_min(1e-12)  # the logistic's variance is s²π²/3
        return 0.5 * torch.log(3 * mse) - math.log(math.pi)


class DiscretizedGaussian(Discretized):
    """The Gaussian law N(μ, σ²) on 256 levels."""

    name, scale_name = "discretized-gaussian", "σ"

    def log_bins(self, mu, log_s, x):
        lower, upper, first, last = _bins(x)
        inv_s = torch.exp(-log_s)
        u, lo = (upper - mu) * inv_s, (lower - mu) * inv_s
        inner = log_diff_ndtr(u, lo)
        return torch.where(first, log_ndtr(u), torch.where(last, log_ndtr(-lo), inner))

    def clipped_mean(self, mu, s):
        # ∫ Φ((t−μ)/σ) dt = σ·G((t−μ)/σ) with G(u) = u·Φ(u) + φ(u)
        def g(u):
            return u * torch.special.ndtr(u) + torch.exp(-0.5 * u.square() - LOG_SQRT_2PI)

        return 1 - s * (g((1 - mu) / s) - g(-mu / s))

    def draw(self, mu, s):
        return mu + s * torch.randn_like(mu)

    def mle_log_scale(self, mu, x):
        return 0.5 * torch.log((x - mu).square().mean().clamp_min(1e-12))
