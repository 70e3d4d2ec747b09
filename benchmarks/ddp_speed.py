"""Training throughput with 1 and 2 processes: samples per second of `vaelab train` alone and under torchrun.

The model is the 784-400-20 MLP VAE (Bernoulli likelihood, batch 128 global, Adam 1e-3) on the first --limit
Fashion-MNIST training images (300 test images, to keep the per-epoch evaluation short). Every process uses one
thread (OMP_NUM_THREADS=1, --threads 1), so W processes use W cores; on a CPU the processes talk over gloo.

Series, run in turns (one of each per round, so that all see the same mix of machine states on a shared machine):
  single   `python -m vaelab train`: one process, the single-process training step
  W=1      `torchrun --nproc-per-node 1 -m vaelab train`: the same step under the launcher
  W=2      `torchrun --nproc-per-node 2 -m vaelab train`: DistributedDataParallel, each process 64 rows a step
Samples/s of an epoch = training images / the `seconds` of its train row in metrics.jsonl (the training loop's
wall time, not the evaluation or the checkpoint). The first epoch of a run is left out (warm-up); medians over
the rest of all rounds. The last line is machine-readable.

    python benchmarks/ddp_speed.py                    # 3 rounds of 3 epochs on 10,000 images (several minutes)
    python benchmarks/ddp_speed.py --device cuda      # on GPUs: NCCL, one GPU per process (needs 2 GPUs for W=2)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vaelab.data import load_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(series: str, train_args: list[str]) -> list[str]:
    if series == "single":
        return [sys.executable, "-m", "vaelab", "train", *train_args]
    nproc = series.split("=")[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0", "-m", "vaelab", "train",
            *train_args]


def run(series: str, data: Path, out: Path, args) -> list[float]:
    train_args = ["--dataset", str(data), "--likelihood", "bernoulli", "--hidden", "400", "--latent-dim", "20",
                  "--batch-size", "128", "--epochs", str(args.epochs), "--device", args.device, "--threads", "1",
                  "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(command(series, train_args), capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{series} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [args.limit / r["seconds"] for r in rows if r["split"] == "train"][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=10000, help="training images (default 10000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is left out (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each series (default 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is left out)")
    series = ["single", "W=1", "W=2"]
    speeds: dict[str, list[float]] = {s: [] for s in series}
    with tempfile.TemporaryDirectory() as tmp:
        fashion = load_dataset("fashion-mnist")
        data = Path(tmp) / "fashion.npz"
        np.savez(data, x_train=fashion.train[:args.limit], x_test=fashion.test[:300])
        for i in range(args.rounds):
            for s in series:
                speeds[s] += run(s, data, Path(tmp) / f"{s.replace('=', '')}-{i}", args)
                print(f"round {i + 1}/{args.rounds} {s}: {', '.join(f'{v:.0f}' for v in speeds[s][-args.epochs + 1:])}"
                      " samples/s", file=sys.stderr)
    med = {s: statistics.median(v) for s, v in speeds.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {args.device}; "
          f"{args.limit} images, batch 128, 784-400-20 Bernoulli MLP, 1 thread per process")
    for s in series:
        print(f"{s:>7}: {med[s]:8.0f} samples/s (median of {len(speeds[s])} epochs; "
              f"min {min(speeds[s]):.0f}, max {max(speeds[s]):.0f})")
    print(f"W=1 under torchrun / single process: {med['W=1'] / med['single']:.2f}x; "
          f"W=2 / W=1: {med['W=2'] / med['W=1']:.2f}x")
    print(json.dumps({"samples_per_s": med, "w2_over_w1": med["W=2"] / med["W=1"],
                      "w1_over_single": med["W=1"] / med["single"]}))


if __name__ == "__main__":
    main()
