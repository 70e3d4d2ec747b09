"""The Gaussian family N(x; f(z), σ²I): σ fixed, one learned scalar, one per pixel, or the batch's optimum."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import LOG_2PI, ScaledLikelihood, _parse_positive, _per_example, _sum_pixels


class Gaussian(ScaledLikelihood):
    """N(x; μ, σ²I) with μ the decoder output and σ fixed (a number) or one learned scalar."""

    name, scale_name = "gaussian", "σ"
    additive_gaussian_noise = True
    page_mean, page_draw = "identity", "normal"

    def log_prob(self, params, x):
        mu = params[0]
        log_sigma = self.log_scale_for(params)
        if log_sigma.dim() == 0:  # one σ for every pixel (fixed or learned): the closed-form gradient applies
            return SharedSigmaGaussianLogProb.apply(mu, x, log_sigma)
        return -_sum_pixels(0.5 * ((x - mu) * torch.exp(-log_sigma)).square() + log_sigma + 0.5 * LOG_2PI)

    def sample(self, params, scale=None):
        mu = params[0]
        return mu + self.scale_for(params, scale) * torch.randn_like(mu)

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
                # a non-finite batch (a step the training step's guard skips) leaves the running value alone
                self.running_var.copy_(torch.where(torch.isfinite(var), self.running_var.lerp(var, m),
                                                   self.running_var))
                self.n_updates += torch.isfinite(var).long()
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
