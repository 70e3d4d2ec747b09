"""The training step: one batch's objective, its gradients by autograd, the optimizer's update.

    x, eps = inputs(idx)                    # the batch (and, when split over processes, the noise of z)
    out = model(x, eps, samples=K)          # per-example terms (K draws of z per example)
    loss = objective(out, batch)            # vaelab.models.objective
    loss.total.backward(); optimizer.step()

What differs between devices and process counts wraps this step and does not repeat it: on a GPU a CUDA graph
records and replays it (vaelab.training.cudagraph); with several processes the model is wrapped in
DistributedDataParallel and the inputs are this process's rows (vaelab.training.distributed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from ..models.objective import Batch, Objective

# (x, eps) for the training images `idx`: eps None lets the model draw the noise of z itself
Inputs = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def local_inputs(batch: Callable[[Tensor], Tensor]) -> Inputs:
    """Inputs of a single process: the whole batch; the model draws z's noise."""

    def inputs(idx: Tensor) -> tuple[Tensor, Tensor | None]:
        return batch(idx), None

    return inputs


def _identity(t: Tensor) -> Tensor:
    return t


class Step:
    """One optimisation step on the training images `idx` at KL weight `beta`; returns this process's share of
    the objective (a 0-dim tensor on the device: reading it waits for the step).

    `all_sum` and `processes` describe the processes sharing each batch (one by default). Under
    DistributedDataParallel, which averages the processes' gradients, each process differentiates `processes`
    times its share, so that the average is the gradient of the whole batch's objective.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, inputs: Inputs,
                 autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                 all_sum: Callable[[Tensor], Tensor] = _identity, processes: int = 1):
        self.model, self.optimizer, self.objective, self.inputs = model, optimizer, objective, inputs
        self.autocast, self.all_sum, self.processes = autocast, all_sum, processes

    def __call__(self, idx: Tensor, beta: float) -> Tensor:
        x, eps = self.inputs(idx)  # (B, C, H, W); (B, L), (K, B, L) or None
        with self.autocast():
            out = self.model(x, eps, samples=self.objective.samples)
        loss = self.objective(out, Batch(len(idx), beta, self.all_sum, self.processes))
        self.optimizer.zero_grad(set_to_none=True)
        (loss.total * self.processes if self.processes > 1 else loss.total).backward()
        self.optimizer.step()
        return loss.total.detach()
