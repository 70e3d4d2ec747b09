"""evaluate.py: the numbers of `vaelab eval`, checked on constructed inputs with known answers and on a
trained 2-D Gaussian Fashion-MNIST run against a by-hand computation from its saved weights."""

import gzip
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trained_runs import trained_run
from vaelab import load_run
from vaelab.analysis.metrics import (
    active_units,
    evaluate_run,
    iwae_log_px,
    knn_agreement,
    radius_share,
    sharpness,
)
from vaelab.cli import format_table

N_EVAL = 1000  # test images the run is evaluated on


# ------------------------------------------------------------------------------ constructed inputs
def test_active_units_counts_dimensions_whose_mean_varies_more_than_001():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.2, 0.05, 0.0])  # variances 1, 0.04, 0.0025, 0
    codes = torch.randn(20000, 4, generator=g) * scales + torch.tensor([3.0, -1.0, 0.5, 2.0])
    count, var = active_units(codes)
    assert count == 2
    assert var == pytest.approx([1.0, 0.04, 0.0025, 0.0], rel=0.05, abs=1e-9)


def test_radius_share_counts_codes_within_each_radius_inclusive():
    g = torch.Generator().manual_seed(1)
    directions = torch.eye(5, dtype=torch.float64)[[0, 1, 2, 3, 4, 0]]  # unit vectors: norms are exact
    directions[5] = torch.nn.functional.normalize(torch.randn(5, generator=g, dtype=torch.float64), dim=0)
    norms = torch.tensor([0.5, 1.0, 1.5, 2.5, 3.0, 3.5], dtype=torch.float64)
    share = radius_share(directions * norms[:, None])
    assert share == {"1": pytest.approx(2 / 6), "2": pytest.approx(3 / 6), "3": pytest.approx(5 / 6)}


def test_knn_agreement_on_clusters_with_known_label_mix():
    # Two far-apart clusters of exactly k + 1 = 11 codes: each code's 10 nearest others are its own cluster.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(11, 3, generator=g) * 0.1
    b = torch.randn(11, 3, generator=g) * 0.1 + 100.0
    codes = torch.cat([a, b])
    pure = torch.tensor([0] * 11 + [1] * 11)
    assert knn_agreement(codes, pure) == pytest.approx(1.0)
    # cluster a: 6 codes labelled 0 and 5 labelled 1 -> a 0 agrees with 5 of 10, a 1 with 4 of 10
    mixed = torch.tensor([0] * 6 + [1] * 5 + [2] * 11)
    expected = ((6 * 0.5 + 5 * 0.4) / 11 + 1.0) / 2
    assert knn_agreement(codes, mixed) == pytest.approx(expected)
    assert knn_agreement(codes, mixed, block=5) == pytest.approx(expected)  # blocking changes nothing
    assert knn_agreement(codes, None) is None


def test_knn_agreement_with_random_labels_is_chance():
    g = torch.Generator().manual_seed(3)
    codes, labels = torch.randn(3000, 2, generator=g), torch.randint(0, 4, (3000,), generator=g)
    assert knn_agreement(codes, labels) == pytest.approx(0.25, abs=0.02)


def test_sharpness_is_the_variance_of_the_laplacian():
    flat = torch.full((3, 1, 10, 12), 0.7)
    assert sharpness(flat) == pytest.approx(0.0, abs=1e-12)
    checker = ((torch.arange(10)[:, None] + torch.arange(12)[None, :]) % 2).float()
    # interior pixel v has four neighbours 1 - v: Laplacian 4 - 8v = ±4, in equal shares -> variance 16
    assert sharpness(checker.expand(2, 1, 10, 12)) == pytest.approx(16.0)
    # colour: channels averaged; a flat channel next to a checkerboard gives 8
    assert sharpness(torch.stack([checker, torch.zeros(10, 12)])[None]) == pytest.approx(8.0)
    # blurring lowers it
    blurred = torch.nn.functional.avg_pool2d(checker[None, None], 3, stride=1, padding=1)
    assert sharpness(blurred) < 16.0 / 10


