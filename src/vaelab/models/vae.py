"""The VAE: encode to a diagonal Gaussian q(z|x), reparameterize, decode to p(x|z); per-example objectives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from .likelihoods import Likelihood, make_likelihood
from .nets import make_nets
from .priors import LOG_2PI, Prior, StandardPrior, log_standard_normal


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), with the reparameterized sample and the closed-form KL to N(0, I)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean, self.logvar = mean, logvar  # (B, L)

    @cached_property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)  # computed once per posterior

    def sample(self, n: int | None = None) -> Tensor:
        return self.reparameterize(self.noise(n))

    def noise(self, n: int | None = None) -> Tensor:
        """ε ~ N(0, I) shaped (B, L), or (n, B, L) for n samples per example."""
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        return torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)

    def reparameterize(self, eps: Tensor) -> Tensor:
        return self.mean + self.std * eps  # z, differentiable in mean and logvar

    def mode(self) -> Tensor:
        return self.mean

    def kl_per_dim(self) -> Tensor:
        """KL(q || N(0, I)) per latent dimension, (B, L), in nats."""
        return StandardPrior(self.mean.shape[-1]).kl_per_dim(self.mean, self.logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) summed over L; z is (..., B, L)."""
        return -0.5 * (((z - self.mean).square() * torch.exp(-self.logvar)) + self.logvar + LOG_2PI).sum(-1)


__all__ = ["LOG_2PI", "VAE", "DiagonalGaussian", "Terms", "log_standard_normal"]


@dataclass
class Terms:
    """Per-example parts of the negative ELBO, all in nats: rec (B,) at the sampled z (averaged over the z's when
    several are drawn per example) and the KL per latent dimension (B, L) in closed form."""

    rec: Tensor  # -log p(x|z)
    kl_per_dim: Tensor  # (B, L)
    sq_err: Tensor | None  # ||x - f(z)||², summed over pixels, f(z) the decoder mean at the same z as rec
    sigma: Tensor | None  # σ in use (Gaussian) or b (Laplace), averaged over pixels
    # with K > 1 draws per example: log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x), (K, B)
    log_weights: Tensor | None = None
    # the posterior and the z it drew, (B, L) (K > 1 draws: (K, B, L)), for objectives that read them
    q: DiagonalGaussian | None = None
    z: Tensor | None = None

    @property
    def kl(self) -> Tensor:
        return self.kl_per_dim.sum(1)

    @property
    def loss(self) -> Tensor:
        return self.rec + self.kl


