"""Metrics on a trained model: the negative ELBO and its parts, in nats per image and bits per dimension."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .model import VAE


def bits_per_dim(nats_per_image: float, n_pixels: int, continuous: bool) -> float:
    """Nats per image -> bits per dimension on the 8-bit scale.

    A continuous density on [0, 1]-scaled 8-bit pixels becomes a probability of the 256-level bin after a
    change of scale: log p_8bit = log p_[0,1] - D·log 256. A Bernoulli mass needs no such term.
    """
    nats = nats_per_image + (n_pixels * math.log(256.0) if continuous else 0.0)
    return nats / (n_pixels * math.log(2.0))


@torch.no_grad()
def elbo_metrics(model: VAE, x: Tensor, batch_size: int, prepare, seed: int = 0) -> dict:
    """−ELBO (= rec + kl), rec, kl, bits/dim, per-pixel MSE and σ, averaged over the images of `x`.

    `x` is the split as stored (uint8 or float, on the model's device); `prepare` maps a stored batch to
    model inputs in [0, 1]. One z is drawn per image (seeded, without touching the training RNG stream);
    `mse` uses the decoder mean at that same z, so for a shared-σ Gaussian
    rec = (D/2)·log(2πσ²) + D·mse/(2σ²) holds exactly for the reported numbers.
    """
    was_training = model.training
    model.eval()
    n = x.shape[0]
    sigma_sum = None
    kl_dims = torch.zeros(model.latent_dim, dtype=torch.float64, device=x.device)
    acc = torch.zeros(3, dtype=torch.float64, device=x.device)  # rec, kl, squared error
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            t = model.terms(prepare(x[start:start + batch_size]))
            acc += torch.stack([t.rec.sum(), t.kl.sum(), t.sq_err.sum()]).double()
            kl_dims += t.kl_per_dim.sum(0).double()
            if t.sigma is not None:
                s = t.sigma.double().sum()
                sigma_sum = s if sigma_sum is None else sigma_sum + s
    model.train(was_training)
    rec, kl, sq = (v / n for v in acc.tolist())
    d = model.n_pixels
    out = {"loss": rec + kl, "rec": rec, "kl": kl,
           "bits_per_dim": bits_per_dim(rec + kl, d, model.likelihood.continuous),
           "mse": sq / d, "kl_per_dim": (kl_dims / n).tolist()}
    if sigma_sum is not None:
        out["sigma"] = sigma_sum.item() / n
    return out
