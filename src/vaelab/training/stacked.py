"""The MLP encoder and decoder of M ensemble members in one pass: each Linear layer is one batched matmul over the
members' stacked weights (torch.baddbmm), the same arithmetic as nn.Linear run once per member.

    h = baddbmm(b[:, None], h, W.mT)      # W (M, out, in), b (M, out), h (M, B, in) -> (M, B, out)

The stacked weights are the leaf tensors autograd fills (ensemble.share_weights), so their gradients land in one
(M, ...) tensor per layer without the per-member bookkeeping of torch.func.vmap. Networks made of anything but
Flatten, Linear and ReLU are not handled here (`stackable` says which); the conv nets' pass is stacked_conv.
"""

from __future__ import annotations

import typing
from typing import Any

import torch
from torch import Tensor, baddbmm, nn
from torch.optim.adam import adam

from ..models.nets import MLPDecoder, MLPEncoder, bounded_logvar

_LAYERS = (nn.Flatten, nn.Linear, nn.ReLU)


def stackable(encoder: nn.Module, decoder: nn.Module) -> bool:
    """Whether both networks are the MLP family built from Flatten, Linear and ReLU only."""
    return (type(encoder) is MLPEncoder and type(decoder) is MLPDecoder
            and all(isinstance(m, _LAYERS) for net in (encoder.body, decoder.body) for m in net))


def _body(body: nn.Sequential, weights: dict[str, Tensor], prefix: str, h: Tensor) -> Tensor:
    """`body`'s layers on every member's rows h (M, B, in), with the weights `prefix`.i.weight / .bias."""
    for i, layer in enumerate(body):
        if isinstance(layer, nn.Linear):
            h = stacked_linear(weights, f"{prefix}.{i}", h)
        elif isinstance(layer, nn.ReLU):
            h = h.relu()
        # nn.Flatten: the caller flattened the images already
    return h


class _StackedLinear(torch.autograd.Function):
    """h (M, B, in) @ W.mT + b for W (M, out, in): autograd's own bmm backward would give W's gradient as the
    transpose of an (M, in, out) product, which the accumulation into W.grad then copies element by element (half
    the step's time at 784x400); here it is computed in W's layout, g.mT @ h."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(h, w)
        return baddbmm(b.unsqueeze(1), h, w.mT)  # (M, B, out)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        h, w = ctx.saved_tensors
        grad_h = torch.bmm(g, w) if ctx.needs_input_grad[0] else None  # (M, B, in)
        return grad_h, torch.bmm(g.mT, h), g.sum(1)  # (M, out, in), (M, out)


def stacked_linear(weights: dict[str, Tensor], name: str, h: Tensor) -> Tensor:
    """The Linear layer `name` of every member on its rows h (M, B, in) -> (M, B, out)."""
    out: Tensor = _StackedLinear.apply(h, weights[f"{name}.weight"], weights[f"{name}.bias"])
    return out


def encode(encoder: MLPEncoder, weights: dict[str, Tensor], xs: Tensor) -> tuple[Tensor, Tensor]:
    """Every member's q(z|x): xs (M, B, C, H, W) -> mean, log-variance, each (M, B, L), as MLPEncoder.forward."""
    h = _body(encoder.body, weights, "body", xs.flatten(2))  # (M, B, hidden)
    mu, logvar = stacked_linear(weights, "head", h).chunk(2, dim=2)  # (M, B, L) each
    return mu, bounded_logvar(logvar)


def decode(decoder: MLPDecoder, weights: dict[str, Tensor], z: Tensor) -> list[Tensor]:
    """Every member's decoder outputs: z (M, B, L) -> n_params tensors, each (M, B, C, H, W), as MLPDecoder.forward."""
    c, h, w = decoder.shape
    m, b = z.shape[:2]
    out = _body(decoder.body, weights, "body", z).view(m, b, decoder.n_params * c, h, w)  # (M, B, K*C, H, W)
    return list(out.split(c, dim=2)) if decoder.n_params > 1 else [out]


def stack_like(tensors: list[Tensor], like: Tensor | None = None) -> Tensor:
    """torch.stack whose every slice (M, ...)[k] has the strides of `like` (default tensors[0]) where those are
    contiguous or channels-last: a channels-last conv weight stays channels-last in the stack, and so does the
    view of its slice that becomes the member's parameter."""
    like = tensors[0] if like is None else like
    if not (like.is_contiguous() or (like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last))):
        return torch.stack(tensors)
    out = torch.empty_strided((len(tensors), *like.shape), (like.numel(), *like.stride()), dtype=like.dtype,
                              device=like.device)
    for k, t in enumerate(tensors):
        out[k].copy_(t)
    return out


