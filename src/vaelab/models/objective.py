"""The training objective, defined once: an object that takes the model's outputs on a batch and returns the loss
to differentiate and the parts it reports. Every training step calls it (the plain step, its CUDA graph, the
step of one of several data-parallel processes); evaluation calls it too, to report the objective beside the −ELBO.

    out = model(x, eps)                                  # Terms: per-example −log p(x|z) (B,), KL per dim (B, L)
    loss = objective(out, Batch(n, beta, all_sum))       # Loss: total (0-dim, differentiable), parts (detached)

An objective is written for a batch that may be split over processes: `out` holds this process's rows of a
batch of `batch.n` examples, and `total` is this process's share, so that the shares sum to the objective's value
and their gradients sum to its gradient. A statistic of the whole batch (free bits' batch-mean KL per dimension)
is summed across the processes with `batch.all_sum` before it is used. With one process the share is the whole.

Adding an objective is one class with a unique `name`, registered with `register_objective`; `vaelab train
--objective NAME` then trains with it on every step and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from .vae import DiagonalGaussian, Terms


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Batch:
    """What an objective knows of the batch besides the model's outputs."""

    n: int  # examples in the whole batch (over every process)
    beta: float = 1.0  # the KL weight at this step (KL warm-up applied)
    all_sum: Callable[[Tensor], Tensor] = _same  # sums a tensor over the processes that share the batch, in place
    processes: int = 1  # how many processes share it


@dataclass
class Loss:
    """`total`: this process's share of the objective (0-dim, nats per example), to differentiate.
    `parts`: the terms it is made of, detached, shares like `total` (for progress and logs)."""

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveSettings:
    """The settings an objective reads, as the run's config gives them (each objective checks those it needs)."""

    beta: float = 1.0  # the KL weight (after warm-up); each step passes its own β in Batch
    kl_warmup: float = 0.0
    free_bits: float = 0.0
    free_bits_per: str = "dim"  # what free bits bound: each latent dimension's KL or each latent group's
    kl_balance: bool = False  # during warm-up (β < 1), weigh each latent group's KL by its KL per unit
    iw_train: int = 1  # draws of z per example
    iw_grad: str = "standard"  # iwae's gradient estimator: standard or dreg
    # β-TCVAE and DIP-VAE (vaelab.models.factor_objectives); None: not given
    tc_weight: float | None = None
    lambda_od: float | None = None
    lambda_d: float | None = None
    dataset_size: int = 0  # N, the training images (the trainer sets it; 0: not known)


