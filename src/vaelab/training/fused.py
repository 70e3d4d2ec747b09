"""The training step of a plain MLP VAE with the networks' gradients written out by hand: the same loss,
gradients and update as `trainer.TrainStep`, without building an autograd graph through the networks.

    forward   x -> [Linear, ReLU]* -> Linear -> (μ, log σ²) -> z = μ + σ·ε -> [Linear, ReLU]* -> Linear -> params
    backward  d loss / d params by autograd on the likelihood alone (its closed form, where it has one), then
              by hand through the decoder, the sample and the KL, and the encoder.

Why it exists: on a CPU the step of a small MLP is short enough that autograd's per-operation bookkeeping
(graph nodes, module calls, gradient accumulation) is a visible share of it; docs/benchmarks-train.md measures
what this step saves. Every gradient is the one autograd computes, operation for operation (the weight
gradient is gᵀ·a in the weight's own layout, the ReLU's is a threshold on its output); tests/test_fused.py
compares both in float64.

The trainer chooses it once, at setup (`MLPStep.applies`), only for what it computes exactly: a VAE whose
encoder and decoder are vaelab's MLPs of Linear and ReLU layers, every parameter trainable, no module hooks
(this step calls no module, so a hook would never run), float32 without autocast, on the CPU (on a GPU the
CUDA graph removes the same overhead). Anything else trains through TrainStep.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..models.nets import MLPDecoder, MLPEncoder
from ..models.vae import VAE, DiagonalGaussian, Terms, objective
from .cudagraph import has_module_hooks

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


def _layers(model: nn.Module) -> tuple[Layers, Layers] | None:
    if type(model) is not VAE or type(model.encoder) is not MLPEncoder or type(model.decoder) is not MLPDecoder:
        return None
    enc, dec = _chain([*model.encoder.body, model.encoder.head]), _chain(model.decoder.body)
    return (enc, dec) if enc is not None and dec is not None else None


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


class MLPStep:
    """trainer.TrainStep for plain MLP VAEs on the CPU, with the networks' gradients by hand (see the module)."""

    def __init__(self, model: VAE, optimizer: torch.optim.Optimizer, batch: Callable[[Tensor], Tensor],
                 free_bits: float = 0.0):
        layers = _layers(model)
        if layers is None:
            raise ValueError("MLPStep needs a VAE with vaelab's MLP encoder and decoder (see MLPStep.applies)")
        self.model, self.optimizer, self.batch, self.free_bits = model, optimizer, batch, free_bits
        self.enc, self.dec = layers
        self.own = list(model.likelihood.parameters())  # a learned σ: its gradient comes from autograd

    @staticmethod
    def applies(model: nn.Module, device: torch.device, autocast: bool) -> bool:
        return (device.type == "cpu" and not autocast and _layers(model) is not None
                and all(p.requires_grad for p in model.parameters())
                and not has_module_hooks(model))

    def __call__(self, idx: Tensor, beta: float) -> Tensor:
        x = self.batch(idx)  # (B, C, H, W)
        loss = self.loss_and_grads(x, beta)
        self.optimizer.step()
        return loss

    def loss_and_grads(self, x: Tensor, beta: float) -> Tensor:
        """objective(model(x), beta, free_bits) (a 0-dim tensor), with every parameter's .grad set to its
        gradient (replacing what was there, like zero_grad(set_to_none=True) then backward)."""
        model, enc, dec, free_bits = self.model, self.enc, self.dec, self.free_bits
        n, latent = x.shape[0], model.latent_dim
        with torch.no_grad():
            e, enc_inputs = _forward(enc, x.reshape(n, -1))  # (B, 2L)
            q = DiagonalGaussian(e[:, :latent], e[:, latent:])  # (B, L) each
            eps = q.noise()
            std, z = q.std, q.reparameterize(eps)  # the draw model(x) makes
            out, dec_inputs = _forward(dec, z)  # (B, K*C*H*W)
            kl = q.kl_per_dim()  # (B, L)
        c, h, w = model.decoder.shape
        with torch.enable_grad():  # d rec / d (decoder output, likelihood parameters), rec = mean −log p(x|z)
            out.requires_grad_()
            k = model.decoder.n_params
            params = list(out.view(n, -1, h, w).split(c, dim=1)) if k > 1 else [out.view(n, c, h, w)]  # (B, C, H, W)
            rec = -model.likelihood.log_prob(params, x)  # (B,)
            g_out, *g_own = torch.autograd.grad(rec.mean(), [out, *self.own])
        with torch.no_grad():
            loss = objective(Terms(rec.detach(), kl, None, None), beta, free_bits)
            # d loss / d KL_bd = β/B, zero for a dimension whose batch-mean KL is clamped up to free_bits
            coef = beta / n if free_bits <= 0 else (beta / n) * (kl.mean(0) >= free_bits).to(kl.dtype)  # (L,)
            dec_grads, g_z = _backward(dec, dec_inputs, g_out, need_input_grad=True)  # g_z (B, L)
            g_mean = g_z + coef * q.mean  # KL_bd = (μ² + e^v − 1 − v)/2, z = μ + e^{v/2}·ε
            g_logvar = g_z * eps * 0.5 * std + coef * 0.5 * (torch.exp(q.logvar) - 1.0)
            enc_grads, _ = _backward(enc, enc_inputs, torch.cat([g_mean, g_logvar], dim=1), need_input_grad=False)
        for (weight, bias), (g_w, g_b) in zip(enc + dec, enc_grads + dec_grads, strict=True):
            weight.grad, bias.grad = g_w, g_b
        for p, g in zip(self.own, g_own, strict=True):
            p.grad = g
        return loss
