"""Does the default conv VAE train on `shapes` without falling over?

For each seed it trains `vaelab train --dataset shapes --arch conv --latent-dim 32 --limit N --epochs E --seed S`
(σ = 0.1, every other setting the default; extra flags after `--` are passed on) and reads the test MSE of every
epoch from metrics.jsonl. A run "falls over" when an epoch's test MSE is more than 20 % above the best epoch
before it; the script also reports the updates the step's guard skipped, the non-finite steps and the shape
10-NN agreement of the trained codes (the share of each test image's 10 nearest posterior means, among the
2000 test images, that show the same shape; chance 25 %, and only 34 % for the test images' own pixels, where
colour, place and background lie nearer than the outline) and the share of reconstructions that keep the shape
(the nearest of the four redraws of the image's factors; 100 % for the images themselves), and whether the
objects are in the reconstructions at all: the object error, the median over test images of the squared error
on the object's pixels over that of a flat image of the background's grey (1: background only, 0: exact). The
last line is machine-readable (JSON).

    python benchmarks/stability.py                          # 3 seeds, --limit 5000, 4 epochs (long on a CPU)
    python benchmarks/stability.py --limit 2000 --epochs 3  # shorter
    python benchmarks/stability.py -- --skip-threshold 4e5  # with extra training flags
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from vaelab import TrainConfig, train
from vaelab.analysis.factors import kept_count
from vaelab.analysis.metrics import knn_agreement, split_data
from vaelab.data.shapes import BACKGROUNDS, FACTORS, render
from vaelab.flags import add_setting_flags, given_settings

RISE = 1.2  # an epoch whose test MSE is above RISE x the best before it has fallen over


def falls(mse: list[float]) -> list[int]:
    """The epochs (1-based) whose test MSE is more than 20 % above the best epoch before them."""
    return [i + 1 for i in range(1, len(mse)) if mse[i] > RISE * min(mse[:i])]


@torch.no_grad()
def shape_agreement(run) -> float | None:
    """10-NN label agreement of the posterior means of the run's test images (labels: the shape)."""
    s = split_data(run.config, "test", next(run.model.parameters()).device)
    codes = torch.cat([run.model.encode(s.prepare(s.x[i:i + 500])).mean for i in range(0, len(s.x), 500)])
    return knn_agreement(codes, s.labels)


@torch.no_grad()
def reconstructions(run) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The test images (N, C, H, W) in [0, 1], their reconstructions f(posterior mean) and their factors."""
    s = split_data(run.config, "test", next(run.model.parameters()).device)
    assert s.factors is not None
    xs = [s.prepare(s.x[i:i + 500]) for i in range(0, len(s.x), 500)]
    recon = torch.cat([run.model.reconstruct(x).clamp(0, 1).cpu() for x in xs])
    return torch.cat(xs).cpu(), recon, np.asarray(s.factors)


def shape_kept(recon: torch.Tensor, factors: np.ndarray) -> float:
    """Share of the test images whose reconstruction is nearest to a redraw of their own shape among the four
    (the other factors as in the image; factors.read_label): 100 % for the images themselves, 25 % by chance."""
    return kept_count(recon, factors, render, np.unique(factors[:, 0])) / len(recon)


def object_error(x: torch.Tensor, recon: torch.Tensor, factors: np.ndarray) -> float:
    """Whether the objects are in the reconstructions at all: the median over the test images of the
    reconstruction's squared error on the object's pixels (those that differ from the image's background grey)
    over the error a flat image of that grey makes there. 1: no object (background only), 0: exact."""
    bg = torch.as_tensor(np.asarray(BACKGROUNDS, dtype=np.float32)[factors[:, FACTORS.index("background")]
                                                                    .astype(np.int64)])[:, None, None, None]
    on_object = ((x - bg).abs().amax(1, keepdim=True) > 2 / 255).float()  # (N, 1, H, W)
    ratio = ((recon - x).square() * on_object).flatten(1).sum(1) / ((bg - x).square() * on_object).flatten(1).sum(1)
    return float(ratio.median())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(own)
    q = argparse.ArgumentParser()
    add_setting_flags(q)
    settings = given_settings(q.parse_args(extra))
    out = Path(args.out or tempfile.mkdtemp(prefix="vaelab-stability-"))
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        config = TrainConfig(**{"dataset": "shapes", "arch": "conv", "latent_dim": 32, "limit": args.limit,
                                "epochs": args.epochs, "seed": seed, "out": str(out / f"seed{seed}"), **settings})
        run = train(config, progress=False)
        test = [r for r in run.metrics if r["split"] == "test"]
        trained = [r for r in run.metrics if r["split"] == "train"]
        mse = [r["mse"] for r in test]
        x, recon, factors = reconstructions(run)
        result = {"seed": seed, "test_mse": mse, "falls": falls(mse),
                  "skipped_updates": sum(r.get("skipped_updates", 0) for r in trained),
                  "nonfinite_steps": sum(r.get("nonfinite_steps", 0) for r in trained),
                  "grad_norm_max": max(r.get("grad_norm_max", 0.0) for r in trained),
                  "shape_knn": shape_agreement(run), "shape_kept": shape_kept(recon, factors),
                  "object_error": object_error(x, recon, factors)}
        print(f"seed {seed}: test MSE by epoch {', '.join(f'{v:.4f}' for v in mse)}; falls at epochs "
              f"{result['falls'] or 'none'}; {result['skipped_updates']} updates skipped, "
              f"{result['nonfinite_steps']} non-finite steps; shape 10-NN agreement {result['shape_knn']:.1%}, "
              f"shape kept in reconstructions {result['shape_kept']:.1%}, object error {result['object_error']:.2f} "
              "(1: background only, 0: exact)",
              flush=True)
        results.append(result)
    print(json.dumps({"limit": args.limit, "epochs": args.epochs, "extra": extra, "runs": results}))
    return 1 if any(r["falls"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
