"""What vaelab's training step costs the hierarchical VAE, against the same network in a plain PyTorch loop.

The default `--arch hierarchical` model (width 64, 1 block, 1 group per resolution, 20 channels per group) with
the discretized logistic likelihood, batch 32, Adam 1e-3, on a data set's training images (Fashion-MNIST unless
--dataset says otherwise):

    vaelab   vaelab.training.build.make_step: what `vaelab train` runs on a CPU (the ELBO objective, the guards)
    plain    the same model and optimizer in a hand-written loop: loss = (rec + KL).mean(), backward, Adam step
    v2       the design of runs saved with net_version 2 (the full width at every size) through make_step
    conv     the default `--arch conv` model through make_step, for scale (per image: it trains at batch 64)
    groupsN  with --groups N/...: the default model with N latent groups per resolution through make_step
    groupsA-B-C-D  with --groups A,B,C,D/...: A groups at 1x1, B at the next resolution, ... (vaelab train's
             --groups A,B,C,D)

The kinds take turns in blocks of 10 steps; each block is timed by the CPU time of the timing thread
(time.thread_time), which other jobs on the machine move far less than wall time. Torch runs on that one thread.
Medians over the blocks; the ratio of each to `plain` per image.

--precision fp32,bf16 times every kind at each precision listed, all taking turns in the same rounds: bf16 runs
the forward pass under torch.autocast(bfloat16) as `vaelab train --precision bf16` does (the plain loop under the
same autocast), so each bf16 kind is compared with `plain` in bf16, and each kind in bf16 with itself in fp32
(the ratio of the medians, and the median of the ratios within each round: below 1 is faster).

    python benchmarks/hier_speed.py              # 15 blocks per kind (a few minutes on a busy machine)
    python benchmarks/hier_speed.py --blocks 5   # a quick look
    python benchmarks/hier_speed.py --dataset shapes --blocks 8                                      # 64x64 RGB
    python benchmarks/hier_speed.py --dataset ~/.cache/vaelab-test-images/twemoji-64 --image-size 32  # 32x32 RGB
    python benchmarks/hier_speed.py --precision fp32,bf16 --blocks 8                   # bf16 against fp32
    python benchmarks/hier_speed.py --groups 2/3 --blocks 8                     # more groups per resolution
    python benchmarks/hier_speed.py --groups 2/1,2,4,1 --blocks 8               # ... or a count per resolution
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import Tensor

from vaelab import TrainConfig
from vaelab.data import load_dataset, prepare_data
from vaelab.models.nets import n_parameters
from vaelab.models.vae import VAE
from vaelab.training.build import autocast, check_precision, make_objective_for, make_optimizer, make_step

BLOCK = 10
CPU = torch.device("cpu")
KINDS = {"vaelab": ("hierarchical", {}), "plain": ("hierarchical", {}), "v2": ("hierarchical", {"net_version": 2}),
         "conv": ("conv", {"batch_size": 64})}
PRECISIONS = ("fp32", "bf16")


def plain_step(model: VAE, optimizer: torch.optim.Optimizer, batch: Callable[[Tensor], Tensor],
               precision: Callable[[], AbstractContextManager] = contextlib.nullcontext):
    def step(idx: Tensor, beta: float) -> Tensor:
        x = batch(idx)
        with precision():
            out = model(x)
        loss = (out.rec + beta * out.kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def label(kind: str, precision: str) -> str:
    """How a kind is printed: its name in fp32 (the lines of a run without --precision), `name bf16` in bf16."""
    return kind if precision == "fp32" else f"{kind} {precision}"


def parse_precisions(text: str) -> list[str]:
    """--precision's comma-separated list, in order, each once; an error names the bad value."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in PRECISIONS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--precision must list each of {', '.join(PRECISIONS)} at most once, comma-separated; "
                         f"got {text!r}")
    return names


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=15, help="timed blocks of 10 steps per kind (default 15)")
    p.add_argument("--dataset", default="fashion-mnist", help="a data set name or image folder (default "
                   "fashion-mnist)")
    p.add_argument("--image-size", default=None, help="image folders: the size to resize to, as vaelab train's")
    p.add_argument("--data-dir", default=None, help="where the data set is (default: vaelab's lookup)")
    p.add_argument("--precision", default="fp32", help="comma-separated precisions to time each kind at, as "
                   "vaelab train's --precision: fp32, bf16 or fp32,bf16 (default fp32)")
    p.add_argument("--groups", default="", help="also time the default model with these latent groups per "
                   "resolution, '/'-separated, each as vaelab train's --groups: a count (kind groups2) or one per "
                   "resolution (1,2,4,1: kind groups1-2-4-1)")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1; got {args.blocks}")
    try:
        args.precisions = parse_precisions(args.precision)
        args.group_counts = parse_groups(args.groups)
    except ValueError as e:
        p.error(str(e))
    return args


