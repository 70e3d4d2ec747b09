"""What the CPU training step costs, per step, on a machine too busy for epoch timings.

The model of benchmarks/train_speed.py (784-400-20 MLP VAE, Bernoulli likelihood, batch 128, Adam 1e-3, on
Fashion-MNIST's training images), trained by steps that compute the same update:

    vaelab    vaelab.training.step.Step with the ELBO (vaelab.models.objective), built by
              vaelab.training.build.make_step: exactly what `vaelab train` runs on a CPU
    plain     the same, with the Bernoulli log-density as the plain expression Σ x·l − softplus(l), so that
              autograd differentiates it, not its closed form (vaelab.models.likelihoods.BernoulliLogProb)
    compiled  the model's forward and the objective as one torch.compile'd function, then backward and the
              same Adam step (omitted with a note where torch.compile fails here; --no-compile skips it)
    unguarded vaelab's step with the optimizer's plain update in place of its guard (no gradient norm, no
              non-finite check, no counts): what the guard costs

The steps take turns in blocks of 25 steps, each on its own model and optimizer; every block is timed by the
CPU time of the timing thread (time.thread_time), which counts the work done and not the time spent waiting for
a core, so other jobs on the machine move it far less than wall time. Torch runs on that one thread. Medians over
the blocks, and each step's ratio to `vaelab`.

    python benchmarks/step_speed.py              # 60 blocks per step (about a minute, after the compile)
    python benchmarks/step_speed.py --blocks 20  # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab import TrainConfig
from vaelab.data import load_dataset, prepare_data
from vaelab.models.objective import Batch, Objective
from vaelab.models.vae import VAE
from vaelab.training.build import make_objective_for, make_optimizer, make_step

BATCH, HIDDEN, LATENT, BLOCK = 128, 400, 20, 25
CPU = torch.device("cpu")


def plain_bernoulli_log_prob(self, params, x):
    """Bernoulli.log_prob as the plain expression, for autograd to differentiate."""
    logits = params[0]  # (B, C, H, W)
    return (x * logits).sum(dim=(-3, -2, -1)) - F.softplus(logits).sum(dim=(-3, -2, -1))  # (B,)


def compiled_step(model: VAE, optimizer: torch.optim.Optimizer, objective: Objective,
                  batch: Callable[[Tensor], Tensor]) -> Callable[[Tensor, float], Tensor]:
    """Step's update with the forward pass and the objective compiled into one graph by torch.compile."""

    def loss_of(x: Tensor, beta: float) -> Tensor:
        return objective(model(x), Batch(x.shape[0], beta)).total

    loss_fn = torch.compile(loss_of)

    def step(idx: Tensor, beta: float) -> Tensor:
        loss = loss_fn(batch(idx), beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60, help="timed blocks of 25 steps per step kind (default 60)")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST is (default: vaelab's lookup)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile series")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1; got {args.blocks}")
    torch.set_num_threads(1)
    cfg = TrainConfig(dataset="fashion-mnist", data_dir=args.data_dir, likelihood="bernoulli", hidden=[HIDDEN],
                      latent_dim=LATENT, batch_size=BATCH, device="cpu")
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Bernoulli-on-grey-pixels warning: this times steps, not models
        prep = prepare_data(cfg, CPU, data, binary_only=True)
    n = prep.train.shape[0]

    def build(kind: str) -> Callable[[Tensor, float], Tensor]:
        torch.manual_seed(cfg.optim.seed)
        model = VAE.from_config(cfg, data.shape)
        optimizer = make_optimizer(cfg, model)
        objective = make_objective_for(cfg)
        if kind == "compiled":
            return compiled_step(model, optimizer, objective, lambda idx: prep.prepare_train(prep.batches(idx)))
        if kind == "plain":
            model.likelihood.log_prob = types.MethodType(plain_bernoulli_log_prob, model.likelihood)
        step = make_step(cfg, model, optimizer, objective, prep, CPU)
        if kind == "unguarded":
            step.guard = lambda opt, loss: opt.step()  # type: ignore[assignment, method-assign]
        return step

    steps = {kind: build(kind) for kind in ("vaelab", "plain", "unguarded")}
    if not args.no_compile:
        try:
            step = build("compiled")
            t0 = time.perf_counter()
            step(torch.arange(BATCH), 1.0).item()  # compiles here, outside the timed blocks
            steps["compiled"] = step
            print(f"torch.compile: {time.perf_counter() - t0:.0f} s to compile the compiled series", flush=True)
        except Exception as e:  # any failure of the compiler stack only drops its series
            print(f"torch.compile failed here, so the compiled series is skipped: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
    print(f"torch {torch.__version__}, 1 thread; {BLOCK} steps of {BATCH} per block, {args.blocks} blocks each",
          flush=True)
    shuffle = torch.Generator().manual_seed(0)
    ms: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(args.blocks + 1):  # the first round warms up and is not counted
        for kind, run in steps.items():
            idx = torch.randperm(n, generator=shuffle)[:BLOCK * BATCH]
            t0 = time.thread_time()
            for i in range(BLOCK):
                loss = run(idx[i * BATCH:(i + 1) * BATCH], 1.0)
            loss.item()
            ms[kind].append((time.thread_time() - t0) / BLOCK * 1e3)
    base = statistics.median(ms["vaelab"][1:])
    for kind, values in ms.items():
        v = values[1:]
        med = statistics.median(v)
        print(f"{kind:10s} {med:7.3f} ms/step (CPU time; quartiles {np.percentile(v, 25):.3f} .. "
              f"{np.percentile(v, 75):.3f}), {med / base:.3f}x vaelab")


if __name__ == "__main__":
    main()
