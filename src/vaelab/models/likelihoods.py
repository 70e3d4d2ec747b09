"""Observation models p(x|z): small objects with one interface and exact log-densities in nats.

The decoder emits `n_params` tensors per pixel (means, logits, log-scales); a likelihood turns them into
  log_prob(params, x) -> (B,)   summed over every pixel, no constant dropped (params may carry leading
                                sample dims, (K, B, C, H, W), against x (B, C, H, W): the result is (K, B)),
  mean(params)        -> (B, C, H, W)   the decoder mean f(z) in pixel space,
  sample(params)      -> (B, C, H, W)   a draw x ~ p(x|z),
  scale(params)       -> (B,) or None   the σ (or Laplace b, logistic s) in use, averaged over pixels.
  init_from_data(params, x)             sets a learned scale from the untrained decoder, before training.
  scale_lr(optimizer, n_pixels)         the step size of the likelihood's own parameters (None: the nets').
Add a family by adding one class to LIKELIHOODS.

Where a family's gradient has a simple closed form, its log_prob is a torch.autograd.Function that computes
the value in the forward pass and that closed form in the backward pass (Bernoulli: x − sigmoid(l); Gaussian
with one shared σ: (x − μ)/σ², and Σ ||x − μ||²/σ² − D for log σ). Autograd would keep and replay every
intermediate of the expression instead. Being ordinary autograd nodes, they work wherever log_prob is used:
under autocast, with hooks or frozen parameters, behind conv decoders, and without gradients at evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


def _sum_pixels(t: Tensor) -> Tensor:
    return t.sum(dim=(-3, -2, -1))  # (..., C, H, W) -> (...): x (B, C, H, W) broadcasts against (K, B, C, H, W)


class Likelihood(nn.Module):
    name: str = ""
    n_params: int = 1  # parameter tensors per pixel the decoder must produce
    continuous: bool = True  # a density over [0, 1]^D (vs. a probability mass on {0, 1}^D or 256 levels)
    binary_only: bool = False  # normalized only on binary data
    default_sigma: str = "0.1"  # --sigma when none is given
    mixtures_allowed: bool = False  # whether --mixtures K > 1 means something for this family

    def log_prob(self, params: list[Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: list[Tensor]) -> Tensor:
        return params[0]

    def sample(self, params: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def scale(self, params: list[Tensor]) -> Tensor | None:
        return None

    def init_from_data(self, params: list[Tensor], x: Tensor) -> None:
        """Set the likelihood's own parameters from the untrained decoder's output on a batch of training
        data (called once, before the first step); nothing to do for a family without any."""

    def scale_lr(self, optimizer: str, n_pixels: int) -> float | None:
        """The step size of the likelihood's own parameters, or None for the networks' learning rate."""
        return None

    def describe(self) -> str:
        return self.name

    @classmethod
    def make(cls, arg: str, mixtures: int = 1) -> Likelihood:
        return cls()


def _parse_positive(value: str, flag: str, allowed: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{flag} must be a number > 0 or one of {allowed}; got {value!r}")
    return v


def _soft_bounds(log_s: Tensor, lo: float, hi: float) -> Tensor:
    """A smooth, monotone map of log s into [lo, hi] that is the identity well inside it."""
    return hi - F.softplus(hi - (lo + F.softplus(log_s - lo)))


def _soft_bounds_inverse(y: Tensor, lo: float, hi: float) -> Tensor:
    """The log s that _soft_bounds maps to y (lo < y < hi)."""
    w = hi - torch.log(torch.expm1(hi - y))
    return lo + torch.log(torch.expm1(w - lo))


class ScaledLikelihood(Likelihood):
    """A location family with a scale (Gaussian σ, Laplace b, logistic s) that is one of
      fixed    a number the user gave;
      learned  one shared scalar, kept as its log;
      pixel    one per pixel from the decoder (its second output, softly bounded to [SCALE_MIN, SCALE_MAX]),
               plus one shared learned offset in log space.
    A learned scale starts at its maximum-likelihood value for the untrained decoder (init_from_data) and
    moves with its own step size (scale_lr), so it keeps up with the decoder; the objective it maximizes is
    the ELBO as before.
    """

    scale_name = "scale"
    SCALE_MIN, SCALE_MAX = 1e-3, 1.0  # pixel mode's soft bounds
    ADAM_SCALE_LR = 0.05  # Adam moves log scale by about this much per step while the gradient keeps its sign

    def __init__(self, scale: float = 0.1, learned: bool = False, pixel: bool = False):
        super().__init__()
        self.learned, self.pixel = learned or pixel, pixel
        self.fixed_log_scale = math.log(scale)
        if self.learned:  # learned: log s; pixel: the shared offset added to the decoder's log s
            self.log_scale = nn.Parameter(torch.tensor(0.0))
        if pixel:
            self.n_params = self.n_params + 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.pixel and prefix + "log_scale" not in state_dict:  # a run saved before the offset existed
            state_dict[prefix + "log_scale"] = torch.zeros(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_scale_for(self, params: list[Tensor]) -> Tensor:
        if self.pixel:
            return _soft_bounds(params[-1] + self.log_scale, math.log(self.SCALE_MIN), math.log(self.SCALE_MAX))
        if self.learned:
            return self.log_scale
        # a fill on the device, not a copy from host memory, so the step can be recorded as a CUDA graph
        return params[0].new_full((), self.fixed_log_scale)

    def location(self, params: list[Tensor]) -> Tensor:
        return params[0]

    def raw_log_scale(self, params: list[Tensor]) -> Tensor:
        """The decoder's log-scale output (pixel mode), before the shared offset and the bounds."""
        return params[-1]

    def mle_log_scale(self, mu: Tensor, x: Tensor) -> Tensor:
        """log of the shared scale that maximizes the likelihood of x given the location mu."""
        raise NotImplementedError

    def init_from_data(self, params, x):
        if not self.learned:
            return
        lo, hi = math.log(self.SCALE_MIN), math.log(self.SCALE_MAX)
        with torch.no_grad():
            best = self.mle_log_scale(self.location(params), x)
            if self.pixel:  # centre the decoder's (random) log-scale output on the best shared value
                best = best.clamp(lo + 0.01, hi - 0.01)
                best = _soft_bounds_inverse(best, lo, hi) - self.raw_log_scale(params).mean()
            self.log_scale.copy_(best)

    def scale_lr(self, optimizer, n_pixels):
        """Adam: a fixed step in log scale. SGD: half a Newton step; the loss's curvature in log scale at the
        optimum is 2 per pixel (Gaussian), so 1/(4·D) halves the distance to the optimum at every step."""
        if not self.learned:
            return None
        return self.ADAM_SCALE_LR if optimizer == "adam" else 0.25 / n_pixels

    def scale(self, params):
        s = torch.exp(self.log_scale_for(params))
        return s.expand(params[0].shape[0]) if s.dim() == 0 else s.flatten(1).mean(1)

    def describe(self):
        if self.pixel:
            return (f"{self.name} ({self.scale_name} per pixel from the decoder, in [{self.SCALE_MIN:g}, "
                    f"{self.SCALE_MAX:g}])")
        value = "learned, shared" if self.learned else f"= {math.exp(self.fixed_log_scale):g}"
        return f"{self.name} ({self.scale_name} {value})"