# ------------------------------------------------------------------------------ a trained run
def _test_images(fashion_dir, n):
    """The first n Fashion-MNIST test images read straight from the IDX file, float64 in [0, 1], (n, 784)."""
    with gzip.open(next(fashion_dir.glob("t10k-images-idx3-ubyte*"))) as fh:
        raw = fh.read()
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)[:n] / 255.0)


class ByHand:
    """The run's MLP (784-128-2, one hidden layer) rebuilt from model.safetensors in float64, no vaelab code."""

    def __init__(self, path):
        self.w = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}

    def _lin(self, h, name):
        return h @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def encode(self, x):
        out = self._lin(torch.relu(self._lin(x, "encoder.body.1")), "encoder.head")
        return out[:, :2], out[:, 2:]  # mean, log-variance

    def decode(self, z):
        return self._lin(torch.relu(self._lin(z, "decoder.body.0")), "decoder.body.2")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def numbers(run_dir):
    return evaluate_run(load_run(run_dir), "test", iw_samples=200, batch_size=250, limit=N_EVAL)


def test_numbers_agree_with_a_by_hand_computation_from_the_saved_weights(run_dir, numbers, fashion_dir):
    x = _test_images(fashion_dir, N_EVAL)
    net, sigma, d = ByHand(run_dir), 0.1, 784
    mean, logvar = net.encode(x)
    kl_dims = 0.5 * (mean.square() + logvar.exp() - 1 - logvar)  # (N, 2), closed form
    assert numbers["kl"] == pytest.approx(kl_dims.sum(1).mean().item(), rel=1e-5)
    assert numbers["kl_per_dim"] == pytest.approx(kl_dims.mean(0).tolist(), rel=1e-5)

    # E_q[-log p(x|z)] with 32 draws per image; vaelab's single-draw estimate must agree within its noise
    g = torch.Generator().manual_seed(0)
    z = mean + (0.5 * logvar).exp() * torch.randn(32, *mean.shape, generator=g, dtype=torch.float64)
    sq = (x - net.decode(z)).square().sum(-1)  # (32, N)
    rec = d / 2 * math.log(2 * math.pi * sigma**2) + sq / (2 * sigma**2)
    noise = rec.std(0).square().mean().sqrt().item() / math.sqrt(N_EVAL)  # s.e. of a one-draw average
    assert -numbers["elbo"] == pytest.approx((rec.mean() + kl_dims.sum(1).mean()).item(), abs=4 * noise + 0.05)
    assert numbers["mse"] == pytest.approx(sq.mean().item() / d, rel=0.02)
    # vaelab's rec and mse come from the same z, so the Gaussian identity holds exactly
    assert numbers["rec"] == pytest.approx(d / 2 * math.log(2 * math.pi * sigma**2)
                                           + d * numbers["mse"] / (2 * sigma**2), rel=1e-5)
    assert numbers["sigma"] == pytest.approx(sigma)
    assert numbers["bits_per_dim"] == pytest.approx((-numbers["elbo"] + d * math.log(256)) / (d * math.log(2)))

    # latent geometry of the posterior means
    assert numbers["active_units"] == int((mean.var(0, unbiased=False) > 0.01).sum())
    norms = mean.norm(dim=1)
    assert numbers["radius_share"] == {r: pytest.approx((norms <= int(r)).double().mean().item(), abs=1.5e-3)
                                       for r in ("1", "2", "3")}
    labels = _test_labels(fashion_dir, N_EVAL)
    dist = np.linalg.norm(mean.numpy()[:, None] - mean.numpy()[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = np.argsort(dist, axis=1)[:, :10]
    assert numbers["knn_agreement"] == pytest.approx((labels[nearest] == labels[:, None]).mean(), abs=2e-3)

    # sharpness of the data and of f(posterior mean)
    def lap_var(img):  # (N, 784) -> mean over images of the variance of the 5-point Laplacian
        a = img.reshape(-1, 28, 28)
        lap = a[:, :-2, 1:-1] + a[:, 2:, 1:-1] + a[:, 1:-1, :-2] + a[:, 1:-1, 2:] - 4 * a[:, 1:-1, 1:-1]
        return lap.reshape(len(a), -1).var(1, unbiased=False).mean().item()

    assert numbers["sharpness"]["data"] == pytest.approx(lap_var(x), rel=1e-6)
    assert numbers["sharpness"]["recon"] == pytest.approx(lap_var(net.decode(mean).clamp(0, 1)), rel=1e-3)


def _test_labels(fashion_dir, n):
    with gzip.open(next(fashion_dir.glob("t10k-labels-idx1-ubyte*"))) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=8)[:n].astype(np.int64)


def test_iwae_is_at_least_the_elbo_and_grows_with_k(run_dir, numbers):
    run = load_run(run_dir)
    k1 = evaluate_run(run, "test", iw_samples=1, batch_size=250, limit=N_EVAL)
    k10 = evaluate_run(run, "test", iw_samples=10, batch_size=250, limit=N_EVAL)
    # K = 1 is the single-sample ELBO (log p(x|z) + log p(z) - log q(z|x) at one z): the same number up to
    # Monte-Carlo noise in the sampled KL, far below the bound's gap
    assert k1["log_px"] == pytest.approx(k1["elbo"], abs=0.5)
    gap = numbers["log_px"] - numbers["elbo"]
    assert gap > 1.0, "a 2-D Gaussian VAE with σ = 0.1 has a clear IWAE gap"
    assert k1["log_px"] < k10["log_px"] < numbers["log_px"]
    assert numbers["iw_samples"] == 200
    assert k10["iw_samples"] == 10
    assert numbers["bits_per_dim_log_px"] < numbers["bits_per_dim"]


def test_iwae_matches_a_by_hand_importance_sampler(run_dir, fashion_dir):
    x = _test_images(fashion_dir, 64)
    net, sigma, k = ByHand(run_dir), 0.1, 500
    mean, logvar = net.encode(x)
    std = (0.5 * logvar).exp()
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(k, *mean.shape, generator=g, dtype=torch.float64)
    z = mean + std * eps  # (K, N, 2)
    log_px_z = -(x - net.decode(z)).square().sum(-1) / (2 * sigma**2) - 784 * math.log(sigma * math.sqrt(2 * math.pi))
    log_pz = -0.5 * z.square().sum(-1) - math.log(2 * math.pi)
    log_qz = -0.5 * eps.square().sum(-1) - logvar.sum(-1) / 2 - math.log(2 * math.pi)
    by_hand = torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k)  # (N,)
    torch.manual_seed(0)
    ours = iwae_log_px(load_run(run_dir).model.double(), x.view(-1, 1, 28, 28), k, 16, lambda t: t)
    # two independent K = 500 estimates of the same bound: per image within a few nats, on average close
    assert (ours - by_hand).abs().mean().item() < 1.0
    assert ours.mean().item() == pytest.approx(by_hand.mean().item(), abs=0.5)


def test_iwae_memory_is_bounded_in_k_and_batching_does_not_matter(run_dir, fashion_dir):
    model = load_run(run_dir).model
    x = _test_images(fashion_dir, 8).float().view(-1, 1, 28, 28)
    torch.manual_seed(0)
    a = iwae_log_px(model, x, 5000, 8, lambda t: t)  # 5000 samples x 8 images, drawn in bounded chunks
    torch.manual_seed(1)
    b = iwae_log_px(model, x, 5000, 3, lambda t: t)
    assert torch.isfinite(a).all()
    # two independent K = 5000 estimates (different seeds, groups of 8 vs 3 images): equal up to MC noise
    assert (a - b).abs().mean().item() < 1.0
    assert (a - b).abs().max().item() < 4.0


def test_table_shows_every_number(numbers):
    table = format_table(numbers)
    for needle in ("ELBO", "log p(x), IWAE K=200", "bits/dim", "MSE", "σ in use", "active units",
                   "radius 1 / 2 / 3", "10-NN", "sharpness", f"{numbers['elbo']:.2f}", f"{numbers['log_px']:.2f}"):
        assert needle in table
