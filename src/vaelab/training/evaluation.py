"""What the trainer reports after each epoch: the negative ELBO and its parts on a split, in nats per image and
bits per dimension (the same numbers `vaelab eval` starts from), and the training objective where it differs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import StoredImages
from ..models.objective import Batch, Objective
from ..models.vae import VAE, Terms


def bits_per_dim(nats_per_image: float, n_pixels: int, continuous: bool) -> float:
    """Nats per image -> bits per dimension on the 8-bit scale.

    A continuous density on [0, 1]-scaled 8-bit pixels becomes a probability of the 256-level bin after a
    change of scale: log p_8bit = log p_[0,1] - D·log 256. A Bernoulli mass needs no such term.
    """
    nats = nats_per_image + (n_pixels * math.log(256.0) if continuous else 0.0)
    return nats / (n_pixels * math.log(2.0))


@dataclass(frozen=True)
class Scored:
    """The training objective to report beside the −ELBO, at KL weight `beta`."""

    objective: Objective
    beta: float = 1.0


EVAL_BYTES = 128 * 2**20  # the widest decoder activation of one evaluation pass on a CPU (64x that on a GPU):
# whole batches of 1000 for every MLP and conv decoder up to 64x64 (32 channels at 32x32: 128 KiB a row); a
# hierarchical decoder at 64x64 (16 channels at full size: 256 KiB a row) takes 512 images at a time


def widest_activation_bytes(decoder: torch.nn.Module, z: Tensor) -> int:
    """Bytes per row of the decoder's widest output among all its modules, from one pass on the row z (1, L)."""
    widest = 0

    def hook(_module, _inputs, out) -> None:
        nonlocal widest
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, Tensor):
                widest = max(widest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in decoder.modules()]
    try:
        with torch.no_grad():
            decoder(z)
    finally:
        for h in handles:
            h.remove()
    return widest


