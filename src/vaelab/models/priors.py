"""Priors p(z) over the latent space. A prior is a module (it may learn), with the log-density the KL, the IWAE
bound and the explorer read, and the sampler every picture of "samples from the model" draws from.

    prior.log_prob(z)              # (...,) nats, z (..., L)
    prior.sample(n, generator)     # (n, L) on the prior's device
    prior.kl_per_dim(q)            # (B, L) closed-form KL(q(z|x) ‖ p(z)) per dimension, or None where no closed
                                   # form exists (then the KL is estimated at the sampled z: log q(z|x) − log p(z))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def log_standard_normal(z: Tensor) -> Tensor:
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


class Prior(nn.Module):
    """p(z). Subclasses set `name` and implement `log_prob` and `sample`; `kl_per_dim` where a closed form exists."""

    name = ""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError

    def kl_per_dim(self, mean: Tensor, logvar: Tensor) -> Tensor | None:
        return None

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


class StandardPrior(Prior):
    """N(0, I): the KL to a diagonal Gaussian posterior has a closed form per dimension."""

    name = "standard"

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        # drawn on the generator's device (the CPU by default), so a seeded draw is the same on every device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.latent_dim, generator=generator, device=gen_device) * temperature  # (n, L)
        return z

    def kl_per_dim(self, mean: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per dimension, (B, L), in nats."""
        return 0.5 * (mean.square() + torch.exp(logvar) - 1.0 - logvar)
