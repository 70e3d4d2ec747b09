"""The MLP encoder and decoder of M ensemble members in one pass: each Linear layer is one batched matmul over the
members' stacked weights (torch.baddbmm), the same arithmetic as nn.Linear run once per member.

    h = baddbmm(b[:, None], h, W.mT)      # W (M, out, in), b (M, out), h (M, B, in) -> (M, B, out)

The stacked weights are the leaf tensors autograd fills (ensemble.share_weights), so their gradients land in one
(M, ...) tensor per layer without the per-member bookkeeping of torch.func.vmap. Networks made of anything but
Flatten, Linear and ReLU are not handled here (`stackable` says which): conv runs train alone.
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
            h = _linear(weights, f"{prefix}.{i}", h)
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


def _linear(weights: dict[str, Tensor], name: str, h: Tensor) -> Tensor:
    out: Tensor = _StackedLinear.apply(h, weights[f"{name}.weight"], weights[f"{name}.bias"])
    return out


def encode(encoder: MLPEncoder, weights: dict[str, Tensor], xs: Tensor) -> tuple[Tensor, Tensor]:
    """Every member's q(z|x): xs (M, B, C, H, W) -> mean, log-variance, each (M, B, L), as MLPEncoder.forward."""
    h = _body(encoder.body, weights, "body", xs.flatten(2))  # (M, B, hidden)
    mu, logvar = _linear(weights, "head", h).chunk(2, dim=2)  # (M, B, L) each
    return mu, bounded_logvar(logvar)


def decode(decoder: MLPDecoder, weights: dict[str, Tensor], z: Tensor) -> list[Tensor]:
    """Every member's decoder outputs: z (M, B, L) -> n_params tensors, each (M, B, C, H, W), as MLPDecoder.forward."""
    c, h, w = decoder.shape
    m, b = z.shape[:2]
    out = _body(decoder.body, weights, "body", z).view(m, b, decoder.n_params * c, h, w)  # (M, B, K*C, H, W)
    return list(out.split(c, dim=2)) if decoder.n_params > 1 else [out]