class VAE(nn.Module):
    def __init__(self, shape: tuple[int, int, int], arch: str, hidden: list[int], latent_dim: int,
                 likelihood: Likelihood, blocks: int | None = None):
        super().__init__()
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.prior: Prior = StandardPrior(latent_dim)
        self.encoder, self.decoder = make_nets(arch, self.shape, hidden, latent_dim, likelihood.n_params, blocks)

    @classmethod
    def from_config(cls, config, shape: tuple[int, int, int]) -> VAE:
        """The VAE a model config (or a whole run config: its model part) describes, for images of `shape`."""
        m = getattr(config, "model", config)
        lik = make_likelihood(m.likelihood, m.sigma, m.mixtures)
        return cls(shape, m.arch, m.hidden, m.latent_dim, lik, m.blocks)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set what the likelihood learns (a shared σ, ...) to its best value for the untrained decoder on x,
        decoded at the posterior means (no random draw, so the training RNG stream is untouched)."""
        was_training = self.training
        self.eval()
        self.likelihood.init_from_data(self.decode(self.encode(x).mean), x)
        self.train(was_training)

    def param_groups(self, optimizer: str, lr: float) -> list[dict]:
        """The optimizer's parameter groups: the networks at `lr`; the likelihood's own parameters at the step
        size the likelihood asks for (a learned σ keeps up with the decoder), if it asks for one."""
        own = [p for p in self.likelihood.parameters()]
        own_lr = self.likelihood.scale_lr(optimizer, self.n_pixels) if own else None
        if own_lr is None:
            return [{"params": list(self.parameters())}]
        ids = {id(p) for p in own}
        return [{"params": [p for p in self.parameters() if id(p) not in ids]}, {"params": own, "lr": own_lr}]

    @property
    def n_pixels(self) -> int:
        return math.prod(self.shape)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x)
        # under bf16 autocast the networks' outputs are bfloat16: q(z|x), z and the KL stay in x's precision
        return DiagonalGaussian(mean.to(x.dtype), logvar.to(x.dtype))

    def decode(self, z: Tensor) -> list[Tensor]:
        return [p.to(z.dtype) for p in self.decoder(z)]  # the likelihood always sees z's precision

    def decode_mean(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decode(z))

    def terms(self, x: Tensor, extras: bool = True, eps: Tensor | None = None) -> Terms:
        """One z per example; extras=False skips the diagnostics (sq_err, sigma) the training step ignores.
        `eps` (B, L) is the standard normal noise of the reparameterized z, drawn here when not given."""
        q = self.encode(x)
        z = q.reparameterize(q.noise() if eps is None else eps)  # (B, L)
        params = self.decode(z)
        rec = -self.likelihood.log_prob(params, x)
        sq_err = sigma = None
        if extras:
            with torch.no_grad():
                sq_err = (x - self.likelihood.mean(params)).square().flatten(1).sum(1)
                sigma = self.likelihood.scale(params)
        return Terms(rec, q.kl_per_dim(), sq_err, sigma, q=q, z=z)

    def forward(self, x: Tensor, eps: Tensor | None = None, samples: int = 1) -> Terms:
        """The terms training differentiates, without diagnostics: `model(x)`, as a wrapper such as
        DistributedDataParallel calls it. `eps` is the noise of z, (B, L), or (K, B, L) for samples=K > 1 draws
        per example (then with the log importance weights), drawn here when not given."""
        if samples == 1:
            return self.terms(x, extras=False, eps=eps)
        q = self.encode(x)
        z = q.reparameterize(q.noise(samples) if eps is None else eps)  # (K, B, L)
        log_px_z, log_w = self.importance_terms(x, q, z)
        return Terms(-log_px_z.mean(0), q.kl_per_dim(), None, None, log_w, q=q, z=z)

    def importance_terms(self, x: Tensor, q: DiagonalGaussian, z: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x|z_k), log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x)), each (K, B), for z (K, B, L)."""
        k = z.shape[0]
        params = [p.view(k, *x.shape) for p in self.decode(z.reshape(-1, self.latent_dim))]  # (K, B, C, H, W)
        log_px_z = self.likelihood.log_prob(params, x)  # (K, B): x broadcasts, it is never copied K times
        return log_px_z, log_px_z + self.prior.log_prob(z) - q.log_prob(z)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n draws z ~ p(z) (scaled by `temperature`), (n, L), on the model's device."""
        return self.prior.sample(n, generator, temperature).to(next(self.parameters()).device)

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int, chunk: int = 100, eps: Tensor | None = None) -> Tensor:
        """log p(x) ≥ log (1/K) Σ_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x); (B,) nats. K=1 is the ELBO's estimate.

        The K samples are drawn `chunk` at a time, each chunk decoded as one batch of chunk x B rows, and
        combined with a running log-sum-exp, so memory is bounded by chunk x B decoder outputs whatever K is.
        `eps` (K, B, L) is the standard normal noise of the K draws, drawn here (a chunk at a time) when not given.
        """
        q = self.encode(x)
        total = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
        for done in range(0, k, chunk):
            n = min(chunk, k - done)
            noise = q.noise(n) if eps is None else eps[done:done + n]  # (n, B, L)
            _, log_w = self.importance_terms(x, q, q.reparameterize(noise))  # (n, B)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        return total - math.log(k)
