"""The VAE: encode to a diagonal Gaussian q(z|x), reparameterize, decode to p(x|z); per-example objectives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from .likelihoods import Likelihood, make_likelihood
from .nets import NET_VERSION, make_nets
from .priors import LOG_2PI, Prior, StandardPrior, log_standard_normal, make_prior


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


__all__ = ["LOG_2PI", "VAE", "DiagonalGaussian", "Terms", "group_sums", "log_standard_normal"]


def group_sums(per_unit: Tensor, sizes: list[int] | tuple[int, ...]) -> Tensor:
    """Sums over consecutive groups of units of the given sizes: (..., L) -> (..., G)."""
    return torch.stack([t.sum(-1) for t in per_unit.split(list(sizes), dim=-1)], dim=-1)

# --arch values whose model is a VAE subclass of its own (it registers itself: models.hierarchical)
ARCH_MODELS: dict[str, type[VAE]] = {}


@dataclass
class Terms:
    """Per-example parts of the negative ELBO, all in nats: rec (B,) at the sampled z (averaged over the z's when
    several are drawn per example) and the KL: per latent dimension (B, L) in closed form where the prior has one
    (N(0, I)), and `kl_estimate` (B,) for the part that has none (a learned prior's): log q(z|x) − log p(z) at the
    sampled z (averaged over the z's), an unbiased estimate of KL(q(z|x) ‖ p(z)). A single-latent model has one or
    the other; a hierarchical model with a learned top prior has both (the top group's units are 0 in kl_per_dim,
    its KL is kl_estimate). `kl` is the per-example KL, their sum."""

    rec: Tensor  # -log p(x|z)
    kl_per_dim: Tensor | None  # (B, L); None where no unit's KL has a closed form
    sq_err: Tensor | None  # ||x - f(z)||², summed over pixels, f(z) the decoder mean at the same z as rec
    sigma: Tensor | None  # σ in use (Gaussian) or b (Laplace), averaged over pixels
    # with K > 1 draws per example: log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x), (K, B)
    log_weights: Tensor | None = None
    # the posterior and the z it drew, (B, L) (K > 1 draws: (K, B, L)), for objectives that read them
    q: DiagonalGaussian | None = None
    z: Tensor | None = None
    kl_estimate: Tensor | None = None  # (B,) log q(z|x) − log p(z) at the z drawn, for units without closed form
    # with K > 1 draws: log p(x|z_k) + log p(z_k), (K, B): the log weights' numerator (DReG re-divides it by a q
    # whose parameters are detached)
    log_joint: Tensor | None = None
    # a hierarchical model: the units of each latent group, top first (the columns of kl_per_dim); None: one group
    group_sizes: tuple[int, ...] | None = None

    def kl_per_group(self) -> Tensor | None:
        """(B, G) the KL of each latent group, top first (a learned top prior's estimate in the top group's);
        None for a model with one latent group."""
        if self.group_sizes is None:
            return None
        assert self.kl_per_dim is not None, "a hierarchy's lower groups have a closed-form KL"
        groups = group_sums(self.kl_per_dim, self.group_sizes)
        if self.kl_estimate is None:
            return groups
        return torch.cat([groups[:, :1] + self.kl_estimate[:, None], groups[:, 1:]], dim=1)

    @property
    def kl(self) -> Tensor:
        if self.kl_estimate is None:
            assert self.kl_per_dim is not None, "terms carry a closed-form KL, an estimate, or both"
            return self.kl_per_dim.sum(1)
        return self.kl_estimate if self.kl_per_dim is None else self.kl_per_dim.sum(1) + self.kl_estimate

    @property
    def loss(self) -> Tensor:
        return self.rec + self.kl


class VAE(nn.Module):
    def __init__(self, shape: tuple[int, int, int], arch: str, hidden: list[int], latent_dim: int,
                 likelihood: Likelihood, blocks: int | None = None, prior: str = "standard",
                 prior_components: int | None = None, net_version: int = NET_VERSION):
        super().__init__()
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.encoder, self.decoder = make_nets(arch, self.shape, hidden, latent_dim, likelihood.n_params, blocks,
                                               net_version)
        # built after the networks: a VampPrior reads the encoder (a learned prior's initial draws come last)
        self.prior: Prior = make_prior(prior, latent_dim, prior_components, self.shape, self.encoder)

    @classmethod
    def from_config(cls, config, shape: tuple[int, int, int]) -> VAE:
        """The VAE a model config (or a whole run config: its model part) describes, for images of `shape`."""
        m = getattr(config, "model", config)
        if cls is VAE and m.arch in ARCH_MODELS:  # an architecture with a model class of its own
            return ARCH_MODELS[m.arch].from_config(config, shape)
        lik = make_likelihood(m.likelihood, m.sigma, m.mixtures)
        return cls(shape, m.arch, m.hidden, m.latent_dim, lik, m.blocks, m.prior, m.prior_components, m.net_version)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set what the likelihood learns (a shared σ, ...) to its best value for the untrained decoder on x,
        decoded at the posterior means (no random draw, so the training RNG stream is untouched)."""
        was_training = self.training
        self.eval()
        self.likelihood.init_from_data(self.decode(self.encode(x).mean), x)
        self.prior.init_from_data(x)
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
    def code_prior(self) -> Prior:
        """The prior of the codes `encode` gives (for this model, p(z) itself)."""
        return self.prior

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

    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder mean at the posterior mean, f(E_q[z|x]), (B, C, H, W): what "reconstructions" show."""
        return self.decode_mean(self.encode(x).mean)

    def path_code(self, x: Tensor) -> Tensor:
        """What interpolations move along: a vector per image that `decode` maps to its reconstruction, here the
        posterior mean E_q[z|x], (B, latent_dim)."""
        return self.encode(x).mean

    def observe(self, params: list[Tensor], x: Tensor, extras: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """−log p(x|z) (B,) at the decoder's outputs `params`; with extras, also ||x − f(z)||² (B,) and the scale
        in use, computed without gradients (the training step does not read them)."""
        rec = -self.likelihood.log_prob(params, x)
        if not extras:
            return rec, None, None
        with torch.no_grad():
            sq_err = (x - self.likelihood.mean(params)).square().flatten(1).sum(1)
            return rec, sq_err, self.likelihood.scale(params)

    def terms(self, x: Tensor, extras: bool = True, eps: Tensor | None = None) -> Terms:
        """One z per example; extras=False skips the diagnostics (sq_err, sigma) the training step ignores.
        `eps` (B, L) is the standard normal noise of the reparameterized z, drawn here when not given."""
        q = self.encode(x)
        z = q.reparameterize(q.noise() if eps is None else eps)  # (B, L)
        rec, sq_err, sigma = self.observe(self.decode(z), x, extras)
        kl_per_dim = self.prior.kl_per_dim(q.mean, q.logvar)  # (B, L), or None: then estimated at z
        kl_estimate = q.log_prob(z) - self.prior.log_prob(z) if kl_per_dim is None else None  # (B,)
        return Terms(rec, kl_per_dim, sq_err, sigma, q=q, z=z, kl_estimate=kl_estimate)

    def forward(self, x: Tensor, eps: Tensor | None = None, samples: int = 1) -> Terms:
        """The terms training differentiates, without diagnostics: `model(x)`, as a wrapper such as
        DistributedDataParallel calls it. `eps` is the noise of z, (B, L), or (K, B, L) for samples=K > 1 draws
        per example (then with the log importance weights), drawn here when not given."""
        if samples == 1:
            return self.terms(x, extras=False, eps=eps)
        q = self.encode(x)
        z = q.reparameterize(q.noise(samples) if eps is None else eps)  # (K, B, L)
        log_px_z, log_joint, log_w = self.importance_terms(x, q, z)
        kl_per_dim = self.prior.kl_per_dim(q.mean, q.logvar)  # (B, L), or None: then estimated at the z's
        kl_estimate = (log_px_z - log_w).mean(0) if kl_per_dim is None else None  # (B,)
        return Terms(-log_px_z.mean(0), kl_per_dim, None, None, log_w, q=q, z=z, kl_estimate=kl_estimate,
                     log_joint=log_joint)

    def importance_terms(self, x: Tensor, q: DiagonalGaussian, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(x|z_k), log p(x|z_k) + log p(z_k), log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x)), each
        (K, B), for z (K, B, L)."""
        k = z.shape[0]
        params = [p.view(k, *x.shape) for p in self.decode(z.reshape(-1, self.latent_dim))]  # (K, B, C, H, W)
        log_px_z = self.likelihood.log_prob(params, x)  # (K, B): x broadcasts, it is never copied K times
        log_joint = log_px_z + self.prior.log_prob(z)
        return log_px_z, log_joint, log_joint - q.log_prob(z)

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
            log_w = self.importance_terms(x, q, q.reparameterize(noise))[2]  # (n, B)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        return total - math.log(k)
