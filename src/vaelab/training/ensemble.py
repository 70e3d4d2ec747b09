"""Many runs, one step: runs whose networks have the same shapes train together as one batched ensemble.

Each member is a run of its own, as `vaelab train` would make it: its own VAE, optimizer, RNG streams (the seed
of its initialisation and of z's noise, its shuffling generator), metrics, checkpoint and run directory. Only
the networks' arithmetic is shared: the members' weights are stacked, and the encoder and decoder run once for
all of them: the MLP's as one torch.baddbmm over the stacked weights per Linear layer instead of one matmul per
member (vaelab.training.stacked), the conv net's as one grouped convolution per layer (stacked_conv); any other
network trains alone. Everything after the networks is each member's own model and objective:

    mean, logvar = encoder(W_enc, x)                         # (M, B, L) each
    z = q.reparameterize(eps)                                # (M, B, L), eps from each member's own stream
    params = decoder(W_dec, z)                               # (M, B, C, H, W) per decoder output
    out_m = VAE.forward(member m, replaying its slices)      # its likelihood (its σ), its prior, its KL
    loss_m = objective_m(out_m, Batch(B, beta_m))            # vaelab.models.objective, as every step calls it
    sum_m loss_m.total .backward();  each member's guard and optimizer step

The members' losses are independent, so the gradient of their sum is each member's own gradient: a member
equals the run trained alone up to float rounding (the batched matmuls may round differently). What may
differ among members is FREE: σ (fixed values), β, seed, learning rate, free bits and KL warm-up.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import TrainConfig
from ..data import ImageData, load_dataset
from ..models.nets import make_nets
from ..models.objective import Batch, Objective
from ..models.vae import VAE, DiagonalGaussian, Terms
from ..runs import Run
from . import stacked, stacked_conv
from .budget import Budget
from .build import make_objective_for, resolve_device
from .distributed import SINGLE
from .schedule import LRSchedule, make_schedule
from .step import Guard, Guards, apply_update, decide
from .stopping import NONFINITE_STOP, nonfinite_message
from .trainer import PROGRESS_EVERY, RunState, beta_at, save_epoch, setup_run

FREE = ("sigma", "beta", "seed", "lr", "free_bits", "kl_warmup")  # settings members may differ in
WHERE = ("out", "name")  # where each member is written: its own
# settings whose every value the ensemble reproduces exactly; any other setting must be at its default
HANDLED = {"dataset", "data_dir", "limit", "binarize", "image_size", "center_crop", "background", "skip_bad_images",
           "arch", "hidden", "blocks", "latent_dim", "likelihood", "mixtures", "objective", "optimizer",
           "batch_size", "epochs", "device", "cuda_graph", "tensorboard", "data_shape", "skip_threshold",
           "clip_threshold", "lr_schedule", "lr_warmup", "lr_final", *FREE,
           *WHERE}


_PASSES = (stacked, stacked_conv)  # the batched passes of the networks: each has stackable, encode and decode
NOMINAL_SHAPE = (1, 28, 28)  # the images whose networks say what a config's are made of, before its data is read


def _pass(encoder: torch.nn.Module, decoder: torch.nn.Module) -> Any:
    """The batched pass that reproduces these networks (a module of _PASSES), or None."""
    return next((p for p in _PASSES if p.stackable(encoder, decoder)), None)


@functools.lru_cache(maxsize=64)
def _stackable(arch: str, shape: tuple[int, ...], hidden: tuple[int, ...], latent_dim: int, blocks: int | None
               ) -> bool:
    """Whether the networks of these settings have a batched pass: built without memory (the meta device), as
    the model will build them."""
    with torch.device("meta"):
        encoder, decoder = make_nets(arch, typing.cast(tuple[int, int, int], shape), list(hidden), latent_dim, 1,
                                     blocks)
    return _pass(encoder, decoder) is not None


def _numeric(sigma: Any) -> bool:
    try:
        return math.isfinite(float(sigma))
    except (TypeError, ValueError):
        return False


def group_key(config: TrainConfig) -> tuple | None:
    """What members of one ensemble share (runs with equal keys train together); None: this run trains alone
    (a setting the ensemble does not reproduce: a network without a batched pass, such as the hierarchical one,
    dynamic binarization draws from the RNG inside the step, an objective with several draws of z, bf16, a
    TensorBoard log, or any setting away from its default that the ensemble does not know)."""
    s, default, m = config.settings(), TrainConfig().settings(), config.model
    if (config.data.binarize == "dynamic" or config.runtime.precision != "fp32" or config.runtime.tensorboard
            or m.arch not in ("mlp", "conv") or config.optim.objective != "elbo"):
        return None
    shape = tuple(m.data_shape) if m.data_shape else NOMINAL_SHAPE
    if not _stackable(m.arch, shape, tuple(m.hidden or ()), m.latent_dim, m.blocks):  # None: the arch's default
        return None
    if any(s[k] != default.get(k) for k in s if k not in HANDLED and k != "precision"):
        return None
    kind = "fixed" if _numeric(s["sigma"]) else s["sigma"]  # fixed values may differ; learned ones are a kind
    return (*(repr(v) for k, v in sorted(s.items()) if k not in FREE and k not in WHERE), kind)


def groups(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """The indices of `configs` by ensemble: runs that can share a step together (in order), the others alone."""
    by_key: dict[tuple, list[int]] = {}
    alone = []
    for i, c in enumerate(configs):
        key = group_key(c)
        if key is None:
            alone.append([i])
        else:
            by_key.setdefault(key, []).append(i)
    return sorted([*by_key.values(), *alone])


class _Replay:
    """One member seen through VAE.forward: its own likelihood, prior and latent size, with the encoder's and
    decoder's outputs taken from the ensemble's batched pass (`z` is the member's z, recomputed by VAE.terms
    from the same mean, log-variance and noise, so the decoder's outputs are its own)."""

    terms, observe = VAE.terms, VAE.observe  # what VAE.forward calls for one draw of z, and what terms calls

    def __init__(self, model: VAE, mean: Tensor, logvar: Tensor, params: list[Tensor]):
        self.likelihood, self.prior, self.latent_dim = model.likelihood, model.prior, model.latent_dim
        self._q, self._params = DiagonalGaussian(mean, logvar), params

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self._q

    def decode(self, z: Tensor) -> list[Tensor]:
        return self._params


@dataclass
class _Member:
    state: RunState
    objective: Objective
    guard: Guard
    noise: torch.Generator  # the global stream of the run alone: its z's noise
    shuffle: torch.Generator
    schedule: LRSchedule | None  # the learning rate's, if it changes
    error: str | None = None


def share_weights(nets: list[torch.nn.Module]) -> dict[str, Tensor]:
    """One tensor (M, ...) per weight of the members' networks `nets` (one each, of the same shapes), holding
    every member's: each member's parameter becomes the view of its slice (in its own layout), so its own
    optimizer updates the stack in place and the batched pass reads the stack without copying the weights at
    every step."""
    named = [dict(net.named_parameters()) for net in nets]
    stacks = {}
    for k in named[0]:
        w = stacked.stack_like([n[k].detach() for n in named]).requires_grad_()  # each slice in its member's layout
        for i, n in enumerate(named):
            n[k].data = w.data[i]  # the same Parameter object (its optimizer holds it), now a slice of the stack
        stacks[k] = w
    return stacks


@dataclass
class _Shared:
    """What the members' step shares: the batched pass of their networks (a module of _PASSES, chosen once),
    their stacked networks, their guards' counts (9, M) and rules, one Adam update over the stacks
    where their optimizers allow it (stacked.SharedAdam; None: each steps its own), and each member's trainable
    parameters outside the networks (a learned σ), whose gradients its guard counts as a run alone counts them."""

    net_pass: Any
    encoder: dict[str, Tensor]
    decoder: dict[str, Tensor]
    stats: Tensor
    guards: Guards  # the members' rules (the same for all; --grad-clip is not one an ensemble takes)
    adam: stacked.SharedAdam | None
    others: list[list[torch.nn.Parameter]]

    @property
    def stacks(self) -> list[Tensor]:
        return [*self.encoder.values(), *self.decoder.values()]


def share(members: list[_Member]) -> _Shared:
    """Stacks the members' networks (share_weights) and guard counts, each member's own parameters and counts
    becoming views of the stacks, and, where it applies, their Adam updates (stacked.SharedAdam)."""
    encoder = share_weights([m.state.model.encoder for m in members])
    decoder = share_weights([m.state.model.decoder for m in members])
    stats = torch.stack([m.guard.stats for m in members], dim=1)  # (9, M)
    for k, m in enumerate(members):
        m.guard.stats = stats[:, k]
    params = [[*m.state.model.encoder.parameters(), *m.state.model.decoder.parameters()] for m in members]
    optimizers = [m.state.optimizer for m in members]
    adam = (stacked.SharedAdam([*encoder.values(), *decoder.values()], optimizers, params)
            if stacked.SharedAdam.applies(optimizers, params) else None)
    others = [[p for p in m.guard.params if all(p is not q for q in ps)] for m, ps in zip(members, params,
                                                                                         strict=True)]
    template = members[0].state.model
    net_pass = _pass(template.encoder, template.decoder)
    assert net_pass is not None, "group_key admits networks with a batched pass only"
    return _Shared(net_pass, encoder, decoder, stats, Guards.of(members[0].state.config.optim), adam, others)


def _networks(template: VAE, shared: _Shared, xs: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Every member's encoder and decoder on its own batch, in one batched pass over the stacked weights
    (vaelab.training.stacked, stacked_conv): mean, log-variance (M, B, L) and the decoder's outputs, each
    (M, B, C, H, W)."""
    mean, logvar = shared.net_pass.encode(template.encoder, shared.encoder, xs)
    z = DiagonalGaussian(mean, logvar).reparameterize(eps)  # (M, B, L)
    return mean, logvar, shared.net_pass.decode(template.decoder, shared.decoder, z)


def _step(members: list[_Member], template: VAE, shared: _Shared, idx: list[Tensor], betas: list[float]) -> Tensor:
    """One optimisation step of every member on its own batch; returns the members' objectives, (M,)."""
    xs = torch.stack([m.state.prep.prepare_train(m.state.prep.batches(i)) for m, i in zip(members, idx,
                                                                                          strict=True)])
    latent = template.latent_dim
    eps = torch.stack([torch.randn((len(i), latent), generator=m.noise, device=xs.device)
                       for m, i in zip(members, idx, strict=True)])  # (M, B, L), as each run draws it alone
    mean, logvar, params = _networks(template, shared, xs, eps)
    totals = []
    # unbind, not indexing: the gradient of the M views is one stack, not M zero-filled (M, ...) tensors
    means, logvars, outs = mean.unbind(0), logvar.unbind(0), [p.unbind(0) for p in params]
    for k, m in enumerate(members):
        replay = _Replay(m.state.model, means[k], logvars[k], [p[k] for p in outs])
        out: Terms = VAE.forward(typing.cast(VAE, replay), xs[k], eps[k])
        totals.append(m.objective(out, Batch(len(idx[k]), betas[k])).total)
    for w in shared.stacks:
        w.grad = None
    total = torch.stack(totals)  # (M,)
    total.sum().backward()
    _update(members, shared, total.detach())
    return total.detach()


def _update(members: list[_Member], shared: _Shared, total: Tensor) -> None:
    """Each member's guard (non-finite steps and, past --skip-threshold, too large ones skipped and counted, as a
    run alone does) and optimizer update: one Adam update over the stacks for the members whose update is taken
    (stacked.SharedAdam), else each member's own optimizer on its slice of the stacks' gradients."""
    grads = [w.grad for w in shared.stacks]
    if any(g is None for g in grads):
        raise RuntimeError("a stacked weight got no gradient")  # every layer is on the path to every loss
    norms = stacked.member_norms(typing.cast(list[Tensor], grads))  # (M,)
    if any(shared.others):  # parameters outside the networks (a learned σ) count in each member's norm
        extra = torch.stack([torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])
                             for ps in shared.others])
        norms = torch.linalg.vector_norm(torch.stack([norms, extra.to(norms.dtype)]), dim=0)
    norms = norms.float()
    finite = torch.isfinite(norms) & torch.isfinite(total)
    skip, scale = decide(shared.stats, norms, finite, shared.guards)  # (M,) each (scale None: no clipping)
    if scale is not None:  # each member's gradient divided by its own scale, as its run alone divides it
        for stacked_grad in typing.cast(list[Tensor], grads):
            stacked_grad.div_(scale.to(stacked_grad.dtype).view(-1, *[1] * (stacked_grad.dim() - 1)))
        for ps, c in zip(shared.others, scale, strict=True):
            for p in ps:
                if p.grad is not None:
                    p.grad.div_(c)
    if shared.adam is not None:
        shared.adam.step((~skip).tolist())
        return
    for k, m in enumerate(members):
        own = [p for part in ("encoder", "decoder") for p in getattr(m.state.model, part).parameters()]
        for p, g in zip(own, grads, strict=True):
            p.grad = typing.cast(Tensor, g)[k]  # (...): this member's slice of the stack's gradient
        apply_update(m.state.optimizer, skip[k], None, [p.grad for p in own if p.grad is not None])
        m.state.optimizer.zero_grad(set_to_none=True)


