"""The training step: one batch's objective, its gradients by autograd, the optimizer's update.

    x, eps = inputs(idx)                    # the batch (and, when split over processes, the noise of z)
    out = model(x, eps, samples=K)          # per-example terms (K draws of z per example)
    loss = objective(out, batch)            # vaelab.models.objective
    loss.total.backward()
    guard(optimizer, loss.total)            # the update, unless the gradient is non-finite or too large
    ema.update()                            # the moving average of the weights (--ema), if any

The guard decides on the device, from the gradient's total norm and the loss, with no host read: a step whose
loss or gradient is non-finite, or whose gradient norm passes --skip-threshold, changes nothing (weights,
optimizer moments and step count stay as they were) and is counted; --grad-clip rescales the gradient to at most
that norm. The fused optimizers (Adam, and SGD where fused) apply the decision themselves, through the
`found_inf` and `grad_scale` inputs their kernels have for mixed-precision loss scaling, so the step is the same
sequence of kernels whatever the decision, and a CUDA graph can record it. Other optimizers read the decision on
the host.

What differs between devices and process counts wraps this step and does not repeat it: on a GPU a CUDA graph
records and replays it (vaelab.training.cudagraph); with several processes the model is wrapped in
DistributedDataParallel and the inputs are this process's rows (vaelab.training.distributed). There the
gradient is already averaged over the processes when the guard reads it, and the loss is summed over them first,
so every process takes the same decision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.objective import Batch, Objective
from .ema import EMA

# (x, eps) for the training images `idx`: eps None lets the model draw the noise of z itself
Inputs = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def local_inputs(batch: Callable[[Tensor], Tensor]) -> Inputs:
    """Inputs of a single process: the whole batch; the model draws z's noise."""

    def inputs(idx: Tensor) -> tuple[Tensor, Tensor | None]:
        return batch(idx), None

    return inputs


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Guards:
    """What the step does with an unusual gradient; 0 turns a rule off. Non-finite steps are always skipped."""

    skip_threshold: float = 0.0  # skip the update when the gradient norm is above this multiple of its usual value
    grad_clip: float = 0.0  # rescale the gradient to at most this total norm
    clip_threshold: float = 0.0  # rescale the gradient to at most this multiple of the usual norm

    @classmethod
    def of(cls, optim) -> Guards:
        """The rules a run's OptimConfig sets (--skip-threshold, --grad-clip, --clip-threshold)."""
        return cls(optim.skip_threshold, optim.grad_clip, optim.clip_threshold)


# the guard's running numbers, one vector on the device (indices into Guard.stats)
SKIPPED, NONFINITE, STREAK, STEPS, NORM_SUM, NORM_MAX, LOG_USUAL, SEEN, CLIPPED = range(9)
N_STATS = 9  # checkpoints written before CLIPPED hold the first 8
USUAL_STEPS = 50  # the usual gradient norm: the geometric mean over about this many recent updates
SKIP_AFTER = 10  # updates seen before the guard skips for size (the usual norm needs a few to settle)