class Gaussian(ScaledLikelihood):
    """N(x; μ, σ²I) with μ the decoder output and σ fixed (a number) or one learned scalar."""

    name, scale_name = "gaussian", "σ"

    def log_prob(self, params, x):
        mu = params[0]
        log_sigma = self.log_scale_for(params)
        if log_sigma.dim() == 0:  # one σ for every pixel (fixed or learned): the closed-form gradient applies
            return SharedSigmaGaussianLogProb.apply(mu, x, log_sigma)
        return -_sum_pixels(0.5 * ((x - mu) * torch.exp(-log_sigma)).square() + log_sigma + 0.5 * LOG_2PI)

    def sample(self, params):
        mu = params[0]
        return mu + torch.exp(self.log_scale_for(params)) * torch.randn_like(mu)

    def mle_log_scale(self, mu, x):
        return 0.5 * torch.log((x - mu).square().mean().clamp_min(1e-12))  # σ² = MSE

    @classmethod
    def make(cls, arg, mixtures=1):
        table = {"learned": lambda: cls(learned=True), "learned-pixel": GaussianPixel, "optimal": GaussianOptimal}
        if arg in table:
            return table[arg]()
        return cls(_parse_positive(arg, "--sigma", ", ".join(table)))


class GaussianPixel(Gaussian):
    """σ per pixel from the decoder (times one shared learned factor); log σ softly bounded to
    [log SIGMA_MIN, log SIGMA_MAX]."""

    SIGMA_MIN, SIGMA_MAX = ScaledLikelihood.SCALE_MIN, ScaledLikelihood.SCALE_MAX

    def __init__(self):
        super().__init__(pixel=True)


