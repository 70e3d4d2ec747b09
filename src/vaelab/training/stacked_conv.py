"""The conv encoder and decoder of M ensemble members in one pass, by grouped convolution: the members' feature
maps sit side by side along the channels, and each layer is one call over all of them whose groups keep the
members apart, the same arithmetic as the layer run once per member.

    h (B, M*C, H, W)                                  # member k's channels: k*C ... (k+1)*C - 1
    Conv2d           conv2d(h, W.flatten(0, 1), b.flatten(), groups=M*g)      # W (M, out, in/g, k, k)
    ConvTranspose2d  conv_transpose2d(h, W.flatten(0, 1), ..., groups=M*g)    # W (M, in, out/g, k, k)
    GroupNorm(g, C)  group_norm(h, M*g, w.flatten(), b.flatten())             # each member's own groups
    Linear           baddbmm over (M, B, F), as the MLP (vaelab.training.stacked)

The networks are walked module by module, each layer read with its own settings (stride, padding, output
padding, groups, eps), so `stackable` says False for any module it does not know and such a network trains
alone. As in the MLP's pass, the stacked weights are the leaves autograd fills (ensemble.share_weights); the
flattened views above keep each member's channels-last layout.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.nets import ConvDecoder, ConvEncoder, ResBlock, bounded_logvar
from .stacked import stacked_linear


def _known(module: nn.Module) -> bool:
    """Whether `module` is made only of layers this pass reproduces (exact types: a subclass may compute
    something else)."""
    if type(module) not in (nn.Sequential, ResBlock, nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm, nn.SiLU, nn.ReLU):
        return False
    if isinstance(module, nn.Sequential):
        return all(_known(m) for m in module)
    if isinstance(module, ResBlock):
        return set(dict(module.named_children())) == {"branch"} and _known(module.branch)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.padding_mode == "zeros"
    if isinstance(module, nn.GroupNorm):
        return module.affine
    return True


def stackable(encoder: nn.Module, decoder: nn.Module) -> bool:
    """Whether both networks are the conv family, built from layers this pass knows only."""
    if type(encoder) is not ConvEncoder or type(decoder) is not ConvDecoder:
        return False
    *maps, flatten = encoder.body  # the encoder's maps, then Flatten to the rows of its head
    return (type(flatten) is nn.Flatten and (flatten.start_dim, flatten.end_dim) == (1, -1)
            and all(_known(m) for m in maps) and _linear(encoder.head) and _linear(decoder.fc)
            and _known(decoder.body))


def _linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is not None  # stacked_linear adds a bias


def _maps(module: nn.Module, weights: dict[str, Tensor], name: str, h: Tensor, m: int) -> Tensor:
    """`module` (named `name` in its network) on every member's maps h (B, M*C, H, W)."""
    if isinstance(module, nn.Sequential):
        for i, layer in enumerate(module):
            h = _maps(layer, weights, f"{name}.{i}", h, m)
        return h
    if isinstance(module, ResBlock):
        return h + _maps(module.branch, weights, f"{name}.branch", h, m)
    if isinstance(module, (nn.SiLU, nn.ReLU)):
        return module(h)
    w = weights[f"{name}.weight"]
    b = weights.get(f"{name}.bias")
    bias = None if b is None else b.flatten()
    if isinstance(module, nn.Conv2d):
        return F.conv2d(h, w.flatten(0, 1), bias, module.stride, module.padding, module.dilation,
                        module.groups * m)
    if isinstance(module, nn.ConvTranspose2d):
        padding = typing.cast(tuple[int, ...], module.padding)  # a transposed conv's padding is never a string
        return F.conv_transpose2d(h, w.flatten(0, 1), bias, module.stride, padding,
                                  module.output_padding, module.groups * m, module.dilation)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(h, module.num_groups * m, w.flatten(), bias, module.eps)
    raise TypeError(f"the stacked conv pass does not know {type(module).__name__}")  # stackable said False


def _to_maps(rows: Tensor, chw: tuple[int, ...]) -> Tensor:
    """Rows (M, B, C*H*W) as maps (B, M*C, H, W), channels-last."""
    m, b = rows.shape[:2]
    c, h, w = chw
    return rows.view(m, b, c, h, w).transpose(0, 1).reshape(b, m * c, h, w).contiguous(
        memory_format=torch.channels_last)


def _from_maps(maps: Tensor, m: int) -> Tensor:
    """Maps (B, M*C, H, W) as (M, B, C, H, W)."""
    b, mc, h, w = maps.shape
    return maps.view(b, m, mc // m, h, w).transpose(0, 1)


def encode(encoder: ConvEncoder, weights: dict[str, Tensor], xs: Tensor) -> tuple[Tensor, Tensor]:
    """Every member's q(z|x): xs (M, B, C, H, W) -> mean, log-variance, each (M, B, L), as ConvEncoder.forward."""
    m = xs.shape[0]
    h = _to_maps(xs.flatten(2), xs.shape[2:])  # (B, M*C, H, W)
    for i, layer in enumerate(list(encoder.body)[:-1]):  # the last layer, Flatten, is the next line's
        h = _maps(layer, weights, f"body.{i}", h, m)  # (B, M*C', h, w)
    rows = _from_maps(h, m).flatten(2)  # (M, B, C'*h*w), each member's features in its own Flatten's order
    mu, logvar = stacked_linear(weights, "head", rows).chunk(2, dim=2)  # (M, B, L) each
    return mu, bounded_logvar(logvar)


def decode(decoder: ConvDecoder, weights: dict[str, Tensor], z: Tensor) -> list[Tensor]:
    """Every member's decoder outputs: z (M, B, L) -> n_params tensors, each (M, B, C, H, W), as
    ConvDecoder.forward."""
    m = z.shape[0]
    c = decoder.shape[0]
    h = _to_maps(stacked_linear(weights, "fc", z), decoder.start)  # (B, M*C0, h, w)
    out = _from_maps(_maps(decoder.body, weights, "body", h, m), m)  # (M, B, K*C, H, W)
    return list(out.split(c, dim=2)) if decoder.n_params > 1 else [out]