def rows_within(model: VAE, budget: int, device: torch.device) -> int:
    """The rows (images, or draws) whose widest decoder activation fits in `budget` bytes; at least 1."""
    dtype = next(model.parameters()).dtype
    row = widest_activation_bytes(model.decoder, torch.zeros(1, model.latent_dim, dtype=dtype, device=device))
    return max(1, budget // row)


def eval_rows(model: VAE, batch_size: int, device: torch.device) -> int:
    """Images per pass of an evaluation batch: the whole batch, unless its widest decoder activation would pass
    EVAL_BYTES (64x that on a GPU); then as many as fit."""
    return min(batch_size, rows_within(model, EVAL_BYTES * (1 if device.type == "cpu" else 64), device))


@torch.no_grad()
def elbo_metrics(model: VAE, x: Tensor | StoredImages, batch_size: int, prepare, seed: int = 0,
                 part: tuple[int, int] = (0, 1), reduce: Callable[[Tensor], Tensor] | None = None,
                 scored: Scored | None = None, rows: int | None = None) -> dict:
    """−ELBO (= rec + kl), rec, kl, bits/dim, per-pixel MSE and σ, averaged over the images of `x`, and the KL
    per latent dimension (None for a prior without a closed-form KL, whose KL is estimated at the z drawn); with
    `scored`, also the training objective (`objective`), the mean over the images at the same z as the ELBO's
    when it draws one per image, and the parts of it the objective reports (`objective_parts`, e.g. β-TCVAE's
    mi, tc and dwkl: each estimated on the evaluation's passes of `rows` images).

    `x` is the split as stored (uint8 or float, on the model's device); `prepare` maps a stored batch to
    model inputs in [0, 1]. One z is drawn per image (seeded, without touching the training RNG stream), the
    noise of each `batch_size` images at once; the model sees `rows` images at a time (default eval_rows: the
    decoder's memory), and the numbers do not depend on `rows` beyond rounding.
    `mse` uses the decoder mean at that same z, so for a shared-σ Gaussian
    rec = (D/2)·log(2πσ²) + D·mse/(2σ²) holds exactly for the reported numbers.
    Shared among processes: part=(rank, size) evaluates every size-th batch (the noise of every batch is drawn
    on each process, so each image gets the z it gets on one process) and `reduce` sums the totals across them.
    """
    was_training = model.training
    model.eval()
    n = x.shape[0]
    rank, size = part
    dtype = next(model.parameters()).dtype
    rows = eval_rows(model, batch_size, x.device) if rows is None else rows
    # rec, kl, sq, σ, #σ, objective, the objective's reported parts, kl_d
    named = scored.objective.reported if scored is not None else ()
    first = 6 + len(named)  # where kl_d starts
    totals = torch.zeros(first + model.latent_dim, dtype=torch.float64, device=x.device)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    # the objective's own draws (K per image) come from a generator of their own: the ELBO's z stay as they are
    draws = torch.Generator(device=x.device).manual_seed(seed + 1)
    k = scored.objective.samples if scored is not None else 1
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i, start in enumerate(range(0, n, batch_size)):
            xb = x[start:start + batch_size]
            eps = torch.randn((xb.shape[0], model.latent_dim), dtype=dtype, device=x.device)  # (B, L)
            if i % size != rank:
                continue
            k_eps = torch.randn((k, xb.shape[0], model.latent_dim), dtype=dtype, device=x.device,
                                generator=draws) if k > 1 else None  # (K, B, L)
            for s in range(0, xb.shape[0], rows):
                _add_batch(model, totals, prepare(xb[s:s + rows]), eps[s:s + rows], scored,
                           None if k_eps is None else k_eps[:, s:s + rows])
    model.train(was_training)
    if reduce is not None:
        reduce(totals)
    rec, kl, sq, sigma_sum, sigma_count, objective = (v / n for v in totals[:6].tolist())
    d = model.n_pixels
    out = {"loss": rec + kl, "rec": rec, "kl": kl,
           "bits_per_dim": bits_per_dim(rec + kl, d, model.likelihood.continuous),
           "mse": sq / d, "kl_per_dim": (totals[first:] / n).tolist() if model.prior.closed_form_kl else None}
    if sigma_count > 0:
        out["sigma"] = sigma_sum
    if scored is not None:
        out["objective"] = objective
        if named:
            out["objective_parts"] = dict(zip(named, (totals[6:first] / n).tolist(), strict=True))
    per_group = getattr(model, "per_group", None)  # a hierarchical model: the KL of each latent group, top first
    if per_group is not None:
        groups = per_group(totals[first:] / n)  # (G,) in closed form; a learned top prior's units are 0 there
        if out["kl_per_dim"] is None:
            groups[0] += kl - groups.sum()  # ... and its KL is the estimated rest
        out["kl_per_group"] = groups.tolist()
    return out


def _add_batch(model: VAE, totals: Tensor, xin: Tensor, eps: Tensor, scored: Scored | None,
               k_eps: Tensor | None) -> None:
    """Add the sums of one pass over the images xin (B, ...) at the noise eps (B, L) to `totals`."""
    first = totals.shape[0] - model.latent_dim
    t = model.terms(xin, eps=eps)
    assert t.sq_err is not None, "terms() with extras computes it"
    totals[:3] += torch.stack([t.rec.sum(), t.kl.sum(), t.sq_err.sum()]).double()
    if t.kl_per_dim is not None:  # a learned prior's KL is estimated at z (kl_estimate), not per dimension
        totals[first:] += t.kl_per_dim.sum(0).double()
    if t.sigma is not None:
        totals[3] += t.sigma.double().sum()
        totals[4] += t.sigma.shape[0]
    if scored is not None:
        totals[5:first] += _objective_sums(model, scored, xin, t, k_eps)


def _objective_sums(model: VAE, scored: Scored, x: Tensor, t: Terms, k_eps: Tensor | None) -> Tensor:
    """The objective and its reported parts, each summed over the batch x: on the ELBO's terms t, or on K fresh
    draws per image, whose noise is k_eps (K, B, L)."""
    if k_eps is not None:
        t = model(x, k_eps, samples=k_eps.shape[0])
    loss = scored.objective(t, Batch(x.shape[0], scored.beta))
    means = [loss.total, *(loss.parts[k] for k in scored.objective.reported)]
    return torch.stack(means).double() * x.shape[0]


# How a loss is printed, in training and evaluation alike: the −ELBO (and its parts) in nats per image, lower is
# better, with its bits/dim; NEGATIVE_NOTE once where such a number is below 0.
NEGATIVE_NOTE = ("−log p below 0 means a density above 1 per pixel on average, which a continuous density on "
                 "[0, 1] may have; bits/dim (8-bit scale, log 256 per pixel added) compare across models")


def loss_text(m: dict) -> str:
    """'−ELBO L nats/image = B bits/dim (rec R, KL K)' for a row of metrics (`loss` is the −ELBO)."""
    return (f"−ELBO {m['loss']:.2f} nats/image = {m['bits_per_dim']:.3f} bits/dim "
            f"(rec {m['rec']:.2f}, KL {m['kl']:.2f})")
