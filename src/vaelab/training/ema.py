"""An exponential moving average of the weights (--ema DECAY), the weights a run evaluates, samples and saves.

After every optimisation step each average e moves toward its parameter w:

    e ← d·e + (1 − d)·w,    d = min(DECAY, (1 + t) / (10 + t)),  t = the updates made before this one

The second term of the minimum (TensorFlow's `num_updates` rule) lets the average follow the weights closely in a
run's first steps, when they still move fast, and reaches DECAY after about 10/(1 − DECAY) steps. The count t and
the decay live on the device and the update is one foreach pass, so a CUDA graph of the training step holds it.
The raw weights keep training; `applied()` puts the averages into the model for as long as it is open and then
restores the raw weights exactly, so evaluating never changes the course of training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """The moving averages of `model`'s parameters at DECAY `decay` (0 < decay < 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1); got {decay!r}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        # same layout as each parameter (channels-last convs), so the update is one elementwise pass
        self.averages = [torch.empty_like(p).copy_(p.detach()) for p in self.params]
        self.updates = torch.zeros((), dtype=torch.float32, device=self.params[0].device)  # t

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)  # 1 − d, on the device
        weights = [weight.expand_as(p) for p in self.params]  # the List overload: a tensor weight, no host read
        torch._foreach_lerp_(self.averages, self.params, weights)  # type: ignore[arg-type]
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own weights again after it."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.averages, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw, strict=True):
                    p.copy_(r)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averages into the model for good (the end of training)."""
        for p, a in zip(self.params, self.averages, strict=True):
            p.copy_(a)

    def state_dict(self) -> dict[str, Tensor]:
        """The averages by parameter name, and the update count, for a checkpoint."""
        return {**dict(zip(self.names, self.averages, strict=True)), "__updates__": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in [*self.names, "__updates__"] if n not in state]
        if missing:
            raise KeyError(f"the checkpoint's weight averages lack {len(missing)} entries, e.g. {missing[0]}")
        for name, a in zip(self.names, self.averages, strict=True):
            a.copy_(state[name])
        self.updates.copy_(state["__updates__"])
