"""anatomy.py: the average KL split into I(x; z) and KL(q(z) ‖ p(z)), checked on posteriors whose answer is known
and on a trained Fashion-MNIST run, where the two parts must add up to the closed-form KL within the noise."""

import json
import math

import pytest
import torch

from trained_runs import trained_run
from vaelab import load_run
from vaelab.analysis.anatomy import Mixture, anatomy, anatomy_rows
from vaelab.analysis.metrics import evaluate_run, table_rows
from vaelab.cli import main
from vaelab.models.priors import MixturePrior, StandardPrior
from vaelab.models.vae import DiagonalGaussian

KEYS = {"mutual_info", "mutual_info_se", "mutual_info_max", "marginal_kl", "marginal_kl_se", "anatomy_kl",
        "kl_identity_gap", "kl_identity_gap_se", "anatomy_images", "anatomy_draws"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_identity(r: dict) -> None:
    """I + marginal KL is a Monte-Carlo estimate of the closed-form average KL: within 3 standard errors."""
    assert r["mutual_info"] + r["marginal_kl"] - r["anatomy_kl"] == pytest.approx(r["kl_identity_gap"], abs=1e-9)
    assert abs(r["kl_identity_gap"]) < 3 * r["kl_identity_gap_se"], r


# ------------------------------------------------------------------------------ posteriors with known answers
@pytest.fixture
def narrow():
    """Narrow posteriors, σ from 2e-9 (log σ² = −40, where an encoder trained with a small decoder σ goes) to 0.2,
    and wide ones, σ up to 2.7; queries both far from every mean and within a few σ of a narrow one."""
    g = _gen(0)
    mean = torch.randn(60, 5, generator=g, dtype=torch.float64) * 3
    logvar = torch.cat([torch.empty(30, 5, dtype=torch.float64).uniform_(-40, -3, generator=g),
                        torch.empty(30, 5, dtype=torch.float64).uniform_(-3, 2, generator=g)])
    near = mean[:30] + (0.5 * logvar[:30]).exp() * torch.randn(30, 5, generator=g, dtype=torch.float64)
    z = torch.cat([torch.randn(30, 5, generator=g, dtype=torch.float64) * 3, near])
    return z, mean, logvar, DiagonalGaussian(mean, logvar).log_prob(z[:, None, :])  # exact: (Q, N) term by term


def test_log_components_are_exact_wherever_a_log_sum_exp_can_feel_them(narrow):
    z, mean, logvar, exact = narrow
    ours = Mixture(mean, logvar).log_components(z)
    counts = exact >= exact.amax(1, keepdim=True) - 200  # within e^-200 of the row's largest
    assert counts.sum() > len(z)  # more than each row's top entry is checked
    assert ours[counts] == pytest.approx(exact[counts], rel=1e-12, abs=1e-6)
    assert (ours[~counts] < exact.amax(1, keepdim=True).expand_as(ours)[~counts] - 199).all()


def test_mixture_log_prob_is_the_log_sum_exp_over_components(narrow):
    z, mean, logvar, exact = narrow
    by_hand = torch.logsumexp(exact, 1) - math.log(len(mean))
    mixture = Mixture(mean, logvar)
    assert mixture.log_prob(z) == pytest.approx(by_hand, rel=1e-12, abs=1e-6)
    assert mixture.log_prob(z, block_elements=7 * 60) == pytest.approx(by_hand, rel=1e-12, abs=1e-6)


def test_posteriors_equal_to_the_prior_carry_no_information_and_fit_the_prior():
    n, dim = 400, 3
    r = anatomy(torch.zeros(n, dim), torch.zeros(n, dim), draws=2)
    # q(z|x_i) = q(z) = p(z) at every z: both parts are 0 up to rounding (a wrong log N term would give ±log N)
    assert r["mutual_info"] == pytest.approx(0.0, abs=1e-9)
    assert r["marginal_kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["anatomy_kl"] == 0.0
    assert r["mutual_info_max"] == pytest.approx(math.log(n))
    assert (r["anatomy_images"], r["anatomy_draws"]) == (n, 2)


def test_narrow_posteriors_at_separated_means_carry_log_n_nats():
    n, dim = 300, 4
    mean = torch.randn(n, dim, generator=_gen(1), dtype=torch.float64) * 3
    logvar = torch.full((n, dim), -14.0, dtype=torch.float64)  # σ ≈ 1e-3, means ≫ 1e-3 apart
    r = anatomy(mean, logvar)
    # each z is explained by its own posterior alone: log q(z) = log q(z|x_i) − log N, so I = log N
    assert r["mutual_info"] == pytest.approx(math.log(n), abs=1e-6)
    assert r["marginal_kl"] == pytest.approx(r["anatomy_kl"] - math.log(n), rel=1e-3)
    _assert_identity(r)


@pytest.mark.parametrize("s", [0.1, 0.3])
def test_narrow_posteriors_whose_mixture_is_the_prior_carry_information_but_fit_the_prior(s):
    # μ ~ N(0, (1 − s²) I) and q(z|x) = N(μ, s² I): the aggregate posterior is N(0, I), so the marginal KL is ~0
    # and the average KL is all information, that of a Gaussian channel: I = L·log(1/s)
    n, dim = 4000, 2
    mean = torch.randn(n, dim, generator=_gen(2), dtype=torch.float64) * math.sqrt(1 - s * s)
    logvar = torch.full((n, dim), 2 * math.log(s), dtype=torch.float64)
    r = anatomy(mean, logvar, draws=2)
    # the mixture of 4000 narrow bumps is not quite smooth: a small marginal KL (0.04 nats at s = 0.1, shrinking
    # as N grows) that a wrong log N term would turn into ±8.3
    assert r["mutual_info"] == pytest.approx(dim * math.log(1 / s), abs=0.1)
    assert -0.005 < r["marginal_kl"] < 0.05
    assert r["anatomy_kl"] == pytest.approx(dim * math.log(1 / s), abs=0.05)
    _assert_identity(r)


def test_information_never_exceeds_log_n_and_one_image_carries_none():
    g = _gen(3)
    mean, logvar = torch.randn(50, 3, generator=g) * 4, torch.randn(50, 3, generator=g) - 4
    r = anatomy(mean, logvar, draws=5)
    assert 0 < r["mutual_info"] <= math.log(50)
    one = anatomy(mean[:1], logvar[:1], draws=3)
    assert one["mutual_info"] == pytest.approx(0.0, abs=1e-9)
    assert one["mutual_info_max"] == 0.0
    assert one["marginal_kl"] == pytest.approx(one["anatomy_kl"] + one["kl_identity_gap"])
    assert one["mutual_info_se"] is None  # no spread over one image
    assert one["kl_identity_gap_se"] is None


def test_blocks_subsets_seeds_and_the_callers_random_stream():
    g = _gen(4)
    mean, logvar = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) - 2
    torch.manual_seed(123)
    whole = anatomy(mean, logvar, draws=3)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.rand(1) == after  # its draws come from a generator of its own
    small_blocks = anatomy(mean, logvar, draws=3, block_elements=7 * 300)  # 7 queries per block
    assert small_blocks == pytest.approx(whole, rel=1e-12)
    assert anatomy(mean, logvar, draws=3, seed=1)["marginal_kl"] != whole["marginal_kl"]
    subset = anatomy(mean, logvar, draws=3, max_images=120)
    assert subset["anatomy_images"] == 120
    assert subset["mutual_info_max"] == pytest.approx(math.log(120))
    assert subset["anatomy_kl"] != whole["anatomy_kl"]  # the closed form of those 120 images only
    _assert_identity(subset)
    narrow = anatomy(mean.double() * 100, torch.full((300, 2), -14.0, dtype=torch.float64), max_images=120)
    assert narrow["mutual_info"] == pytest.approx(math.log(120), abs=1e-6)  # a mixture of 120, not 300
    with pytest.raises(ValueError, match="draws must be >= 1, got 0"):
        anatomy(mean, logvar, draws=0)


def test_rows_show_both_parts_and_are_absent_for_numbers_without_them():
    r = {"mutual_info": 4.123, "mutual_info_se": 0.031, "mutual_info_max": math.log(1000), "marginal_kl": 2.5,
         "marginal_kl_se": 0.02, "kl_identity_gap": -0.013, "kl_identity_gap_se": 0.011, "anatomy_images": 1000,
         "anatomy_draws": 1}
    rows = dict(anatomy_rows(r))
    assert rows["    = I(x; z) (≤ log N = 6.91)"] == "4.12 ± 0.03 s.e. nats/image"
    assert rows["    + KL(q(z) ‖ p(z)) (marginal KL)"] == "2.50 ± 0.02 s.e. nats/image"
    assert rows["    I + marginal KL − KL"].startswith("-0.01 ± 0.01 s.e. nats/image")
    assert "N = 1000 images' q(z|x), 1 draw z ~ q(z|x) per image" in rows["    I + marginal KL − KL"]
    subset = dict(anatomy_rows({**r, "n_images": 60000}))["    I + marginal KL − KL"]
    assert "the mixture of a random N = 1000 of the 60000 images' q(z|x)" in subset
    assert anatomy_rows({"kl": 3.0}) == []


def test_a_learned_prior_equal_to_every_posterior_gives_no_information_and_no_marginal_kl():
    """q(z|x_n) = N(μ, σ²) for every image and a one-component mixture prior at the same μ, σ: both parts are 0
    and the estimated average KL too (log q(z|x) − log p(z) is 0 at every z); a shifted prior is not."""
    n, dim = 300, 3
    mu, logvar = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, 0.2, -3.0],
                                                                                  dtype=torch.float64)
    prior = MixturePrior(dim, 1).double()
    with torch.no_grad():
        prior.means.copy_(mu)
        prior.logvars.copy_(logvar)
    r = anatomy(mu.expand(n, dim), logvar.expand(n, dim), draws=2, prior=prior)
    assert r["mutual_info"] == pytest.approx(0.0, abs=1e-9)
    assert r["marginal_kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["anatomy_kl"] == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        prior.means.add_(1.0)  # KL(N(μ, σ²) ‖ N(μ + 1, σ²)) = Σ_l 1 / (2σ_l²)
    shifted = anatomy(mu.expand(n, dim), logvar.expand(n, dim), draws=2, prior=prior)
    exact = (0.5 * torch.exp(-logvar)).sum().item()
    assert shifted["marginal_kl"] == pytest.approx(exact, rel=0.05)
    assert shifted["anatomy_kl"] == pytest.approx(exact, rel=0.05)
    _assert_identity(shifted)


def test_the_standard_prior_given_or_not_gives_the_same_numbers():
    g = _gen(5)
    mean, logvar = torch.randn(200, 2, generator=g, dtype=torch.float64), torch.randn(200, 2, generator=g) - 2
    assert anatomy(mean, logvar.double(), prior=StandardPrior(2)) == anatomy(mean, logvar.double())


# ------------------------------------------------------------------------------ a trained run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir):
    return trained_run(tmp_path_factory)


def test_the_parts_add_up_to_the_kl_of_a_trained_model(run_dir):
    run = load_run(run_dir)
    r = evaluate_run(run, "test", iw_samples=2, limit=2000)
    assert r.keys() >= KEYS
    assert r["anatomy_images"] == 2000
    assert r["anatomy_kl"] == pytest.approx(r["kl"], rel=1e-5)  # the same images, the same closed form
    _assert_identity(r)
    assert 0 < r["mutual_info"] <= math.log(2000)
    assert r["marginal_kl"] > 3 * r["marginal_kl_se"]  # a trained encoder's mixture is not the prior
    assert r["mutual_info_se"] > 0
    # its own seeded draws: the same numbers whatever K the IWAE bound uses
    again = evaluate_run(run, "test", iw_samples=5, limit=2000)
    assert {k: again[k] for k in KEYS} == {k: r[k] for k in KEYS}
    names = [name for name, _ in table_rows(r)]
    kl_row = names.index("  KL(q(z|x) ‖ p(z))")
    assert names[kl_row + 1:kl_row + 4] == ["    = I(x; z) (≤ log N = 7.60)", "    + KL(q(z) ‖ p(z)) (marginal KL)",
                                           "    I + marginal KL − KL"]


def test_eval_json_and_table_carry_the_parts(run_dir, tmp_path, capsys):
    path = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--limit", "300", "--iw-samples", "2", "--json", str(path), "--quiet"]) == 0
    numbers = json.loads(path.read_text())
    assert numbers.keys() >= KEYS
    assert numbers["anatomy_images"] == 300
    out = capsys.readouterr().out
    assert f"{numbers['mutual_info']:.2f} ± {numbers['mutual_info_se']:.2f} s.e. nats/image" in out
    assert f"{numbers['marginal_kl']:.2f} ± {numbers['marginal_kl_se']:.2f} s.e. nats/image" in out
    assert "(≤ log N = 5.70)" in out


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_the_parts_add_up_to_the_estimated_kl_of_a_model_with_a_learned_prior(tmp_path_factory, fashion_dir, prior):
    run = load_run(trained_run(tmp_path_factory, prior=prior, prior_components=8))
    r = evaluate_run(run, "test", iw_samples=2, limit=1000)
    assert r["kl_per_dim"] is None
    assert r["anatomy_kl"] == pytest.approx(r["kl"], rel=0.05)  # two independent estimates of the same KL
    _assert_identity(r)
    assert 0 < r["mutual_info"] <= math.log(1000)
    assert r["marginal_kl"] > 3 * r["marginal_kl_se"]
