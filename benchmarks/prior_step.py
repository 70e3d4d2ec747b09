"""What does each prior (and DReG) cost per training step?

The default MLP (784-400-20), Gaussian σ = 0.1, batch 128 of random images, Adam; one step is the objective, its
gradients and the update, as `vaelab train` runs it. The rows take turns step by step, so all see the same mix of
machine states on a shared machine; the numbers are medians after the warm-up steps.

    python benchmarks/prior_step.py                 # 40 steps per row, one thread
    python benchmarks/prior_step.py --steps 100 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaelab.config import TrainConfig
from vaelab.models.objective import Batch, make_objective
from vaelab.models.vae import VAE

ROWS = [  # (label, settings)
    ("standard", {}),
    ("mog, K = 10", {"prior": "mog"}),
    ("vamp, K = 100", {"prior": "vamp"}),
    ("vamp, K = 500", {"prior": "vamp", "prior_components": 500}),
    ("iwae K = 5", {"objective": "iwae", "iw_train": 5}),
    ("iwae K = 5, dreg", {"objective": "iwae", "iw_train": 5, "iw_grad": "dreg"}),
]


def make_step(settings: dict):
    torch.manual_seed(0)
    config = TrainConfig(**settings)
    model = VAE.from_config(config, (1, 28, 28))
    optimizer = torch.optim.Adam(model.parameters(), config.lr)
    objective = make_objective(config.optim.objective, config.optim.objective_settings())

    def step(x: torch.Tensor) -> None:
        loss = objective(model(x, samples=objective.samples), Batch(len(x)))
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    steps = {label: make_step(settings) for label, settings in ROWS}
    times: dict[str, list[float]] = {label: [] for label, _ in ROWS}
    for i in range(args.warmup + args.steps):
        for label, step in steps.items():
            t = time.perf_counter()
            step(x)
            if i >= args.warmup:
                times[label].append(time.perf_counter() - t)
    for label, ts in times.items():
        print(f"{label:18s} {1000 * statistics.median(ts):7.1f} ms per step (median of {len(ts)})")


if __name__ == "__main__":
    main()
