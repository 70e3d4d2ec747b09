"""How long does a sweep over σ take: its runs one after another, or as one batched ensemble?

One process, one machine: the 784-400-20 MLP VAE with a Gaussian likelihood (fixed σ), batch 128, Adam 1e-3,
on the first --limit Fashion-MNIST training images for --epochs epochs (each epoch's evaluation, which is not
timed, on the first 1000 test images). Each round times, in turn:

1. one: one run (σ = 0.1) trained alone with vaelab.train, as `vaelab train` trains it;
2. sequential: the 8 σ settings of --sigmas, trained one after another with vaelab.train, as `vaelab sweep` does;
3. batched: the same 8 as one batched ensemble (vaelab.training.ensemble.train_ensemble, `vaelab sweep
   --batched`): one stacked forward and backward pass for all 8, each member's own objective and optimizer.

Seconds are training seconds: the `seconds` field of each epoch's train row in metrics.jsonl (the training loop's
wall time, without the per-epoch evaluation and checkpoint), summed over epochs; sequential sums its 8 runs,
batched takes the ensemble's loop (every member records it). The series take turns within each round, so on a
shared machine they see the same mix of its states; medians over the rounds. Each batched member's test −ELBO
is checked against its sequential twin (they agree up to float rounding). Each round also times the floor of an
8-model step on this machine: the stacked matrix multiplies of its forward and backward passes (4 forward, 4
weight-gradient, 3 input-gradient, each one torch.bmm/baddbmm over the 8 models) and one fused Adam update of the
8 models' weights, for as many steps as an epoch, with nothing else; no sweep of 8 of these networks can train
faster on one core. The last line is machine-readable: one_s=... sequential_s=... batched_s=... floor_s=...

With --arch conv the runs are the default conv VAE instead (--hidden 32, one residual block per stage, latent 20;
its batched pass is one grouped convolution per layer for all members), and there is no floor (floor_s=nan).

    python benchmarks/sweep_speed.py              # 5 rounds, 6,400 images, 1 epoch, 1 thread (2-4 minutes)
    python benchmarks/sweep_speed.py --rounds 7 --limit 60000 --threads 0
    python benchmarks/sweep_speed.py --arch conv --sigmas 0.05,0.1,0.3,1 --limit 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vaelab import TrainConfig, train
from vaelab.data import load_dataset
from vaelab.runs import Run
from vaelab.training.ensemble import train_ensemble

SIGMAS = "0.03,0.05,0.1,0.2,0.3,0.5,0.7,1"
HIDDEN, LATENT, BATCH = 400, 20, 128
TEST_IMAGES = 1000  # each epoch's evaluation (untimed) on the first 1000 test images, to keep the script short


def train_seconds(run: Run) -> float:
    return sum(r["seconds"] for r in run.metrics if r["split"] == "train")


def test_loss(run: Run) -> float:
    return [r for r in run.metrics if r["split"] == "test"][-1]["loss"]


def floor_seconds(steps: int, members: int) -> float:
    """The stacked matmuls of `steps` forward and backward passes of `members` 784-400-20 MLP VAEs and their
    fused Adam updates, nothing else (random data: the arithmetic does not depend on the values)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [(784, HIDDEN), (HIDDEN, 2 * LATENT), (LATENT, HIDDEN), (HIDDEN, 784)]  # (in, out) per layer
    weights = [torch.randn(members, o, i, generator=gen) * 0.01 for i, o in sizes]
    biases = [torch.zeros(members, o) for _, o in sizes]
    inputs = [torch.randn(members, BATCH, i, generator=gen) for i, _ in sizes]
    outs = [torch.randn(members, BATCH, o, generator=gen) for _, o in sizes]
    params = [*weights, *biases]
    adam = torch.optim.Adam(params, lr=1e-3, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    t0 = time.perf_counter()
    for _ in range(steps):
        for layer, (w, b, h, g) in enumerate(zip(weights, biases, inputs, outs, strict=True)):
            torch.baddbmm(b.unsqueeze(1), h, w.mT)  # forward (M, B, out)
            torch.bmm(g.mT, h, out=w.grad)  # weight gradient (M, out, in)
            if layer:  # the first layer's input (the images) needs no gradient
                torch.bmm(g, w)  # input gradient (M, B, in)
        adam.step()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="paired rounds (>= 5; default 5)")
    p.add_argument("--limit", type=int, default=6400, help="training images (default 6400: 50 steps)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every run (default 1)")
    p.add_argument("--sigmas", default=SIGMAS, help=f"the fixed σ of the sweep (default {SIGMAS})")
    p.add_argument("--arch", choices=("mlp", "conv"), default="mlp", help="the network of every run (default mlp: "
                   f"784-{HIDDEN}-{LATENT}; conv: the default conv net)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier on a shared "
                   "machine; 0 leaves torch's choice)")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error(f"--rounds must be >= 5; got {args.rounds}")
    sigmas = [s.strip() for s in args.sigmas.split(",") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    data = dataclasses.replace(data, test=data.test[:TEST_IMAGES], test_labels=None)  # evaluation is not timed
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}; {len(sigmas)} σ, "
          f"{args.limit} images x {args.epochs} epoch(s), {math.ceil(args.limit / BATCH)} steps of {BATCH} per "
          "epoch", flush=True)
    base = TrainConfig(dataset="fashion-mnist", likelihood="gaussian", arch=args.arch,
                       hidden=[HIDDEN] if args.arch == "mlp" else None, latent_dim=LATENT, batch_size=BATCH,
                       limit=args.limit, epochs=args.epochs, device="cpu")
    one, seq, bat, floor, worst = [], [], [], [], 0.0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            root = Path(tmp) / f"round{r}"
            configs = [base.replace(sigma=s, out=str(root / f"seq-{s}")) for s in sigmas]
            one.append(train_seconds(train(base.replace(sigma="0.1", out=str(root / "one")), False, data)))
            alone = [train(c, progress=False, data=data) for c in configs]
            seq.append(sum(train_seconds(run) for run in alone))
            members = train_ensemble([c.replace(out=str(root / f"bat-{s}")) for c, s in zip(configs, sigmas,
                                                                                          strict=True)],
                                     progress=False, data=data)
            runs = [m for m in members if isinstance(m, Run)]
            if len(runs) != len(members):
                sys.exit(f"a member of the ensemble failed: {[m for m in members if not isinstance(m, Run)]}")
            bat.append(train_seconds(runs[0]))
            worst = max(worst, *(abs(test_loss(a) - test_loss(b)) / abs(test_loss(a))
                                 for a, b in zip(alone, runs, strict=True)))
            floor.append(floor_seconds(args.epochs * math.ceil(args.limit / BATCH), len(sigmas))
                         if args.arch == "mlp" else math.nan)
            print(f"round {r + 1}/{args.rounds}: one {one[-1]:.2f} s, sequential {seq[-1]:.2f} s, batched "
                  f"{bat[-1]:.2f} s, floor {floor[-1]:.2f} s", flush=True)
    one_s, seq_s, bat_s, floor_s = (statistics.median(v) for v in (one, seq, bat, floor))
    print(f"\nsequential / batched = {seq_s / bat_s:.2f}; batched / one = {bat_s / one_s:.2f} "
          f"({len(sigmas)} runs for the time of {bat_s / one_s:.1f}); largest relative gap in test −ELBO between a "
          f"batched member and its run alone: {worst:.1e}; batched / floor = {bat_s / floor_s:.2f}, sequential / "
          f"floor = {seq_s / floor_s:.2f}; {time.perf_counter() - t_start:.0f} s in all")
    print(f"one_s={one_s:.3f} sequential_s={seq_s:.3f} batched_s={bat_s:.3f} floor_s={floor_s:.3f}")


if __name__ == "__main__":
    main()
