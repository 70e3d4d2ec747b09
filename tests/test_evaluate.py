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
    prior_radii,
    prior_radius,
    radius_share,
    sharpness,
    table_rows,
)
from vaelab.cli import format_table
from vaelab.training.evaluation import NEGATIVE_NOTE

N_EVAL = 1000  # test images the run is evaluated on


# ------------------------------------------------------------------------------ constructed inputs
def test_active_units_counts_dimensions_whose_mean_varies_more_than_001():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.2, 0.05, 0.0])  # variances 1, 0.04, 0.0025, 0
    codes = torch.randn(20000, 4, generator=g) * scales + torch.tensor([3.0, -1.0, 0.5, 2.0])
    count, var = active_units(codes)
    assert count == 2
    assert var == pytest.approx([1.0, 0.04, 0.0025, 0.0], rel=0.05, abs=1e-9)


@pytest.mark.parametrize(("p", "dim", "expected"), [
    # one dimension: the two-sided normal quantiles; the 1σ / 2σ / 3σ masses give exactly 1, 2, 3
    (0.68, 1, 0.9944578832097530), (0.95, 1, 1.959963984540054), (0.997, 1, 2.967737925341777),
    (math.erf(1 / math.sqrt(2)), 1, 1.0), (math.erf(2 / math.sqrt(2)), 1, 2.0), (math.erf(3 / math.sqrt(2)), 1, 3.0),
    # two dimensions: the Rayleigh quantile sqrt(-2 ln(1 - p)); 99.7 % -> 3.41
    (0.68, 2, math.sqrt(-2 * math.log(0.32))), (0.997, 2, math.sqrt(-2 * math.log(0.003))),
    # 20 dimensions: sqrt of chi2.ppf(0.95, 20) = 31.410432844230918 (scipy), far from 1, 2, 3
    (0.95, 20, math.sqrt(31.410432844230918)),
])
def test_prior_radius_is_the_chi_quantile(p, dim, expected):
    assert prior_radius(p, dim) == pytest.approx(expected, rel=1e-9)


def test_prior_radius_rejects_what_is_not_a_probability_or_a_dimension():
    for p, dim, needle in ((0.0, 2, "p must be in \\(0, 1\\), got 0.0"), (1.5, 2, "got 1.5"),
                           (0.5, 0, "dim must be an integer >= 1, got 0"), (0.5, 2.0, "got 2.0")):
        with pytest.raises(ValueError, match=needle):
            prior_radius(p, dim)


