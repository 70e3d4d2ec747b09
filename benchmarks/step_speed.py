"""What each piece of the CPU training step is worth, per step, on a machine too busy for epoch timings.

The model of benchmarks/train_speed.py (784-400-20 MLP VAE, Bernoulli likelihood, batch 128, Adam 1e-3, on
Fashion-MNIST's training images), trained by three steps that compute the same update:

    handwritten  vaelab.training.fused.MLPStep: the networks' gradients by hand (what `vaelab train` runs on a CPU)
    autograd     vaelab.training.trainer.TrainStep: objective, backward, optimizer step (--no-handwritten-grads)
    plain        TrainStep with the Bernoulli log-density as the plain expression Σ x·l − softplus(l), so that
                 autograd differentiates it, not its closed form (vaelab.models.likelihoods.BernoulliLogProb)

The steps take turns in blocks of 25 steps, each on its own model and optimizer; every block is timed by the
CPU time of the timing thread (time.thread_time), which counts the work done and not the time spent waiting for
a core, so other jobs on the machine move it far less than wall time. Torch runs on that one thread. Medians over
the blocks, and each step's ratio to `handwritten`.

    python benchmarks/step_speed.py              # 60 blocks per step (about a minute on an idle machine)
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from vaelab import TrainConfig
from vaelab.data import load_dataset, to_unit
from vaelab.models.vae import VAE
from vaelab.training.fused import MLPStep
from vaelab.training.trainer import TrainStep, make_optimizer

BATCH, HIDDEN, LATENT, BLOCK = 128, 400, 20, 25


def plain_bernoulli_log_prob(self, params, x):
    logits = params[0]
    return (x * logits).sum(dim=(-3, -2, -1)) - F.softplus(logits).sum(dim=(-3, -2, -1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60, help="timed blocks of 25 steps per step kind (default 60)")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST is (default: vaelab's lookup)")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1; got {args.blocks}")
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist", args.data_dir)
    train = torch.from_numpy(np.ascontiguousarray(data.train))  # (N, 1, 28, 28) uint8

    def batch(idx):
        return to_unit(train.index_select(0, idx))

    def step(kind: str):
        torch.manual_seed(0)
        cfg = TrainConfig(likelihood="bernoulli", hidden=[HIDDEN], latent_dim=LATENT, batch_size=BATCH)
        model = VAE.from_config(cfg, data.shape)
        optimizer = make_optimizer(cfg, model)
        if kind == "handwritten":
            return MLPStep(model, optimizer, batch)
        if kind == "plain":
            model.likelihood.log_prob = types.MethodType(plain_bernoulli_log_prob, model.likelihood)
        return TrainStep(model, optimizer, batch)

    steps = {kind: step(kind) for kind in ("handwritten", "autograd", "plain")}
    print(f"torch {torch.__version__}, 1 thread; {BLOCK} steps of {BATCH} per block, {args.blocks} blocks each",
          flush=True)
    shuffle = torch.Generator().manual_seed(0)
    ms: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(args.blocks + 1):  # the first round warms up and is not counted
        for kind, run in steps.items():
            idx = torch.randperm(train.shape[0], generator=shuffle)[:BLOCK * BATCH]
            t0 = time.thread_time()
            for i in range(BLOCK):
                loss = run(idx[i * BATCH:(i + 1) * BATCH], 1.0)
            loss.item()
            ms[kind].append((time.thread_time() - t0) / BLOCK * 1e3)
    base = statistics.median(ms["handwritten"][1:])
    for kind, values in ms.items():
        v = values[1:]
        med = statistics.median(v)
        print(f"{kind:12s} {med:7.3f} ms/step (CPU time; quartiles {np.percentile(v, 25):.3f} .. "
              f"{np.percentile(v, 75):.3f}), {med / base:.3f}x handwritten")


if __name__ == "__main__":
    main()
