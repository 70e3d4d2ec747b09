"""The training step of an MLP VAE with its gradients written out by hand: the same loss and gradients as
autograd on `objective(model.terms(x))`, in fewer passes over memory and without building a graph.

    forward   x -> [Linear, ReLU]* -> Linear -> (μ, log σ²) -> z = μ + σ·ε -> [Linear, ReLU]* -> Linear -> params
    backward  d loss / d params from the likelihood (`Likelihood.log_prob_backward`: closed form where the
              likelihood has one, else autograd on the decoder's outputs alone), then by hand through the
              decoder, the sample and the KL, and the encoder.

Every gradient is the one autograd computes, operation for operation (the weight gradient is gᵀ·a with the
weight's own layout, the ReLU's is a threshold on its output); tests compare both paths in float64.
`loss_and_grads` falls back to autograd (`ENABLED = False` forces it) for anything else: conv networks,
bf16 autocast, frozen parameters, layers other than Linear/ReLU, or modules carrying hooks that this path
would skip.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from .model import DiagonalGaussian, Terms, objective
from .nets import MLPDecoder, MLPEncoder

ENABLED = True  # set to False to train every model through autograd (for comparison and debugging)

Layers = list[tuple[Tensor, Tensor]]  # (weight (out, in), bias (out,)) per Linear, in order


def _chain(modules) -> Layers | None:
    """The (weight, bias) of a [Flatten,] Linear, ReLU, ..., Linear stack; None for anything else."""
    modules = list(modules)
    if modules and type(modules[0]) is nn.Flatten and (modules[0].start_dim, modules[0].end_dim) == (1, -1):
        modules = modules[1:]
    linears, relus = modules[0::2], modules[1::2]
    if len(modules) % 2 == 0 or not all(type(m) is nn.ReLU for m in relus):
        return None
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return None
    return [(m.weight, m.bias) for m in linears]


def _networks(model) -> tuple[Layers, Layers] | None:
    if type(model.encoder) is not MLPEncoder or type(model.decoder) is not MLPDecoder:
        return None
    enc, dec = _chain([*model.encoder.body, model.encoder.head]), _chain(model.decoder.body)
    return (enc, dec) if enc is not None and dec is not None else None


def plan(model, x: Tensor) -> tuple[Layers, Layers] | None:
    """The encoder's and decoder's layers when the hand-written step computes exactly what autograd would for
    this model and input; None when autograd must do it."""
    if not ENABLED or torch.is_autocast_enabled(x.device.type) or not torch.is_grad_enabled():
        return None
    if _global_hooks():
        return None
    for m in model.modules():  # one pass: hooks and frozen parameters
        if _module_hooked(m) or any(p is not None and not p.requires_grad for p in m._parameters.values()):
            return None
    return _networks(model)


def hooked(model) -> bool:
    """Whether a module hook (the model's own or a global one) would run Python code during the step."""
    return _global_hooks() or any(_module_hooked(m) for m in model.modules())


def _module_hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def applies(model, x: Tensor) -> bool:
    return plan(model, x) is not None


def _global_hooks() -> bool:
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks)


def _forward(layers: Layers, a: Tensor) -> tuple[Tensor, list[Tensor]]:
    """ReLU between the layers, none after the last; returns the output and each layer's input."""
    inputs = []
    for i, (w, b) in enumerate(layers):
        inputs.append(a)
        a = torch.addmm(b, a, w.t())  # (B, out)
        if i < len(layers) - 1:
            a = a.relu_()
    return a, inputs


def _backward(layers: Layers, inputs: list[Tensor], g: Tensor, need_input_grad: bool):
    """(d weight, d bias) per layer, in `layers` order, and, if asked, the gradient of the chain's input."""
    grads: list[tuple[Tensor, Tensor]] = []
    for i in reversed(range(len(layers))):
        w = layers[i][0]
        grads.append((torch.mm(g.t(), inputs[i]), g.sum(0)))  # (out, in) like the weight, (out,)
        if i > 0:
            g = torch.ops.aten.threshold_backward(torch.mm(g, w), inputs[i], 0)  # inputs[i] is a ReLU output
        elif need_input_grad:
            g = torch.mm(g, w)
    return grads[::-1], g


def loss_and_grads(model, x: Tensor, beta: float = 1.0, free_bits: float = 0.0,
                   forward_context: AbstractContextManager | None = None, value: bool = True) -> Tensor | None:
    """The training objective (as `objective(model.terms(x), beta, free_bits)`, a 0-dim tensor) with every
    parameter's .grad set to its gradient (replacing what was there, like zero_grad(set_to_none) + backward).

    `forward_context` (e.g. bf16 autocast) wraps the forward pass; under autocast autograd does the work.
    value=False: the caller needs only the gradients, and the hand-written step may skip the objective's value
    (for the Bernoulli, its softplus pass) and return None; autograd's path returns the value anyway."""
    with forward_context or nullcontext():
        layers = plan(model, x)
        if layers is None:
            terms = model.terms(x, extras=False)
    if layers is None:
        loss = objective(terms, beta, free_bits)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        return loss.detach()

    enc, dec = layers
    n, latent = x.shape[0], model.latent_dim
    with torch.no_grad():
        e, enc_inputs = _forward(enc, x.reshape(n, -1))  # (B, 2L)
        q = DiagonalGaussian(e[:, :latent], e[:, latent:])  # (B, L) each
        eps = q.noise()
        std, z = q.std, q.reparameterize(eps)  # the draw model.terms makes
        out, dec_inputs = _forward(dec, z)  # (B, K*C*H*W)
        c, h, w = model.decoder.shape
        params = list(out.view(n, -1, h, w).split(c, dim=1))  # K tensors (B, C, H, W)

        for p in model.likelihood.parameters():
            p.grad = None
        log_px, g_params = model.likelihood.log_prob_backward(params, x, -1.0 / n, value)  # (B,), d loss / d params
        kl = q.kl_per_dim() if value or free_bits > 0 else None  # (B, L)
        loss = objective(Terms(-log_px, kl, None, None), beta, free_bits) if value else None
        # d loss / d KL_bd = β/B, zero for a dimension whose batch-mean KL is clamped up to free_bits
        coef = beta / n if free_bits <= 0 else (beta / n) * (kl.mean(0) >= free_bits).to(kl.dtype)  # (L,)

        g_out = torch.cat(g_params, dim=1).view(n, -1) if len(g_params) > 1 else g_params[0].reshape(n, -1)
        dec_grads, g_z = _backward(dec, dec_inputs, g_out, need_input_grad=True)  # g_z (B, L)
        g_mean = g_z + coef * q.mean  # KL_bd = (μ² + e^v − 1 − v)/2, z = μ + e^{v/2}·ε
        g_logvar = g_z * eps * 0.5 * std + coef * 0.5 * (torch.exp(q.logvar) - 1.0)
        enc_grads, _ = _backward(enc, enc_inputs, torch.cat([g_mean, g_logvar], dim=1), need_input_grad=False)

    for (weight, bias), (g_w, g_b) in zip(enc + dec, enc_grads + dec_grads, strict=True):
        weight.grad, bias.grad = g_w, g_b
    return loss