def _start(configs: list[TrainConfig], data: ImageData | None, device: torch.device) -> list[_Member]:
    """Each member set up as the trainer sets up a run alone, from its own seed (its initialisation draws)."""
    if data is None:
        d = configs[0].data
        data = load_dataset(d.dataset, d.data_dir, image_size=d.image_size, center_crop=d.center_crop,
                            background=d.background, skip_bad_images=d.skip_bad_images)
    members = []
    for config in configs:
        assert config.runtime.out is not None, "each member has its own run directory"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.optim.seed)
            shuffle = torch.Generator().manual_seed(config.optim.seed)
            state = setup_run(config, Path(config.runtime.out), device, data, False, shuffle, False, SINGLE)
            noise = torch.Generator(device=device)
            noise.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        objective = make_objective_for(state.config, dataset_size=state.prep.train.shape[0])
        members.append(_Member(state, objective, Guard(state.model.parameters()), noise, shuffle,
                               make_schedule(state.config.optim, state.optimizer)))
    return members


def train_ensemble(configs: Sequence[TrainConfig], progress: bool = True, data: ImageData | None = None
                   ) -> list[Run | str]:
    """Train runs that share a group_key as one ensemble; each is written to its own --out as a run alone would
    be. Returns, per config, its Run, or the message of its failure (a non-finite loss stops that member only)."""
    configs = list(configs)
    if len({group_key(c) for c in configs}) != 1 or group_key(configs[0]) is None:
        raise ValueError("train_ensemble needs runs of one ensemble (equal group_key)")
    device = resolve_device(configs[0].runtime.device)
    members = _start(configs, data, device)
    template = members[0].state.model
    c0 = members[0].state.config
    n, batch = members[0].state.prep.train.shape[0], c0.batch_size
    steps = math.ceil(n / batch)
    for epoch in range(c0.optim.epochs):
        alive = [m for m in members if m.error is None]
        if not alive:
            break
        shared = share(alive)
        t0 = time.perf_counter()
        orders = []
        for m in alive:
            m.state.model.train()
            order = torch.randperm(n, generator=m.shuffle).to(device)
            m.state.prep.batches.plan(order)
            orders.append(order)
        for step in range(steps):
            idx = [o[step * batch:(step + 1) * batch] for o in orders]
            betas = [beta_at(m.state.config, epoch + step / steps) for m in alive]
            for m in alive:
                if m.schedule is not None:
                    m.schedule(epoch, step, steps)
            _step(alive, template, shared, idx, betas)
            if (step + 1) % PROGRESS_EVERY == 0 or step == steps - 1:
                _drop_diverged(alive, epoch, step)
        seconds = time.perf_counter() - t0
        for m in alive:
            if m.error is None:
                _end_epoch(m, seconds)
        if progress:
            print(f"ensemble of {len(members)}: epoch {epoch + 1}/{c0.optim.epochs}, {seconds:.1f}s",
                  file=sys.stderr)
    return [m.error if m.error is not None else _run(m) for m in members]