def member_norms(grads: list[Tensor]) -> Tensor:
    """Each member's total gradient norm, from the stacked gradients `grads` (each (M, ...)): (M,), as
    torch.nn.utils.get_total_norm over one member's gradients."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim))) for g in grads])  # (W, M)
    return torch.linalg.vector_norm(per_tensor, dim=0)


class SharedAdam:
    """Every member's Adam update in one call over the stacked weights, whatever each member's step count and
    whichever members' updates are skipped.

    Each member keeps its own optimizer and its own state (moments and step count, one per parameter, as its
    checkpoint saves them); its parameters are slices of the stacks. `step` hands the slices of the members
    whose update is taken, with their gradients' slices, moments and step counts, to one call of Adam's own
    update (torch.optim.adam.adam, in the implementation the members' optimizers chose: the fused kernel for
    vaelab's), so each member's update is its own optimizer's arithmetic, bias corrections from its own count;
    a member whose update is skipped is left out, and its weights, moments and count stay as they were, as its
    own Adam leaves them when not stepped. Members whose settings differ (an lr sweep) take one call per setting."""

    def __init__(self, stacks: list[Tensor], optimizers: list[torch.optim.Optimizer],
                 params: list[list[nn.Parameter]]):
        self.stacks, self.optimizers = stacks, optimizers
        by_setting: dict[str, list[int]] = {}
        for k, o in enumerate(optimizers):
            by_setting.setdefault(repr(sorted(_settings(o).items())), []).append(k)
        self.groups = list(by_setting.values())  # the members of each setting, in order
        # per member: its parameters and, per key of Adam's state, their entries, in stack order (the members'
        # optimizers are not loaded while they share a step: their state tensors stay these)
        self.tensors = []
        for o, ps in zip(optimizers, params, strict=True):
            group = o.param_groups[0]
            for p in ps:  # the state Adam gives a parameter at its first step, for members not yet stepped
                if not o.state[p]:
                    o.state[p] = {"step": _step_tensor(group, p), **{key: torch.zeros_like(
                        p, memory_format=torch.preserve_format) for key in _moments(group)}}
            self.tensors.append({"params": list(ps), **{key: [o.state[p][key] for p in ps]
                                                        for key in ("step", *_moments(group))}})

    @staticmethod
    def applies(optimizers: list[torch.optim.Optimizer], params: list[list[nn.Parameter]]) -> bool:
        """Whether the members' optimizers are Adam with one parameter group each, holding the stacked networks'
        parameters only, with settings in numbers (not tensors) and not differentiable."""
        return all(type(o) is torch.optim.Adam and len(o.param_groups) == 1
                   and not o.param_groups[0]["differentiable"]
                   and not any(torch.is_tensor(v) for v in (o.param_groups[0]["lr"], *o.param_groups[0]["betas"]))
                   and {id(p) for p in o.param_groups[0]["params"]} == {id(p) for p in ps}
                   for o, ps in zip(optimizers, params, strict=True))

    def counts(self) -> Tensor:
        """Each member's number of updates taken, (M,)."""
        return torch.stack([t["step"][0].cpu() for t in self.tensors])

    def step(self, taken: list[bool]) -> None:
        """The update of every member k with taken[k], from its slices of the stacks' gradients."""
        grads = [typing.cast(Tensor, w.grad).unbind(0) for w in self.stacks]  # per stack, M slices (...)
        for members in self.groups:
            stepped = [k for k in members if taken[k]]
            if not stepped:
                continue
            group = self.optimizers[stepped[0]].param_groups[0]
            lists = {key: [t for k in stepped for t in self.tensors[k].get(key, ())] for key in ("params", "step",
                                                                                               *_MOMENTS)}
            with torch.no_grad():
                adam(lists["params"], [g[k] for k in stepped for g in grads], lists["exp_avg"], lists["exp_avg_sq"],
                     lists["max_exp_avg_sq"], lists["step"], foreach=group["foreach"],
                     capturable=group["capturable"], differentiable=False, fused=group["fused"],
                     amsgrad=group["amsgrad"], **_decoupled(group),
                     beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _moments(group: dict) -> tuple[str, ...]:
    """The moments Adam keeps per parameter with these settings."""
    return _MOMENTS if group["amsgrad"] else _MOMENTS[:2]


def _decoupled(group: dict) -> dict:
    """Adam's decoupled_weight_decay where this torch has it (older releases, which vaelab supports, have none)."""
    return {"decoupled_weight_decay": group["decoupled_weight_decay"]} if "decoupled_weight_decay" in group else {}


def _settings(optimizer: torch.optim.Optimizer) -> dict:
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


def _step_tensor(group: dict, p: Tensor) -> Tensor:
    """Adam's step count before its first step, as Adam keeps it (on the device for fused or capturable Adam, else
    on the CPU)."""
    on_device = group["fused"] or group["capturable"]
    return torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
