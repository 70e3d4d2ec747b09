"""Observation models p(x|z): small objects with one interface and exact log-densities in nats.

The decoder emits `n_params` tensors per pixel (means, logits, log-scales); a likelihood turns them into
  log_prob(params, x) -> (B,)   summed over every pixel, no constant dropped (params may carry leading
                                sample dims, (K, B, C, H, W), against x (B, C, H, W): the result is (K, B)),
  mean(params)        -> (B, C, H, W)   the decoder mean f(z) in pixel space,
  sample(params)      -> (B, C, H, W)   a draw x ~ p(x|z),
  scale(params)       -> (B,) or None   the σ (or Laplace b) in use, averaged over pixels, for reporting.
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

from .errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


def _sum_pixels(t: Tensor) -> Tensor:
    return t.sum(dim=(-3, -2, -1))  # (..., C, H, W) -> (...): x (B, C, H, W) broadcasts against (K, B, C, H, W)


class Likelihood(nn.Module):
    name: str = ""
    n_params: int = 1  # parameter tensors per pixel the decoder must produce
    continuous: bool = True  # a density over [0, 1]^D (vs. a probability mass on {0, 1}^D)
    binary_only: bool = False  # normalized only on binary data

    def log_prob(self, params: list[Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: list[Tensor]) -> Tensor:
        return params[0]

    def sample(self, params: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def scale(self, params: list[Tensor]) -> Tensor | None:
        return None

    def describe(self) -> str:
        return self.name

    @classmethod
    def make(cls, arg: str) -> Likelihood:
        return cls()


def _parse_positive(value: str, flag: str, allowed: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{flag} must be a number > 0 or one of {allowed}; got {value!r}")
    return v


class ScaledLikelihood(Likelihood):
    """A location family with one scale: fixed (a number) or one learned scalar, kept as its log."""

    scale_name = "scale"

    def __init__(self, scale: float = 0.1, learned: bool = False):
        super().__init__()
        self.learned = learned
        self.fixed_log_scale = math.log(scale)
        if learned:
            self.log_scale = nn.Parameter(torch.tensor(0.0))

    def log_scale_for(self, params: list[Tensor]) -> Tensor:
        if self.learned:
            return self.log_scale
        return torch.tensor(self.fixed_log_scale, dtype=params[0].dtype, device=params[0].device)

    def scale(self, params):
        s = torch.exp(self.log_scale_for(params))
        return s.expand(params[0].shape[0]) if s.dim() == 0 else s.flatten(1).mean(1)

    def describe(self):
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

    @classmethod
    def make(cls, arg):
        table = {"learned": lambda: cls(learned=True), "learned-pixel": GaussianPixel, "optimal": GaussianOptimal}
        if arg in table:
            return table[arg]()
        return cls(_parse_positive(arg, "--sigma", ", ".join(table)))


class GaussianPixel(Gaussian):
    """σ per pixel from the decoder; log σ softly bounded to [log SIGMA_MIN, log SIGMA_MAX]."""

    n_params = 2
    SIGMA_MIN, SIGMA_MAX = 1e-3, 1.0

    def __init__(self):
        nn.Module.__init__(self)
        self.learned = True

    def log_scale_for(self, params):
        lo, hi = math.log(self.SIGMA_MIN), math.log(self.SIGMA_MAX)
        raw = params[1]
        return hi - F.softplus(hi - (lo + F.softplus(raw - lo)))

    def describe(self):
        return f"gaussian (σ per pixel from the decoder, in [{self.SIGMA_MIN:g}, {self.SIGMA_MAX:g}])"


class GaussianOptimal(Gaussian):
    """σ*² = the batch's mean squared error (the calibrated-decoder rule); a running value at evaluation.

    σ is held fixed inside the gradient (detached); at σ* the derivative of the loss in σ is zero, so the
    gradients equal those of the un-detached expression.
    """

    MOMENTUM = 0.1
    MIN_VAR = 1e-6

    def __init__(self):
        nn.Module.__init__(self)
        self.learned = True
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

    @classmethod
    def make(cls, arg):
        if arg == "learned":
            return cls(learned=True)
        return cls(_parse_positive(arg, "--sigma (the Laplace scale b)", "learned"))


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
    "continuous-bernoulli": ContinuousBernoulli,
    "laplace": Laplace,
}


def make_likelihood(name: str, sigma: str = "0.1") -> Likelihood:
    if name not in LIKELIHOODS:
        raise ConfigError(f"--likelihood must be one of {', '.join(LIKELIHOODS)}; got {name!r}")
    return LIKELIHOODS[name].make(str(sigma))


def check_likelihood(name: str, sigma: str) -> None:
    make_likelihood(name, sigma)


def is_gaussian(lik: Likelihood) -> bool:
    return isinstance(lik, Gaussian)