class GaussianOptimal(Gaussian):
    """σ*² = the batch's mean squared error (the calibrated-decoder rule); a running value at evaluation.

    σ is held fixed inside the gradient (detached); at σ* the derivative of the loss in σ is zero, so the
    gradients equal those of the un-detached expression.
    """

    MOMENTUM = 0.1
    MIN_VAR = 1e-6
    running_var: Tensor  # buffers, registered in __init__
    n_updates: Tensor

    def __init__(self):
        nn.Module.__init__(self)
        self.learned, self.pixel = True, False
        self.register_buffer("running_var", torch.tensor(1.0))
        self.register_buffer("n_updates", torch.tensor(0, dtype=torch.long))
        self._batch_log_sigma: Tensor | None = None
        # data-parallel training: sums a tensor over every process's part of the batch (see vaelab.distributed)
        self.batch_reduce: Callable[[Tensor], Tensor] | None = None

    def log_prob(self, params, x):
        mu = params[0]
        sq = _sum_pixels((x - mu).square())  # (B,)
        if self.training and self.batch_reduce is not None:  # σ*² from the whole batch, not this process's part
            total = self.batch_reduce(torch.stack([sq.detach().sum(), sq.new_tensor(float(sq.shape[0]))]))
            var = (total[0] / (total[1] * x[0].numel())).clamp_min(self.MIN_VAR)
        elif self.training:
            var = (sq.detach().mean() / x[0].numel()).clamp_min(self.MIN_VAR)
        if self.training:
            with torch.no_grad():
                m = torch.where(self.n_updates > 0, self.MOMENTUM, 1.0)
                self.running_var.lerp_(var, m)
                self.n_updates += 1
        else:
            var = self.running_var
        log_sigma = 0.5 * torch.log(var)
        self._batch_log_sigma = log_sigma
        d = x[0].numel()
        return -0.5 * sq / var - d * (log_sigma + 0.5 * LOG_2PI)

    def log_scale_for(self, params):
        if self._batch_log_sigma is not None and self.training:
            return self._batch_log_sigma
        return 0.5 * torch.log(self.running_var)

    def init_from_data(self, params, x):
        pass  # σ² is the batch MSE from the first step on

    def scale_lr(self, optimizer, n_pixels):
        return None

    def describe(self):
        return "gaussian (σ² = batch MSE while training, running value at evaluation)"


class Bernoulli(Likelihood):
    """Bernoulli with logits. On non-binary data it is a cross-entropy, not a normalized density."""

    name = "bernoulli"
    continuous = False
    binary_only = True

    def log_prob(self, params, x):
        return BernoulliLogProb.apply(params[0], x)

    def mean(self, params):
        return torch.sigmoid(params[0])

    def sample(self, params):
        return torch.bernoulli(torch.sigmoid(params[0]))


def _per_example(grad: Tensor) -> Tensor:
    """The incoming gradient of a per-example log-density, (...,), shaped to broadcast over (..., C, H, W)."""
    return grad[..., None, None, None]


