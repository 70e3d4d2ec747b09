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
from .vae import Terms


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
    iw_train: int = 1  # draws of z per example


class Objective:
    """The training objective. Subclasses set `name` and implement `__call__`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

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


@register_objective
class ELBO(Objective):
    """mean −log p(x|z) + β · Σ_d max(batch-mean KL_d, free_bits): the negative ELBO at β = 1 without free bits.

    Free bits (Kingma et al., 2016) bound each latent dimension's batch-mean KL from below: a dimension below the
    bound adds the bound to the value and nothing to the gradient.
    """

    name = "elbo"
    help = "the negative ELBO, with --beta, --kl-warmup and --free-bits"

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        rec = out.rec.sum() / batch.n  # this process's share of the batch-mean reconstruction term
        kl_d = out.kl_per_dim.sum(0) / batch.n  # (L,) its share of the batch-mean KL per dimension
        free_bits = self.settings.free_bits
        if free_bits > 0:
            mean_d = batch.all_sum(kl_d.detach().clone())  # (L,) the whole batch's mean KL per dimension
            # a clamped dimension contributes its share of the bound (the shares sum to the bound) and no gradient
            kl_d = torch.where(mean_d >= free_bits, kl_d, kl_d.new_full((), free_bits / batch.processes))
        kl = kl_d.sum()
        return Loss(rec + batch.beta * kl, {"rec": rec.detach(), "kl": kl.detach()})

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
    is a tighter bound on −log p(x). The gradients are the bound's own (reparameterized through every z_k)."""

    name = "iwae"
    help = "the importance-weighted bound with --iw-train K draws per image"

    def __init__(self, settings: ObjectiveSettings = ObjectiveSettings()):
        if settings.iw_train < 1:
            raise ConfigError(f"--iw-train must be an integer >= 1; got {settings.iw_train}")
        if settings.beta != 1.0 or settings.kl_warmup > 0 or settings.free_bits > 0:
            raise ConfigError("--objective iwae trains the bound itself: --beta, --kl-warmup and --free-bits apply "
                              "to --objective elbo only")
        super().__init__(settings)

    @property
    def samples(self) -> int:
        return self.settings.iw_train

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        if out.log_weights is None:  # one draw: the bound is the ELBO's estimate
            bound = -(out.rec + out.kl)  # (B,)
        else:
            k = out.log_weights.shape[0]
            bound = torch.logsumexp(out.log_weights, dim=0) - math.log(k)  # (B,)
        total = -bound.sum() / batch.n
        return Loss(total, {"bound": -total.detach()})

    def is_elbo(self, beta: float) -> bool:
        return self.settings.iw_train == 1

