"""The learning rate over a run (--lr-schedule, --lr-warmup, --lr-final): a multiple of each parameter group's own
rate (--lr for the networks; a learned σ's own step size), set before every step.

The multiple is a pure function of how far the run has gone, in epochs, counted at the end of the step about to
be taken: a run resumed from any checkpoint, mid-epoch included, takes the same rates as one that never stopped,
and the first step of a warm-up is not wasted at rate 0. Adam divides each weight's step by that weight's own
recent gradient size, so a step of `lr` can move a rarely-used weight (a bias, a learned start state) by about
lr per update however small its gradients: a rate that falls towards the end of the run is what bounds those
moves once the model has settled, which clipping or skipping the total gradient norm cannot.
"""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def lr_factor(optim: OptimConfig, progress: float) -> float:
    """The learning rate as a multiple of --lr after `progress` epochs of --epochs: a linear rise over --lr-warmup
    epochs, then 1 (constant) or half a cosine from 1 down to --lr-final at the end of the last epoch."""
    warmup = min(1.0, progress / optim.lr_warmup) if optim.lr_warmup > 0 else 1.0
    if optim.lr_schedule == "constant":
        return warmup
    t = min(1.0, max(0.0, (progress - optim.lr_warmup) / (optim.epochs - optim.lr_warmup)))
    return warmup * (optim.lr_final + (1.0 - optim.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t)))


class LRSchedule:
    """Sets every parameter group's rate to its own base rate (`initial_lr`, which make_optimizer records and the
    checkpoint keeps) times lr_factor, before each step."""

    def __init__(self, optim: OptimConfig, optimizer: torch.optim.Optimizer):
        self.optim, self.optimizer = optim, optimizer

    def __call__(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Sets the rates for step `step` (from 0) of epoch `epoch` (from 0); returns the multiple."""
        factor = lr_factor(self.optim, epoch + (step + 1) / steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor


def stopped_note(optim: OptimConfig, done: float) -> str:
    """What a run stopped by the time limit after `done` epochs says of its schedule: "" unless a cosine that had
    not yet fallen to half of --lr, since the cosine follows --epochs, not the time limit."""
    if optim.lr_schedule != "cosine" or (factor := lr_factor(optim, done)) <= 0.5:
        return ""
    return (f"; the learning rate was still {factor:.2f}x --lr: the cosine falls over all of --epochs "
            f"{optim.epochs}, so give as many epochs as fit in the time")


def make_schedule(optim: OptimConfig, optimizer: torch.optim.Optimizer) -> LRSchedule | None:
    """The run's schedule; None where the rate never changes (the optimizer's rates are then left alone)."""
    if optim.lr_schedule == "constant" and optim.lr_warmup <= 0:
        return None
    return LRSchedule(optim, optimizer)