class BernoulliLogProb(torch.autograd.Function):
    """log p(x | logits) = Σ_pixels x·l − softplus(l), per example; d/dl = x − sigmoid(l), d/dx = l.

    logits (..., B, C, H, W) against x (B, C, H, W) gives (..., B), as the plain expression would.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(logits, x)
        return _sum_pixels(x * logits) - _sum_pixels(F.softplus(logits))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, x = ctx.saved_tensors
        g = _per_example(grad)
        d_logits = torch.sigmoid(logits).sub_(x).mul_(-g) if ctx.needs_input_grad[0] else None
        d_x = (logits * g).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        return d_logits, d_x


class SharedSigmaGaussianLogProb(torch.autograd.Function):
    """log N(x; μ, σ²I) per example for one σ shared by all pixels, given log σ (a 0-dim tensor):
    −||x − μ||²/2σ² − D·(log σ + ½ log 2π), with d/dμ = (x − μ)/σ² = −d/dx and d/d log σ = ||x − μ||²/σ² − D.

    μ (..., B, C, H, W) against x (B, C, H, W) gives (..., B), as the plain expression would.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, x: Tensor, log_sigma: Tensor) -> Tensor:
        diff = x - mu  # (..., B, C, H, W)
        sq = _sum_pixels(diff.square())  # (..., B)
        inv_var = torch.exp(-2 * log_sigma)
        d = math.prod(x.shape[-3:])
        ctx.save_for_backward(diff, sq, inv_var)
        ctx.shapes, ctx.d = (mu.shape, x.shape, log_sigma.shape), d
        return -0.5 * sq * inv_var - d * (log_sigma + 0.5 * LOG_2PI)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        diff, sq, inv_var = ctx.saved_tensors
        mu_shape, x_shape, log_sigma_shape = ctx.shapes
        d_mu = d_x = d_log_sigma = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_diff = diff * (_per_example(grad) * inv_var)  # d/dμ; d/dx is its negative
            d_mu = d_diff.sum_to_size(mu_shape) if ctx.needs_input_grad[0] else None
            d_x = -d_diff.sum_to_size(x_shape) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            d_log_sigma = (grad * (sq * inv_var - ctx.d)).sum().reshape(log_sigma_shape)
        return d_mu, d_x, d_log_sigma


def _log_cb_norm(logits: Tensor) -> Tensor:
    """log C(η) of the continuous Bernoulli in logits: C = η / tanh(η/2), with C(0) = 2, in stable forms."""
    a = logits.abs()
    small = a < 1e-2
    a_safe = torch.where(small, torch.ones_like(a), a)
    e = torch.exp(-a_safe)
    exact = torch.log(a_safe) - (torch.log1p(-e) - torch.log1p(e))  # log|η| - log tanh(|η|/2)
    taylor = math.log(2.0) + logits.square() / 12.0  # log(2 + η²/6 + O(η⁴))
    return torch.where(small, taylor, exact)


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019): a normalized density on [0, 1]."""

    name = "continuous-bernoulli"

    def log_prob(self, params, x):
        eta = params[0]
        return _sum_pixels(x * eta) - _sum_pixels(F.softplus(eta) - _log_cb_norm(eta))

    def mean(self, params):
        return torch.distributions.ContinuousBernoulli(logits=params[0]).mean

    def sample(self, params):
        return torch.distributions.ContinuousBernoulli(logits=params[0]).sample()


class Laplace(ScaledLikelihood):
    """Laplace(x; μ, b): −log p = |x−μ|/b + log 2b per pixel; b fixed or one learned scalar."""

    name, scale_name = "laplace", "b"

    def log_prob(self, params, x):
        d = x[0].numel()
        log_b = self.log_scale_for(params)
        return -_sum_pixels((x - params[0]).abs()) * torch.exp(-log_b) - d * (log_b + math.log(2.0))

    def sample(self, params):
        return torch.distributions.Laplace(params[0], torch.exp(self.log_scale_for(params))).sample()

    def mle_log_scale(self, mu, x):
        return torch.log((x - mu).abs().mean().clamp_min(1e-12))  # b = mean absolute error

    @classmethod
    def make(cls, arg, mixtures=1):
        if arg == "learned":
            return cls(learned=True)
        return cls(_parse_positive(arg, "--sigma (the Laplace scale b)", "learned"))


# ------------------------------------------------------------------------------------------- 8-bit pixels
LEVELS = 256  # 8-bit pixels: x = k / 255, k = 0..255
HALF_BIN = 0.5 / (LEVELS - 1)


def _bins(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each pixel's 8-bit bin: (lower edge, upper edge, is the first bin, is the last bin), on the [0, 1] scale.

    8-bit data (x = k/255) falls exactly on a level; other values are rounded to the nearest of the 256."""
    k = torch.round(x * (LEVELS - 1)).clamp_(0, LEVELS - 1)
    centre = k / (LEVELS - 1)
    return centre - HALF_BIN, centre + HALF_BIN, k == 0, k == LEVELS - 1


