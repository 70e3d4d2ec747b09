"""The Laplace family: −log p = |x − f(z)|/b + log 2b per pixel; b fixed or one learned scalar."""

from __future__ import annotations

import math

import torch

from .base import ScaledLikelihood, _parse_positive, _sum_pixels


class Laplace(ScaledLikelihood):
    """Laplace(x; μ, b): −log p = |x−μ|/b + log 2b per pixel; b fixed or one learned scalar."""

    name, scale_name = "laplace", "b"
    page_mean, page_draw = "identity", "double-exponential"

    def log_prob(self, params, x):
        d = x[0].numel()
        log_b = self.log_scale_for(params)
        return -_sum_pixels((x - params[0]).abs()) * torch.exp(-log_b) - d * (log_b + math.log(2.0))

    def sample(self, params, scale=None):
        mu = params[0]
        b = self.scale_for(params, scale).expand_as(mu)  # b = 0 (no validation) gives μ itself
        return torch.distributions.Laplace(mu, b, validate_args=False).sample()

    def mle_log_scale(self, mu, x):
        return torch.log((x - mu).abs().mean().clamp_min(1e-12))  # b = mean absolute error

    @classmethod
    def make(cls, arg, mixtures=1):
        if arg == "learned":
            return cls(learned=True)
        return cls(_parse_positive(arg, "--sigma (the Laplace scale b)", "learned"))
