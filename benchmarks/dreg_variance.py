"""How much lower is DReG's encoder-gradient variance than the IWAE bound's own, on a trained run?

The first 100 test images of the run, K draws per image; each estimator's gradient of the encoder's weights is
computed 20 times, with the same draws for both. Prints the variance summed over the encoder's weights and the
median signal-to-noise ratio |mean| / sd over the weights.

    python benchmarks/dreg_variance.py runs/standard           # K = 5 and 50
"""

from __future__ import annotations

import argparse

import torch

from vaelab import load_run
from vaelab.analysis.metrics import split_data
from vaelab.models.objective import IWAE, Batch, ObjectiveSettings


def encoder_gradients(model, x: torch.Tensor, k: int, grad: str, repeats: int) -> torch.Tensor:
    """(repeats, P): the encoder's gradient of the bound's estimator `grad`, one row per set of draws."""
    gen = torch.Generator().manual_seed(0)  # the same draws for every estimator
    objective = IWAE(ObjectiveSettings(iw_train=k, iw_grad=grad))
    rows = []
    for _ in range(repeats):
        eps = torch.randn(k, len(x), model.latent_dim, generator=gen)
        model.zero_grad(set_to_none=True)
        objective(model(x, eps, samples=k), Batch(len(x))).total.backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]).double())
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--draws", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    s = split_data(run.config, "test", torch.device("cpu"), 100)
    x = s.prepare(s.x)
    for k in args.draws:
        g = {grad: encoder_gradients(run.model, x, k, grad, args.repeats) for grad in ("standard", "dreg")}
        var = {name: t.var(0).sum().item() for name, t in g.items()}
        snr = {name: (t.mean(0).abs() / t.std(0).clamp_min(1e-30)).median().item() for name, t in g.items()}
        print(f"K = {k}: encoder gradient variance standard {var['standard']:.4g}, dreg {var['dreg']:.4g} "
              f"(x{var['standard'] / var['dreg']:.1f} lower); median |mean|/sd standard {snr['standard']:.3f}, "
              f"dreg {snr['dreg']:.3f}")


if __name__ == "__main__":
    main()