class Objective:
    """The training objective. Subclasses set `name` and implement `__call__`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    # the parts of its Loss (names in Loss.parts, each a mean per image) that evaluation reports beside it
    reported: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ObjectiveSettings = ObjectiveSettings()):
        self.settings = settings

    @property
    def samples(self) -> int:
        """Draws of z per example the model makes for this objective (its outputs then hold log weights)."""
        return 1

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        raise NotImplementedError

    def is_elbo(self, beta: float) -> bool:
        """Whether this objective at KL weight `beta` is exactly the negative ELBO (then it is not reported twice)."""
        return False

    def check_processes(self, processes: int) -> None:
        """Raise ConfigError if this objective cannot train on a batch split over `processes` processes; called
        before a run writes anything."""


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make `cls` available as `--objective cls.name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)) or not cls.name:
        raise TypeError(f"register_objective needs an Objective subclass with a name; got {cls!r}")
    known = OBJECTIVES.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"an objective named {cls.name!r} is already registered ({known.__qualname__})")
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(name: str, settings: ObjectiveSettings = ObjectiveSettings()) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    return OBJECTIVES[name](settings)


def _clamp_free_bits(share: Tensor, mean: Tensor, free_bits: float, batch: Batch) -> Tensor:
    """This process's share of max(mean, free_bits) per unit (a dimension or a group): a clamped unit adds its
    share of the bound (the processes' shares sum to the bound) and no gradient."""
    return torch.where(mean >= free_bits, share, share.new_full((), free_bits / batch.processes))


@register_objective
class ELBO(Objective):
    """mean −log p(x|z) + β · Σ_d max(batch-mean KL_d, free_bits): the negative ELBO at β = 1 without free bits.

    Free bits (Kingma et al., 2016) bound each latent dimension's batch-mean KL from below (with free_bits_per
    "group", each latent group's: a hierarchical model's): a dimension below the bound adds the bound to the value
    and nothing to the gradient. With kl_balance, while β < 1 (KL warm-up), group g's KL is weighted by
    γ_g ∝ (batch-mean KL_g + 0.01) / units_g, the γ averaging 1 (Vahdat & Kautz 2020): a group whose KL per unit is
    small costs little to use, so the warm-up does not leave groups unused; from β = 1 on it is the ELBO's sum.
    """

    name = "elbo"
    help = "the negative ELBO, with --beta, --kl-warmup and --free-bits"

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        rec = out.rec.sum() / batch.n  # this process's share of the batch-mean reconstruction term
        if self.settings.free_bits_per == "group" or self.settings.kl_balance:
            kl, weighted = self._by_group(out, batch)
        else:
            kl = weighted = self._by_dim(out, batch)
        return Loss(rec + batch.beta * weighted, {"rec": rec.detach(), "kl": kl.detach()})

    def _by_dim(self, out: Terms, batch: Batch) -> Tensor:
        """This process's share of Σ_d max(batch-mean KL_d, free_bits), plus a learned prior's estimated KL."""
        free_bits = self.settings.free_bits
        if out.kl_estimate is not None and free_bits > 0:  # a learned prior: the KL estimated at the sampled z
            raise ConfigError("--free-bits needs a per-dimension KL: use --prior standard")
        kl = out.rec.new_zeros(())
        if out.kl_per_dim is not None:
            kl_d = out.kl_per_dim.sum(0) / batch.n  # (L,) its share of the batch-mean KL per dimension
            if free_bits > 0:
                mean_d = batch.all_sum(kl_d.detach().clone())  # (L,) the whole batch's mean KL per dimension
                kl_d = _clamp_free_bits(kl_d, mean_d, free_bits, batch)
            kl = kl_d.sum()
        if out.kl_estimate is not None:
            kl = kl + out.kl_estimate.sum() / batch.n
        return kl

    def _by_group(self, out: Terms, batch: Batch) -> tuple[Tensor, Tensor]:
        """This process's share of (Σ_g max(batch-mean KL_g, free_bits) with free_bits_per "group", the same
        weighted by the balancing γ_g while β < 1 with kl_balance)."""
        per_group = out.kl_per_group()
        if per_group is None:
            raise ConfigError("--free-bits-per group and --kl-balance need a model with latent groups: use --arch "
                              "hierarchical")
        assert out.group_sizes is not None, "a KL per group comes with the groups' sizes"
        kl_g = per_group.sum(0) / batch.n  # (G,) its share of the batch-mean KL of each group
        mean_g = batch.all_sum(kl_g.detach().clone())  # (G,) the whole batch's
        free_bits = self.settings.free_bits
        if free_bits > 0 and self.settings.free_bits_per == "group":
            kl_g = _clamp_free_bits(kl_g, mean_g, free_bits, batch)
        kl = kl_g.sum()
        if not self.settings.kl_balance or batch.beta >= 1.0:
            return kl, kl
        gamma = (mean_g.abs() + 0.01) / kl_g.new_tensor(out.group_sizes)  # (G,) ∝ the batch-mean KL per unit
        return kl, (gamma / gamma.mean() * kl_g).sum()

    def __init__(self, settings: ObjectiveSettings = ObjectiveSettings()):
        if settings.iw_train != 1:
            raise ConfigError(f"--iw-train K applies to --objective iwae; got --iw-train {settings.iw_train} with "
                              "--objective elbo")
        super().__init__(settings)

    def is_elbo(self, beta: float) -> bool:
        return beta == 1.0 and self.settings.free_bits <= 0


@register_objective
class IWAE(Objective):
    """The importance-weighted bound (Burda et al., 2016) with K = --iw-train draws per example:
    −log (1/K) Σ_k w_k, w_k = p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x). K = 1 is the negative ELBO; a larger K
    is a tighter bound on −log p(x). The gradients are the bound's own (reparameterized through every z_k), or
    with --iw-grad dreg the doubly reparameterized ones (Tucker et al., 2019): the same in expectation, with a
    lower-variance encoder gradient. DReG differentiates log w_k = log p(x, z_k) − log q(z_k|x) with q's
    parameters detached (so the encoder is reached through z_k only) and scales the gradient reaching each z_k by
    its normalised weight: the encoder's gradient is Σ_k ŵ_k² ∂log w_k/∂z_k ∂z_k/∂φ, ŵ = softmax_k log w_k; the
    decoder's and the prior's are the bound's own, Σ_k ŵ_k ∂log w_k. The value is the bound's."""

    name = "iwae"
    help = "the importance-weighted bound with --iw-train K draws per image"

    def __init__(self, settings: ObjectiveSettings = ObjectiveSettings()):
        if settings.iw_train < 1:
            raise ConfigError(f"--iw-train must be an integer >= 1; got {settings.iw_train}")
        if settings.iw_grad not in ("standard", "dreg"):
            raise ConfigError(f"--iw-grad must be one of standard, dreg; got {settings.iw_grad!r}")
        if settings.iw_grad == "dreg" and settings.iw_train < 2:
            raise ConfigError("--iw-grad dreg reweights K >= 2 draws per image; got --iw-train "
                              f"{settings.iw_train}")
        if settings.beta != 1.0 or settings.kl_warmup > 0 or settings.free_bits > 0 or settings.kl_balance:
            raise ConfigError("--objective iwae trains the bound itself: --beta, --kl-warmup, --free-bits and "
                              "--kl-balance apply to --objective elbo only")
        super().__init__(settings)

    @property
    def samples(self) -> int:
        return self.settings.iw_train

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        if out.log_weights is None:  # one draw: the bound is the ELBO's estimate
            bound = -(out.rec + out.kl)  # (B,)
        else:
            log_w = self._dreg_weights(out) if self.settings.iw_grad == "dreg" else out.log_weights  # (K, B)
            bound = torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])  # (B,)
        total = -bound.sum() / batch.n
        return Loss(total, {"bound": -total.detach()})

    @staticmethod
    def _dreg_weights(out: Terms) -> Tensor:
        """log w_k with q's parameters detached, (K, B); the gradient reaching z_k is scaled by ŵ_k on its way
        back to the encoder (a hook on z), so the logsumexp's ŵ_k becomes ŵ_k² there."""
        assert out.q is not None, "the terms carry q(z|x)"
        assert out.z is not None, "and the z drawn"
        assert out.log_joint is not None, "and log p(x, z): the forward pass of K > 1 draws"
        q_stop = DiagonalGaussian(out.q.mean.detach(), out.q.logvar.detach())
        log_w = out.log_joint - q_stop.log_prob(out.z)  # (K, B), the same value as out.log_weights
        if out.z.requires_grad:
            w = torch.softmax(log_w.detach(), dim=0).unsqueeze(-1)  # (K, B, 1)
            out.z.register_hook(lambda g: g * w)  # type: ignore[no-untyped-call]
        return log_w

    def is_elbo(self, beta: float) -> bool:
        return self.settings.iw_train == 1

