"""A training step replayed as one CUDA graph: the step's many small kernels become a single launch.

`CUDAGraphStep` wraps any step `(idx, beta) -> loss` whose work is all on the GPU. The first full-size call
runs the step eagerly (on a side stream, as capture requires: it creates the optimizer's state and the libraries'
per-stream handles) and then records it; each later full-size call copies the batch's indices into the graph's
input and replays it. Replays run the same kernels on the same tensors, and the graph's random draws advance
the CUDA generator as eager ones do. A batch of another size (an epoch's short last batch) runs eagerly.

A graph replays what was recorded and nothing else, so the trainer chooses it only where nothing in the step changes
from one batch to the next or needs the host (`capturable`): a constant β and learning rate, Adam with its step count
on the GPU, and no module hooks (a hook's Python would run once, at capture, and never on replay). The step's guard is
recorded with it: the gradient norm, the skip decision (fed to fused Adam's `found_inf`, which leaves the update
undone on the GPU), the clipping scale and the counts are device tensors that every replay rewrites, and so is the
moving average of the weights (--ema). The guard's thresholds are constants of the recording.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from .step import Guard

StepFn = Callable[[Tensor, float], Tensor]  # (indices of the batch, β) -> loss


class GuardedStep(Protocol):
    """A step (indices of the batch, β) -> loss whose guard keeps the counts of skipped updates."""

    guard: Guard

    def __call__(self, idx: Tensor, beta: float) -> Tensor: ...


def capturable(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               static: bool) -> bool:
    """Whether replaying a recorded step of this model and optimizer equals running it (checked once, at setup);
    `static`: β and the learning rate stay constant over the run."""
    if device.type != "cuda" or not static:
        return False
    if not all(g.get("capturable") and g.get("fused") for g in optimizer.param_groups):
        return False  # e.g. SGD, or a checkpoint written without a GPU-resident step count
    return not has_module_hooks(model)


def has_module_hooks(model: nn.Module) -> bool:
    """Whether a module hook (the model's own or a global one) would run Python code during the step."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


class CUDAGraphStep:
    """`step` for batches of `batch_size` indices, recorded once as a CUDA graph at β = `beta` and replayed."""

    def __init__(self, step: GuardedStep, batch_size: int, beta: float, device: torch.device):
        self.step, self.batch_size, self.beta = step, batch_size, beta
        self.guard = step.guard  # its counts live on the GPU and are updated by every replay
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=device)  # the graph's input
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None  # the graph's output
        self.eager = False  # set when capture failed: every step then runs eagerly

    def __call__(self, idx: Tensor, beta: float) -> Tensor:
        if self.eager or len(idx) != self.batch_size:
            return self.step(idx, beta)
        self.idx.copy_(idx)
        if self.graph is None:
            return self._capture()
        self.graph.replay()
        assert self.loss is not None, "set by _capture with the graph"
        return self.loss  # overwritten by the next replay: the caller reads it before then (stream order)

    def _capture(self) -> Tensor:
        device = self.idx.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            loss = self.step(self.idx, self.beta)  # the real step for this batch
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records; runs nothing
                self.loss = self.step(self.idx, self.beta)
        except RuntimeError as e:  # something in the step cannot be captured: go on kernel by kernel
            warnings.warn(f"CUDA graph capture of the training step failed ({e}); training goes on without it",
                          RuntimeWarning, stacklevel=3)
            self.eager = True
            return loss
        self.graph = graph
        return loss