class Guard:
    """Applies the optimizer's update unless the step's loss or gradient is non-finite or its gradient norm is more
    than `skip_threshold` times the usual one, and keeps count on the device: `stats` holds the updates skipped for
    a large gradient, the non-finite steps, the current run of consecutive non-finite steps, the steps, the sum and
    maximum of the finite gradient norms (read and reset by `take`, once per epoch), and the log of the usual norm
    with the number of updates it has seen.

    The usual norm is the running geometric mean of the updates' norms (a mean of logs, equal weights over the
    first USUAL_STEPS updates, then an exponential average over about as many): a threshold relative to it means the
    same for any data, likelihood or σ, whose gradient norms differ by orders of magnitude."""

    def __init__(self, params: Iterable[nn.Parameter], guards: Guards = Guards(),
                 all_sum: Callable[[Tensor], Tensor] | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.guards, self.all_sum = guards, all_sum
        self.stats = torch.zeros(N_STATS, dtype=torch.float64, device=self.params[0].device)

    def __call__(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).float()  # 0-dim, on the device; inf/nan pass through
        total = loss.detach().float()
        if self.all_sum is not None:  # the whole batch's loss: every process decides alike
            total = self.all_sum(total.clone())
        finite = torch.isfinite(norm) & torch.isfinite(total)
        apply_update(optimizer, *decide(self.stats, norm, finite, self.guards), grads)

    def take(self) -> dict[str, float]:
        """The counts since the last call (reading them waits for the device), then zeroes them; the run of
        non-finite steps carries on."""
        skipped, nonfinite, _, steps, norm_sum, norm_max, log_usual, _, clipped = self.stats.tolist()
        self.stats[[SKIPPED, NONFINITE, STEPS, NORM_SUM, NORM_MAX, CLIPPED]] = 0.0
        finite = steps - nonfinite
        return {"skipped_updates": int(skipped), "nonfinite_steps": int(nonfinite), "clipped_updates": int(clipped),
                "grad_norm_mean": norm_sum / finite if finite else float("nan"), "grad_norm_max": norm_max,
                "grad_norm_usual": math.exp(log_usual)}

    def peek(self) -> tuple[int, int, int]:
        """(updates skipped in this epoch, for either reason; consecutive non-finite steps up to the last one;
        updates clipped in this epoch): one host read."""
        s = self.stats.tolist()
        return int(s[SKIPPED] + s[NONFINITE]), int(s[STREAK]), int(s[CLIPPED])


def decide(stats: Tensor, norm: Tensor, finite: Tensor, guards: Guards) -> tuple[Tensor, Tensor | None]:
    """Counts the step (count_step) and returns whether to skip its update (non-finite, or too large) and what
    to divide its gradient by (>= 1; None: no clipping rule on): the larger of norm / grad_clip and the relative
    clip's divisor."""
    large, scale = count_step(stats, norm, finite, guards.skip_threshold, guards.clip_threshold)
    if guards.grad_clip > 0:
        absolute = torch.where(finite, norm / guards.grad_clip, 1.0).clamp_min(1.0)
        scale = absolute if scale is None else torch.maximum(scale, absolute)
    return ~finite | large, scale


def count_step(stats: Tensor, norm: Tensor, finite: Tensor, skip_threshold: float,
               clip_threshold: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Adds one step to the guard's counts `stats` (Guard.stats: (9,), or (9, M) for M models stepped together,
    with `norm` and `finite` then (M,)) and updates the usual norm. Returns whether each finite step is too large
    to apply (its norm above `skip_threshold` times the usual one; 0: never) and, with `clip_threshold`, what to
    divide each gradient by so that its norm is at most that many times the usual one (1 where it is; None
    without the rule): the one comparison both counts a clipped update and clips it."""
    s = stats
    n = torch.where(finite, norm, 0.0).double()
    log_n = torch.log(n.clamp_min(1e-30))
    large = torch.zeros_like(finite)
    if skip_threshold > 0:
        ceiling = s[LOG_USUAL] + math.log(skip_threshold)
        large = finite & (s[SEEN] >= SKIP_AFTER) & (log_n > ceiling)
        # a skipped update counts as one at the threshold: a lone spike barely moves the usual norm, while a lasting
        # rise of the norms (the run has moved, not misstepped) lifts it until the updates are taken again
        log_n = torch.where(large, ceiling, log_n)
    clipped, divisor = torch.zeros_like(finite), None
    if clip_threshold > 0:  # a clipped update enters the usual norm at its clipped size
        ceiling = s[LOG_USUAL] + math.log(clip_threshold)
        clipped = finite & ~large & (s[SEEN] >= SKIP_AFTER) & (log_n > ceiling)
        divisor = torch.where(clipped, torch.exp(log_n - ceiling), 1.0).to(norm.dtype)
        log_n = torch.where(clipped, ceiling, log_n)
    weight = torch.where(finite, (1 / (s[SEEN] + 1)).clamp_min(1 / USUAL_STEPS), 0.0)
    s.add_(torch.stack([large.double(), (~finite).double(), (~finite).double(), torch.ones_like(n), n,
                        torch.zeros_like(n), weight * (log_n - s[LOG_USUAL]), finite.double(), clipped.double()]))
    s[STREAK] = torch.where(finite, 0.0, s[STREAK])
    s[NORM_MAX] = torch.maximum(s[NORM_MAX], n)
    return large, divisor


def apply_update(optimizer: torch.optim.Optimizer, skip: Tensor, scale: Tensor | None, grads: list[Tensor]) -> None:
    """The optimizer's step unless `skip` (a 0-dim bool tensor), with the gradients `grads` divided by `scale`
    (or not, None). A fused optimizer takes both on the device; others read `skip` on the host."""
    if takes_decision(optimizer):
        # the fused kernel leaves parameters, moments and step count alone where found_inf is 1, and divides
        # the gradient by grad_scale: no host read, the same kernels whatever the decision
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        optimizer.grad_scale = scale  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
        return
    if scale is not None:
        torch._foreach_div_(grads, scale)
    if not bool(skip):  # reads the decision on the host (never inside a CUDA graph: it needs a fused optimizer)
        optimizer.step()


def takes_decision(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's own kernel applies a skip decision and a gradient scale (fused Adam and SGD)."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused") for g in optimizer.param_groups))


class Step:
    """One optimisation step on the training images `idx` at KL weight `beta`; returns this process's share of
    the objective (a 0-dim tensor on the device: reading it waits for the step).

    `all_sum` and `processes` describe the processes sharing each batch (one by default). Under
    DistributedDataParallel, which averages the processes' gradients, each process differentiates `processes`
    times its share, so that the average is the gradient of the whole batch's objective.
    `guards` sets the guard's rules (Guards(): skip non-finite steps only); `ema` is updated after every step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, inputs: Inputs,
                 autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                 all_sum: Callable[[Tensor], Tensor] = _identity, processes: int = 1,
                 guards: Guards = Guards(), ema: EMA | None = None):
        self.model, self.optimizer, self.objective, self.inputs = model, optimizer, objective, inputs
        self.autocast, self.all_sum, self.processes = autocast, all_sum, processes
        self.guard = Guard(model.parameters(), guards, all_sum if processes > 1 else None)
        self.ema = ema

    def __call__(self, idx: Tensor, beta: float) -> Tensor:
        x, eps = self.inputs(idx)  # (B, C, H, W); (B, L), (K, B, L) or None
        with self.autocast():
            out = self.model(x, eps, samples=self.objective.samples)
        loss = self.objective(out, Batch(len(idx), beta, self.all_sum, self.processes))
        self.optimizer.zero_grad(set_to_none=True)
        (loss.total * self.processes if self.processes > 1 else loss.total).backward()
        self.guard(self.optimizer, loss.total)
        if self.ema is not None:
            self.ema.update()
        return loss.total.detach()
