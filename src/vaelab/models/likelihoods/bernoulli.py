"""Families on logits: the Bernoulli (a probability mass on binary pixels) and the continuous Bernoulli
(a normalized density on [0, 1])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Likelihood, _per_example, _sum_pixels


class Bernoulli(Likelihood):
    """Bernoulli with logits. On non-binary data it is a cross-entropy, not a normalized density."""

    name = "bernoulli"
    continuous = False
    binary_only = True
    page_mean, page_draw = "sigmoid", "coin-flip"

    def log_prob(self, params, x):
        return BernoulliLogProb.apply(params[0], x)

    def mean(self, params):
        return torch.sigmoid(params[0])

    def sample(self, params, scale=None):
        self._check_scale(scale)
        return torch.bernoulli(torch.sigmoid(params[0]))


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
    page_mean, page_draw = "cb-mean", "cb-inverse-cdf"

    def log_prob(self, params, x):
        eta = params[0]
        return _sum_pixels(x * eta) - _sum_pixels(F.softplus(eta) - _log_cb_norm(eta))

    def mean(self, params):
        return torch.distributions.ContinuousBernoulli(logits=params[0]).mean

    def sample(self, params, scale=None):
        self._check_scale(scale)
        return torch.distributions.ContinuousBernoulli(logits=params[0]).sample()