def _drop_diverged(alive: list[_Member], epoch: int, step: int) -> None:
    """Stop a member as the trainer stops a run alone: when its last steps were all non-finite (its guard skipped
    their updates, so its weights themselves give a non-finite loss); the others go on."""
    for m in alive:
        _, streak, _ = m.guard.peek()
        if m.error is None and streak >= min(NONFINITE_STOP, step + 1):
            m.error = nonfinite_message(m.state.config, m.state.model, epoch, step, streak)


def _end_epoch(m: _Member, seconds: float) -> None:
    """Metrics, weights and checkpoint of one member after an epoch: the trainer's own end of an epoch, with the
    RNG states a run alone saves (its global stream, the noise of z; its shuffling)."""
    s = m.state
    counts = m.guard.take()
    s.epoch += 1
    rng = ({"cpu": m.noise.get_state()} if m.noise.device.type == "cpu" else
           {"cpu": torch.get_rng_state(), "cuda": m.noise.get_state()})
    checkpoint = ({"epoch": s.epoch, "step": 0, "world_size": 1}, {**rng, "shuffle": m.shuffle.get_state()},
                  {"guard": {"stats": m.guard.stats.clone()}})
    save_epoch(s, m.objective, None, s.epoch, False, {**counts, "seconds": seconds}, SINGLE,
                Budget(None, PROGRESS_EVERY), False, checkpoint)


def _run(m: _Member) -> Run:
    m.state.model.eval()
    return Run(m.state.out, m.state.config, m.state.model, m.state.metrics)


__all__ = ["FREE", "group_key", "groups", "train_ensemble"]
