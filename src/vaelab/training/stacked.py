"""The MLP encoder and decoder of M ensemble members in one pass: each Linear layer is one batched matmul over the
members' stacked weights (torch.baddbmm), the same arithmetic as nn.Linear run once per member.

    h = baddbmm(b[:, None], h, W.mT)      # W (M, out, in), b (M, out), h (M, B, in) -> (M, B, out)

The stacked weights are the leaf tensors autograd fills (ensemble.share_weights), so their gradients land in one
(M, ...) tensor per layer without the per-member bookkeeping of torch.func.vmap. Networks made of anything but
Flatten, Linear and ReLU are not handled here (`stackable` says which); the conv nets' pass is stacked_conv.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, baddbmm, nn

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
    """Every member's Adam update as one fused step over the stacked weights.

    Each member keeps its own optimizer, whose moments become views of one stacked tensor per weight: the one
    fused kernel over the stacks updates every member's weights and moments exactly as its own optimizer would
    (Adam is elementwise), in one pass instead of M. It applies when every member has taken as many updates as
    the others (`ready`); otherwise the caller steps each member's own optimizer (a member whose step was skipped,
    e.g. for a non-finite loss, and then until the counts agree again), and `after_own_steps` records them."""

    def __init__(self, stacks: list[Tensor], optimizers: list[torch.optim.Optimizer],
                 params: list[list[nn.Parameter]]):
        group = optimizers[0].param_groups[0]
        self.optimizer = torch.optim.Adam(stacks, **{k: v for k, v in group.items() if k != "params"})
        self.counts = [_count(o, ps) for o, ps in zip(optimizers, params, strict=True)]
        self.member_steps = []
        for j, stack in enumerate(stacks):
            owned = [ps[j] for ps in params]
            moments = {key: stack_like([_moment(o, p, key) for o, p in zip(optimizers, owned, strict=True)], stack[0])
                       for key in ("exp_avg", "exp_avg_sq")}  # (M, ...) each, in the layout of the stack
            for k, (o, p) in enumerate(zip(optimizers, owned, strict=True)):
                o.state[p] = {"step": _step_tensor(group, p, self.counts[k]), "exp_avg": moments["exp_avg"][k],
                              "exp_avg_sq": moments["exp_avg_sq"][k]}
                self.member_steps.append(o.state[p]["step"])
            self.optimizer.state[stack] = {"step": _step_tensor(group, stack, self.counts[0]), **moments}

    @staticmethod
    def applies(optimizers: list[torch.optim.Optimizer], params: list[list[nn.Parameter]]) -> bool:
        """Whether the members' optimizers are Adam (without amsgrad) with one parameter group each, holding the
        stacked networks' parameters only, with equal settings."""
        def settings(o: torch.optim.Optimizer) -> dict:
            return {k: v for k, v in o.param_groups[0].items() if k != "params"}

        return all(type(o) is torch.optim.Adam and len(o.param_groups) == 1 and not o.param_groups[0]["amsgrad"]
                   and {id(p) for p in o.param_groups[0]["params"]} == {id(p) for p in ps}
                   and settings(o) == settings(optimizers[0]) for o, ps in zip(optimizers, params, strict=True))

    def ready(self) -> bool:
        return all(c == self.counts[0] for c in self.counts)

    def step(self) -> None:
        """Every member's update, from the stacks' gradients."""
        self.optimizer.step()  # the stacks' step counts go up by one: so do the members'
        torch._foreach_add_(self.member_steps, 1.0)
        self.counts = [c + 1 for c in self.counts]

    def after_own_steps(self, applied: list[bool]) -> None:
        """The members stepped their own optimizers; `applied`: whose update was taken (not skipped)."""
        self.counts = [c + a for c, a in zip(self.counts, applied, strict=True)]
        if self.ready():
            for state in self.optimizer.state.values():
                state["step"].fill_(self.counts[0])


def _count(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    states = [optimizer.state.get(p, {}) for p in params]
    return int(states[0]["step"]) if "step" in states[0] else 0


def _moment(optimizer: torch.optim.Optimizer, p: nn.Parameter, key: str) -> Tensor:
    state = optimizer.state.get(p, {})
    return state[key].detach() if key in state else torch.zeros_like(p, memory_format=torch.preserve_format)


def _step_tensor(group: dict, p: Tensor, count: int) -> Tensor:
    """Adam's step count as Adam itself keeps it (on the device for fused or capturable Adam, else on the CPU)."""
    on_device = group["fused"] or group["capturable"]
    return torch.full((), float(count), dtype=torch.float32, device=p.device if on_device else "cpu")
