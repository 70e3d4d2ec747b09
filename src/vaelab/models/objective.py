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
    """The objective's own settings, as the run's config gives them."""

    free_bits: float = 0.0


class Objective:
    """The training objective. Subclasses set `name` and implement `__call__`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

    def __init__(self, settings: ObjectiveSettings = ObjectiveSettings()):
        self.settings = settings

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        raise NotImplementedError

    def is_elbo(self, beta: float) -> bool:
        """Whether this objective at KL weight `beta` is exactly the negative ELBO (then it is not reported twice)."""
        return False

    def value(self, rec: float, kl_per_dim: list[float], beta: float) -> float:
        """The objective on a whole split from its mean reconstruction term and mean KL per dimension, computed by
        the same code as in training: the split is one batch of its means."""
        out = Terms(torch.tensor([rec], dtype=torch.float64), torch.tensor([kl_per_dim], dtype=torch.float64),
                    None, None)
        return float(self(out, Batch(1, beta)).total)


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

    def is_elbo(self, beta: float) -> bool:
        return beta == 1.0 and self.settings.free_bits <= 0