@pytest.mark.parametrize("dim", [2, 20])
def test_radius_shares_of_prior_draws_are_the_prior_mass_in_any_dimension(dim):
    # fixed radii 1, 2, 3 would give 0 % in 20 dimensions; the prior's own radii give 68 / 95 / 99.7 %
    codes = torch.randn(40000, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
    share = radius_share(codes)
    se = {k: math.sqrt(p * (1 - p) / len(codes)) for k, p in (("68", 0.68), ("95", 0.95), ("99.7", 0.997))}
    assert share == {k: pytest.approx(float(k) / 100, abs=4 * se[k]) for k in ("68", "95", "99.7")}


def test_radius_share_counts_codes_within_each_radius_inclusive():
    g = torch.Generator().manual_seed(1)
    directions = torch.eye(5, dtype=torch.float64)[[0, 1, 2, 3, 4, 0]]  # unit vectors: norms are exact
    directions[5] = torch.nn.functional.normalize(torch.randn(5, generator=g, dtype=torch.float64), dim=0)
    norms = torch.tensor([0.5, 1.0, 1.5, 2.5, 3.0, 3.5], dtype=torch.float64)
    share = radius_share(directions * norms[:, None], {"a": 1.0, "b": 2.0, "c": 3.0})
    assert share == {"a": pytest.approx(2 / 6), "b": pytest.approx(3 / 6), "c": pytest.approx(5 / 6)}
    radii = prior_radii(5)  # 68 %: 2.42, 95 %: 3.33, 99.7 %: 4.24 in 5 dimensions
    assert radius_share(directions * norms[:, None]) == {"68": pytest.approx(3 / 6), "95": pytest.approx(5 / 6),
                                                         "99.7": pytest.approx(1.0)}
    assert radii["68"] == pytest.approx(2.42, abs=0.01)


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


def test_knn_agreement_over_a_single_class_is_none():
    # one class would agree 100 % whatever the codes: no score, as without labels
    codes = torch.randn(30, 2, generator=torch.Generator().manual_seed(4))
    assert knn_agreement(codes, torch.full((30,), 3)) is None
    assert knn_agreement(codes, np.zeros(30, dtype=np.int64)) is None
    # a second class, even of one code, makes it a score again: far from the others, that code is no one's
    # neighbour, so each of the 29 agrees with all its 10 and the lone code with none of its 10
    codes[29] = 100.0
    assert knn_agreement(codes, np.array([0] * 29 + [1])) == pytest.approx(290 / 300)


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
        # the head's raw log-variance, softly bounded to [-20, 4] by two softplus walls
        lo, hi, sp = -20.0, 4.0, torch.nn.functional.softplus
        return out[:, :2], hi - sp(hi - (lo + sp(out[:, 2:] - lo)))  # mean, log-variance

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
    radii = {"68": math.sqrt(-2 * math.log(0.32)), "95": math.sqrt(-2 * math.log(0.05)),
             "99.7": math.sqrt(-2 * math.log(0.003))}  # the 2-D prior's: 1.51, 2.45, 3.41
    assert numbers["radius_quantiles"] == pytest.approx(radii, rel=1e-9)
    assert numbers["radius_share"] == {p: pytest.approx((norms <= r).double().mean().item(), abs=1.5e-3)
                                       for p, r in radii.items()}
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
    for needle in ("−ELBO", "−log p(x) ≤ (IWAE, K = 200)", "bits/dim", "MSE", "σ in use", "active units",
                   "r68 / r95 / r99.7", "1.51 / 2.45 / 3.41 hold 68 / 95 / 99.7 % of the prior N(0, I) in 2 dim",
                   "10-NN", "sharpness", f"{-numbers['elbo']:.2f}", f"{-numbers['log_px']:.2f}",
                   f"{numbers['bits_per_dim']:.4f}", f"{numbers['bits_per_dim_log_px']:.4f}"):
        assert needle in table


def _numbers(elbo: float, log_px: float, rec: float, k: int = 100) -> dict:
    """evaluate()'s output, made up: only the signs and K matter to the tests below."""
    return {"n_images": 10, "split": "test", "elbo": elbo, "log_px": log_px, "log_px_stderr": 0.5, "iw_samples": k,
            "bits_per_dim": 3.25, "bits_per_dim_log_px": 3.2, "rec": rec, "kl": 20.0, "mse": 0.01, "sigma": 0.1,
            "kl_per_dim": [10.0, 10.0], "active_units": 2, "radius_share": {"68": 0.7, "95": 0.96, "99.7": 0.998},
            "radius_quantiles": prior_radii(2), "knn_agreement": None,
            "sharpness": {"data": 0.1, "recon": 0.05, "samples": 0.04}}


@pytest.mark.parametrize(("elbo", "log_px", "rec", "negative_row"), [
    (-150.0, -140.0, 130.0, None),  # every −log p above 0: no explanation
    (1946.18, 1960.5, -2019.05, "−ELBO (loss, lower is better)"),  # all three below 0: explained once, first
    (-5.0, 3.0, -25.0, "  reconstruction −log p(x|z)"),  # the −ELBO above 0, rec below: explained after rec
])
def test_table_prints_negative_log_likelihoods_and_explains_the_first_one_below_0(elbo, log_px, rec, negative_row):
    rows = table_rows(_numbers(elbo, log_px, rec, k=37))
    names = [name for name, _ in rows]
    values = dict(rows)
    # one convention: −ELBO, −log p(x|z), −log p(x) (lower is better), with bits/dim beside the two totals
    assert values["−ELBO (loss, lower is better)"] == f"{-elbo:.2f} nats/image  = 3.2500 bits/dim"
    assert values["  reconstruction −log p(x|z)"] == f"{rec:.2f} nats/image"
    assert values["−log p(x) ≤ (IWAE, K = 37)"].startswith(f"{-log_px:.2f} nats/image ± 0.50 s.e.")
    assert values["−log p(x) ≤ (IWAE, K = 37)"].endswith("= 3.2000 bits/dim")
    assert values["  tighter than −ELBO by (K = 37)"] == f"{log_px - elbo:.2f} nats/image"
    assert not any(name.startswith(("ELBO", "log p(x)")) for name in names)  # no log-likelihood rows
    if negative_row is None:
        assert NEGATIVE_NOTE not in format_table(_numbers(elbo, log_px, rec))
    else:
        assert [v for _, v in rows].count(NEGATIVE_NOTE) == 1
        assert names[names.index(negative_row) + 1] == "  below 0?"