def parse_groups(text: str) -> list[int | list[int]]:
    """--groups' '/'-separated settings, each an integer >= 2 (1 is the default model, timed as `vaelab`) or a
    comma-separated count per resolution."""
    specs = [[c.strip() for c in t.split(",")] for t in text.split("/") if t.strip()]
    ok = all(all(c.isdigit() and int(c) >= 1 for c in s) and (len(s) > 1 or int(s[0]) >= 2) for s in specs)
    counts = [[int(c) for c in s] for s in specs] if ok else []
    if not ok or len({tuple(c) for c in counts}) != len(counts):
        raise ValueError("--groups must list settings, each once, '/'-separated: an integer >= 2 or one count per "
                         f"resolution such as 1,2,4,1; got {text!r}")
    return [c[0] if len(c) == 1 else c for c in counts]


def group_kind(groups: int | list[int]) -> str:
    """The kind's name: groups2, groups1-2-4-1."""
    return "groups" + (str(groups) if isinstance(groups, int) else "-".join(map(str, groups)))


def report(per_image: dict[tuple[str, str], list[float]], precisions: list[str]) -> list[str]:
    """The result lines: each kind at each precision against `plain` at that precision, then bf16 against fp32."""
    width = max(7, *(len(label(*key)) for key in per_image))
    med = {key: statistics.median(v) for key, v in per_image.items()}
    lines = [f"{label(kind, prec):{width}s} {med[kind, prec]:7.3f} ms/image (CPU time; quartiles "
             f"{np.percentile(v, 25):.3f} .. {np.percentile(v, 75):.3f}), {med[kind, prec] / med['plain', prec]:.3f}x "
             "plain" for (kind, prec), v in per_image.items()]
    if len(precisions) > 1:
        first, *rest = precisions
        for prec in rest:
            for kind in dict.fromkeys(k for k, _ in per_image):
                rounds = [a / b for a, b in zip(per_image[kind, prec], per_image[kind, first], strict=True)]
                lines.append(f"{kind:7s} {prec}/{first} {med[kind, prec] / med[kind, first]:.3f}x the time per image "
                             f"(per round: median {statistics.median(rounds):.3f}, quartiles "
                             f"{np.percentile(rounds, 25):.3f} .. {np.percentile(rounds, 75):.3f})")
    return lines


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    kinds = {**KINDS, **{group_kind(g): ("hierarchical", {"groups": g}) for g in args.group_counts}}
    configs = {kind: TrainConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                                 arch=arch, likelihood="discretized-logistic", device="cpu", **extra)
               for kind, (arch, extra) in kinds.items()}
    data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    preps = {kind: prepare_data(cfg, CPU, data) for kind, cfg in configs.items()}

    def build(kind: str, precision: str):
        cfg, prep = configs[kind].replace(precision=precision), preps[kind]
        check_precision(cfg, CPU)  # warns where the CPU has no native bfloat16 matmul
        torch.manual_seed(cfg.optim.seed)
        model = VAE.from_config(cfg, data.shape)
        optimizer = make_optimizer(cfg, model)
        if kind == "plain":
            return plain_step(model, optimizer, lambda idx: prep.prepare_train(prep.batches(idx)),
                              autocast(cfg, CPU)), model
        return make_step(cfg, model, optimizer, make_objective_for(cfg), prep, CPU), model

    steps = {(kind, prec): build(kind, prec) for prec in args.precisions for kind in configs}
    for kind in configs:
        model = steps[kind, args.precisions[0]][1]
        print(f"{kind:7s} {type(model).__name__}, {n_parameters(model):,} parameters, batch "
              f"{configs[kind].batch_size}", flush=True)
    print(f"{args.dataset} {'x'.join(map(str, data.shape))}; torch {torch.__version__}, 1 thread; {BLOCK} steps "
          f"per block, {args.blocks} blocks each", flush=True)
    if args.precisions != ["fp32"]:
        print(f"precisions {', '.join(args.precisions)}: bf16 is torch.autocast(cpu, bfloat16) around the forward "
              "pass, as vaelab train --precision bf16", flush=True)
    n = preps["plain"].train.shape[0]
    shuffle = torch.Generator().manual_seed(0)
    per_image: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.blocks + 1):  # the first round warms up and is not counted
        for (kind, prec), (run, _) in steps.items():
            b = configs[kind].batch_size
            idx = torch.randperm(n, generator=shuffle)[:BLOCK * b]
            t0 = time.thread_time()
            for i in range(BLOCK):
                loss = run(idx[i * b:(i + 1) * b], 1.0)
            loss.item()
            per_image[kind, prec].append((time.thread_time() - t0) / (BLOCK * b) * 1e3)
    for line in report({key: values[1:] for key, values in per_image.items()}, args.precisions):
        print(line)


if __name__ == "__main__":
    main()
