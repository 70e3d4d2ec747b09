"""Priors p(z) over the latent space. A prior is a module (it may learn), with the log-density the KL, the IWAE
bound and the explorer read, and the sampler every picture of "samples from the model" draws from.

    prior.log_prob(z)              # (...,) nats, z (..., L)
    prior.sample(n, generator)     # (n, L) on the generator's device (the CPU by default)
    prior.kl_per_dim(mean, logvar) # (B, L) closed-form KL(q(z|x) ‖ p(z)) per dimension, or None where no closed
                                   # form exists (then the KL is estimated at the sampled z: log q(z|x) − log p(z))

    standard   N(0, I)
    mog        a mixture of K learned diagonal Gaussians with learned weights
    vamp       the VampPrior (Tomczak & Welling, 2018): (1/K) Σ_k q(z|u_k), the encoder's posteriors at K learned
               pseudo-inputs u_k (images, squashed to the pixel range by a sigmoid)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

LOG_2PI = math.log(2 * math.pi)
PRIORS = ("standard", "mog", "vamp")
DEFAULT_COMPONENTS = {"mog": 10, "vamp": 100}  # K: the VampPrior paper uses 500 on MNIST; 100 costs a CPU step less

# the encoder as the VampPrior calls it: images (K, C, H, W) in [0, 1] -> (mean, logvar), each (K, L)
Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


def log_standard_normal(z: Tensor) -> Tensor:
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


def gaussian_log_components(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean_k, diag(exp(logvar_k))) for every component k: z (..., L), mean and logvar (K, L) -> (..., K),
    in z's precision."""
    mean, logvar = mean.to(z.dtype), logvar.to(z.dtype)
    diff = z.unsqueeze(-2) - mean  # (..., K, L)
    return -0.5 * (diff.square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


class Prior(nn.Module):
    """p(z). Subclasses set `name` and implement `log_prob` and `sample`; `kl_per_dim` where a closed form exists
    (and set `closed_form_kl`)."""

    name = ""
    closed_form_kl = False

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError

    def kl_per_dim(self, mean: Tensor, logvar: Tensor) -> Tensor | None:
        return None

    def describe(self) -> str:
        raise NotImplementedError

    def init_from_data(self, x: Tensor) -> None:
        """Start what the prior learns from training images x (B, C, H, W) in [0, 1]; draws no random numbers."""


def _gen_device(generator: torch.Generator | None) -> torch.device:
    # draws are made on the generator's device (the CPU by default), so a seeded draw is the same on every device
    return generator.device if generator is not None else torch.device("cpu")


class StandardPrior(Prior):
    """N(0, I): the KL to a diagonal Gaussian posterior has a closed form per dimension."""

    name = "standard"
    closed_form_kl = True

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def describe(self) -> str:
        return "N(0, I)"

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=_gen_device(generator)) * temperature

    def kl_per_dim(self, mean: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per dimension, (B, L), in nats."""
        return 0.5 * (mean.square() + torch.exp(logvar) - 1.0 - logvar)


class GaussianMixturePrior(Prior):
    """A mixture of diagonal Gaussians, p(z) = Σ_k π_k N(z; μ_k, diag σ²_k). Subclasses say where the components
    come from (`components()`: log π (K,), μ and log σ² (K, L)). `temperature` scales every component's σ."""

    def components(self) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        log_weights, mean, logvar = self.components()
        return torch.logsumexp(gaussian_log_components(z, mean, logvar) + log_weights.to(z.dtype), dim=-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        device = _gen_device(generator)
        log_weights, mean, logvar = (t.detach().float().to(device) for t in self.components())
        k = torch.multinomial(log_weights.softmax(0), n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=device)  # (n, L)
        return mean[k] + torch.exp(0.5 * logvar[k]) * eps * temperature


class MixturePrior(GaussianMixturePrior):
    """K learned diagonal Gaussians with learned weights (softmax of logits). The means start at N(0, I) draws,
    the variances at 1 and the weights equal: at the start p(z) is about as wide as N(0, 2I)."""

    name = "mog"

    def __init__(self, latent_dim: int, components: int):
        super().__init__(latent_dim)
        self.means = nn.Parameter(torch.randn(components, latent_dim))  # (K, L)
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))  # (K, L)
        self.logits = nn.Parameter(torch.zeros(components))  # (K,)

    def components(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.logits.log_softmax(0), self.means, self.logvars

    def describe(self) -> str:
        return f"a mixture of {len(self.logits)} learned Gaussians"


class VampPrior(GaussianMixturePrior):
    """p(z) = (1/K) Σ_k q(z|u_k): the encoder's posteriors at K learned pseudo-inputs u_k = sigmoid(a_k), images
    of the data's shape. Before training they start from the first K training images (repeated when there are
    fewer), each with a small fixed perturbation; a model built without data has them near grey (0.5).

    The encoder is the model's own, held as a callable and not registered here: its weights are saved once, as
    the model's, and the prior's gradient reaches them through the pseudo-inputs' posteriors.
    """

    name = "vamp"
    _encode: Encoder

    def __init__(self, latent_dim: int, components: int, shape: tuple[int, int, int], encoder: Encoder):
        super().__init__(latent_dim)
        self.pseudo_logits = nn.Parameter(0.1 * torch.randn(components, *shape))  # (K, C, H, W), pre-sigmoid
        object.__setattr__(self, "_encode", encoder)  # a plain attribute: not a submodule, not in state_dict

    def describe(self) -> str:
        return f"VampPrior, {len(self.pseudo_logits)} pseudo-inputs"

    def pseudo_inputs(self) -> Tensor:
        return torch.sigmoid(self.pseudo_logits)  # (K, C, H, W) in (0, 1)

    def components(self) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self._encode(self.pseudo_inputs())  # (K, L) each
        k = mean.shape[0]
        return mean.new_full((k,), -math.log(k)), mean, logvar

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        k = self.pseudo_logits.shape[0]
        images = x[torch.arange(k, device=x.device) % x.shape[0]].to(self.pseudo_logits)  # (K, C, H, W)
        self.pseudo_logits.add_(torch.logit(images.clamp(0.02, 0.98)))  # keeps the construction's perturbation


def check_prior(name: str, components: int | None) -> int | None:
    """K for `--prior name --prior-components components`: the default K when None, None for the standard prior;
    a ConfigError naming the bad value otherwise."""
    if name not in PRIORS:
        raise ConfigError(f"--prior must be one of {', '.join(PRIORS)}; got {name!r}")
    if name == "standard":
        if components is not None:
            raise ConfigError(f"--prior-components applies to --prior mog or vamp; got {components} with --prior "
                              "standard")
        return None
    k = DEFAULT_COMPONENTS[name] if components is None else components
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--prior-components must be an integer >= 1; got {components!r}")
    return k


def make_prior(name: str, latent_dim: int, components: int | None = None, shape: tuple[int, int, int] = (1, 1, 1),
               encoder: Encoder | None = None) -> Prior:
    """The prior `--prior name` with `components` (K) components: the default K when None."""
    k = check_prior(name, components)
    if k is None:
        return StandardPrior(latent_dim)
    if name == "mog":
        return MixturePrior(latent_dim, k)
    if encoder is None:
        raise ValueError("the VampPrior needs the model's encoder")
    return VampPrior(latent_dim, k, shape, encoder)