def log_diff_sigmoid(a: Tensor, b: Tensor, width: Tensor) -> Tensor:
    """log(sigmoid(a) − sigmoid(b)) for a − b = width > 0, in a form that is exact in both tails:
    sigmoid(a) − sigmoid(b) = sigmoid(a)·sigmoid(−b)·(1 − exp(−(a − b)))."""
    return -F.softplus(-a) - F.softplus(b) + torch.log(-torch.expm1(-width))


LOG_SQRT_2PI = 0.5 * LOG_2PI
SQRT2 = math.sqrt(2.0)


def log_ndtr(u: Tensor) -> Tensor:
    """log Φ(u) with a gradient that stays right in float32 far into the lower tail (torch.special.log_ndtr's
    is off by 4 % at u = −1000 and meaningless beyond): Φ(u) = erfcx(−u/√2)·exp(−u²/2)/2 for u < 0."""
    left = torch.log(0.5 * torch.special.erfcx(-u.clamp(max=0) / SQRT2)) - 0.5 * u.square()
    right = torch.log1p(-0.5 * torch.special.erfc(u.clamp(min=0) / SQRT2))
    return torch.where(u < 0, left, right)
NARROW = 1e-2  # a bin narrower than this many σ is integrated by the midpoint rule (error ~ width⁴/1920)


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
        raise NotImplementedError

    def sample(self, params):
        log_w, mu, log_s = self._parts(params)
        if log_w is not None:  # pick one component per pixel
            pick = torch.distributions.Categorical(logits=log_w.movedim(0, -1)).sample().unsqueeze(0)
            mu, log_s = mu.gather(0, pick).squeeze(0), log_s.gather(0, pick).squeeze(0)
        y = self.draw(mu, torch.exp(log_s).expand_as(mu))
        return torch.round(y.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)

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


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
    "continuous-bernoulli": ContinuousBernoulli,
    "laplace": Laplace,
    "discretized-logistic": DiscretizedLogistic,
    "discretized-gaussian": DiscretizedGaussian,
}


def make_likelihood(name: str, sigma: str | None = None, mixtures: int = 1) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ConfigError(f"--likelihood must be one of {', '.join(LIKELIHOODS)}; got {name!r}")
    family = LIKELIHOODS[name]
    if not (isinstance(mixtures, int) and not isinstance(mixtures, bool) and mixtures >= 1):
        raise ConfigError(f"--mixtures must be an integer >= 1; got {mixtures!r}")
    if mixtures > 1 and not family.mixtures_allowed:
        allowed = ", ".join(k for k, v in LIKELIHOODS.items() if v.mixtures_allowed)
        raise ConfigError(f"--mixtures {mixtures} applies to {allowed} only; got --likelihood {name}")
    return family.make(str(family.default_sigma if sigma is None else sigma), mixtures)


def check_likelihood(name: str, sigma: str | None, mixtures: int = 1) -> None:
    make_likelihood(name, sigma, mixtures)


def is_gaussian(lik: Likelihood) -> bool:
    return isinstance(lik, Gaussian)
