"""What does a smaller batch cost per image? vaelab's training step at several batch sizes, on a CPU.

For one architecture with its defaults (the default conv VAE unless --arch says otherwise) on a data set's
training images (`shapes`, 64x64 RGB, unless --dataset says otherwise), it builds vaelab's training step (the one
`vaelab train` runs: batch gather, forward, backward, guard, Adam) once per batch size from the same initial
weights, and times them in turns: each block trains IMAGES images at every batch size (IMAGES / b steps), so
every batch size sees the same mix of machine states. The numbers are CPU time of this thread per training image,
one torch thread, medians over the blocks (the first block warms up and is not counted), and each batch size's
time over the largest one's, the median over the blocks of the ratio within a block. The last line is JSON.

    python benchmarks/batch_speed.py                              # conv, shapes, batches 16, 32, 64
    python benchmarks/batch_speed.py --batch-sizes 8,16,64,128 --blocks 20
    python benchmarks/batch_speed.py --arch hierarchical --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vaelab import TrainConfig
from vaelab.data import load_dataset, prepare_data
from vaelab.models.vae import VAE
from vaelab.training.build import make_objective_for, make_optimizer, make_step

IMAGES = 128  # training images per batch size in each block
CPU = torch.device("cpu")


def parse_sizes(text: str) -> list[int]:
    """--batch-sizes: positive integers that divide IMAGES, comma-separated, each once."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or len(set(sizes)) != len(sizes) or any(b < 1 or IMAGES % b for b in sizes):
        raise ValueError(f"--batch-sizes must list distinct divisors of {IMAGES} (1, 2, 4, ..., {IMAGES}), "
                         f"comma-separated; got {text!r}")
    return sizes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="conv", choices=("mlp", "conv", "hierarchical"))
    p.add_argument("--dataset", default="shapes", help="a data set name or image folder (default shapes)")
    p.add_argument("--batch-sizes", default="16,32,64", help="comma-separated (default 16,32,64)")
    p.add_argument("--blocks", type=int, default=12, help="timed blocks (default 12)")
    args = p.parse_args(argv)
    try:
        sizes = parse_sizes(args.batch_sizes)
    except ValueError as e:
        p.error(str(e))
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1; got {args.blocks}")
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, None)
    steps = {}
    for b in sizes:
        cfg = TrainConfig(dataset=args.dataset, arch=args.arch, batch_size=b, device="cpu")
        torch.manual_seed(cfg.optim.seed)  # the same initial weights at every batch size
        model = VAE.from_config(cfg, data.shape)
        steps[b] = make_step(cfg, model, make_optimizer(cfg, model), make_objective_for(cfg),
                             prepare_data(cfg, CPU, data), CPU)
    print(f"{args.arch} on {args.dataset} {'x'.join(map(str, data.shape))}, vaelab's training step; torch "
          f"{torch.__version__}, 1 thread; {IMAGES} images per batch size per block, {args.blocks} blocks",
          flush=True)
    n = len(data.train)
    shuffle = torch.Generator().manual_seed(0)
    per_image: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(args.blocks + 1):
        idx = torch.randperm(n, generator=shuffle)[:IMAGES]
        for b, run in steps.items():
            t0 = time.thread_time()
            for i in range(0, IMAGES, b):
                loss = run(idx[i:i + b], 1.0)
            loss.item()
            per_image[b].append((time.thread_time() - t0) / IMAGES * 1e3)
    per_image = {b: v[1:] for b, v in per_image.items()}
    top = max(sizes)
    result = {}
    for b, v in per_image.items():
        ratio = statistics.median(a / c for a, c in zip(v, per_image[top], strict=True))
        result[b] = {"ms_per_image": round(statistics.median(v), 3), f"vs_batch_{top}": round(ratio, 3)}
        print(f"batch {b:4d}: {statistics.median(v):7.3f} ms/image (CPU time), {ratio:.3f}x batch {top}'s")
    print(json.dumps({"arch": args.arch, "dataset": args.dataset, "batches": result}))


if __name__ == "__main__":
    main()
