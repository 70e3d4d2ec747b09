"""What vaelab's training step costs the hierarchical VAE, against the same network in a plain PyTorch loop.

The default `--arch hierarchical` model (width 64, 1 block, 1 group per resolution, 20 channels per group) with
the discretized logistic likelihood, batch 32, Adam 1e-3, on a data set's training images (Fashion-MNIST unless
--dataset says otherwise):

    vaelab   vaelab.training.build.make_step: what `vaelab train` runs on a CPU (the ELBO objective, the guards)
    plain    the same model and optimizer in a hand-written loop: loss = (rec + KL).mean(), backward, Adam step
    v2       the design of runs saved with net_version 2 (the full width at every size) through make_step
    conv     the default `--arch conv` model through make_step, for scale (per image: it trains at batch 64)

The kinds take turns in blocks of 10 steps; each block is timed by the CPU time of the timing thread
(time.thread_time), which other jobs on the machine move far less than wall time. Torch runs on that one thread.
Medians over the blocks; the ratio of each to `plain` per image.

    python benchmarks/hier_speed.py              # 15 blocks per kind (a few minutes on a busy machine)
    python benchmarks/hier_speed.py --blocks 5   # a quick look
    python benchmarks/hier_speed.py --dataset shapes --blocks 8                                      # 64x64 RGB
    python benchmarks/hier_speed.py --dataset ~/.cache/vaelab-test-images/twemoji-64 --image-size 32  # 32x32 RGB
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vaelab import TrainConfig
from vaelab.data import load_dataset, prepare_data
from vaelab.models.nets import n_parameters
from vaelab.models.vae import VAE
from vaelab.training.build import make_objective_for, make_optimizer, make_step

BLOCK = 10
CPU = torch.device("cpu")
KINDS = {"vaelab": ("hierarchical", {}), "plain": ("hierarchical", {}), "v2": ("hierarchical", {"net_version": 2}),
         "conv": ("conv", {})}


def plain_step(model: VAE, optimizer: torch.optim.Optimizer, batch: Callable[[Tensor], Tensor]):
    def step(idx: Tensor, beta: float) -> Tensor:
        out = model(batch(idx))
        loss = (out.rec + beta * out.kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=15, help="timed blocks of 10 steps per kind (default 15)")
    p.add_argument("--dataset", default="fashion-mnist", help="a data set name or image folder (default "
                   "fashion-mnist)")
    p.add_argument("--image-size", default=None, help="image folders: the size to resize to, as vaelab train's")
    p.add_argument("--data-dir", default=None, help="where the data set is (default: vaelab's lookup)")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1; got {args.blocks}")
    torch.set_num_threads(1)
    configs = {kind: TrainConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                                 arch=arch, likelihood="discretized-logistic", device="cpu", **extra)
               for kind, (arch, extra) in KINDS.items()}
    data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    preps = {kind: prepare_data(cfg, CPU, data) for kind, cfg in configs.items()}

    def build(kind: str):
        cfg, prep = configs[kind], preps[kind]
        torch.manual_seed(cfg.optim.seed)
        model = VAE.from_config(cfg, data.shape)
        optimizer = make_optimizer(cfg, model)
        if kind == "plain":
            return plain_step(model, optimizer, lambda idx: prep.prepare_train(prep.batches(idx))), model
        return make_step(cfg, model, optimizer, make_objective_for(cfg), prep, CPU), model

    steps = {kind: build(kind) for kind in configs}
    for kind, (_, model) in steps.items():
        print(f"{kind:7s} {type(model).__name__}, {n_parameters(model):,} parameters, batch "
              f"{configs[kind].batch_size}", flush=True)
    print(f"{args.dataset} {'x'.join(map(str, data.shape))}; torch {torch.__version__}, 1 thread; {BLOCK} steps "
          f"per block, {args.blocks} blocks each", flush=True)
    n = preps["plain"].train.shape[0]
    shuffle = torch.Generator().manual_seed(0)
    per_image: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(args.blocks + 1):  # the first round warms up and is not counted
        for kind, (run, _) in steps.items():
            b = configs[kind].batch_size
            idx = torch.randperm(n, generator=shuffle)[:BLOCK * b]
            t0 = time.thread_time()
            for i in range(BLOCK):
                loss = run(idx[i * b:(i + 1) * b], 1.0)
            loss.item()
            per_image[kind].append((time.thread_time() - t0) / (BLOCK * b) * 1e3)
    base = statistics.median(per_image["plain"][1:])
    for kind, values in per_image.items():
        v = values[1:]
        med = statistics.median(v)
        print(f"{kind:7s} {med:7.3f} ms/image (CPU time; quartiles {np.percentile(v, 25):.3f} .. "
              f"{np.percentile(v, 75):.3f}), {med / base:.3f}x plain")


if __name__ == "__main__":
    main()
