"""Every observation model against torch.distributions or a closed form: one table, one contract."""

import math

import pytest
import torch
from torch import distributions as D

from vaelab.errors import ConfigError
from vaelab.models.likelihoods import LIKELIHOODS, Discretized, GaussianOptimal, make_likelihood

B, SHAPE = 4, (1, 5, 3)


def _params(lik, gen):
    spread = 0.3 if isinstance(lik, Discretized) else 1.0  # locations near [0, 1], where 8-bit data lives
    return [spread * torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64) + (0.5 if spread < 1 else 0)
            for _ in range(lik.n_params)]


def _x(binary, gen):
    u = torch.rand(B, *SHAPE, generator=gen, dtype=torch.float64)
    if binary == "8bit":  # every level, the open end bins included
        k = torch.randint(0, 256, u.shape, generator=gen)
        k.view(-1)[:2] = torch.tensor([0, 255])
        return k.double() / 255
    return (u > 0.5).double() if binary else u


class BruteDiscretized:
    """P(bin) = CDF(upper edge) − CDF(lower edge) straight from torch.distributions, the end bins open; the mean
    by summing all 256 levels. Plain float64 arithmetic: right wherever the CDF difference does not cancel."""

    def __init__(self, cdf, shape, weights=None):
        self.cdf, self.shape, self.weights = cdf, shape, weights  # cdf(t): (K, ...) per component, or (...)

    def _probs(self, x):
        hi = torch.where(x >= 1 - 1e-9, 1.0, self.cdf(x + 0.5 / 255))
        lo = torch.where(x <= 1e-9, 0.0, self.cdf(x - 0.5 / 255))
        return hi - lo if self.weights is None else (self.weights * (hi - lo)).sum(0)

    def log_prob(self, x):
        return torch.log(self._probs(x))

    @property
    def mean(self):
        return sum(k / 255 * self._probs(torch.full(self.shape, k / 255, dtype=torch.float64)) for k in range(256))


def _logistic_cdf(mu, s):
    return lambda t: torch.sigmoid((t - mu) / s)


def _normal_cdf(mu, s):
    return lambda t: 0.5 * torch.special.erfc(-(t - mu) / (s * math.sqrt(2)))  # accurate in the lower tail


def _reference(name, lik, params):
    """The same density built from torch.distributions, per pixel."""
    if name.startswith("disc-"):
        cdf = _logistic_cdf if "logistic" in name else _normal_cdf
        if lik.mixtures > 1:
            k = lik.mixtures
            w = torch.softmax(torch.stack(params[:k]), 0)
            mu, s = torch.stack(params[k:2 * k]), torch.exp(lik._parts(params)[2])
            return BruteDiscretized(cdf(mu, s), params[0].shape, w)
        return BruteDiscretized(cdf(params[0], torch.exp(lik.log_scale_for(params))), params[0].shape)
    if name == "gaussian-fixed":
        return D.Normal(params[0], 0.3)
    if name == "gaussian-learned":
        return D.Normal(params[0], torch.exp(lik.log_scale.detach()).double())
    if name == "gaussian-pixel":
        return D.Normal(params[0], torch.exp(lik.log_scale_for(params)))
    if name == "bernoulli":
        return D.Bernoulli(logits=params[0])
    if name == "continuous-bernoulli":
        return D.ContinuousBernoulli(logits=params[0])
    if name == "laplace":
        return D.Laplace(params[0], 0.2)
    raise KeyError(name)


CASES = [  # (case, likelihood, --sigma, binary data)
    ("gaussian-fixed", "gaussian", "0.3", False),
    ("gaussian-learned", "gaussian", "learned", False),
    ("gaussian-pixel", "gaussian", "learned-pixel", False),
    ("bernoulli", "bernoulli", "0.1", True),
    ("continuous-bernoulli", "continuous-bernoulli", "0.1", False),
    ("laplace", "laplace", "0.2", False),
    ("disc-logistic-fixed", "discretized-logistic", "0.05", "8bit"),
    ("disc-logistic-learned", "discretized-logistic", "learned", "8bit"),
    ("disc-logistic-pixel", "discretized-logistic", "learned-pixel", "8bit"),
    ("disc-logistic-mixture", "discretized-logistic", "learned-pixel", "8bit"),
    ("disc-gaussian-fixed", "discretized-gaussian", "0.3", "8bit"),
    ("disc-gaussian-pixel", "discretized-gaussian", "learned-pixel", "8bit"),
]
MIXTURES = {"disc-logistic-mixture": 3}


def _make(case, name, sigma):
    return make_likelihood(name, sigma, MIXTURES.get(case, 1)).double()


@pytest.mark.parametrize(("case", "name", "sigma", "binary"), CASES, ids=[c[0] for c in CASES])
def test_log_prob_matches_torch_distributions(case, name, sigma, binary):
    gen = torch.Generator().manual_seed(1)
    lik = _make(case, name, sigma)
    if case == "gaussian-learned":
        with torch.no_grad():
            lik.log_scale.fill_(math.log(0.25))
    params, x = _params(lik, gen), _x(binary, gen)
    got = lik.log_prob(params, x)
    want = _reference(case, lik, params).log_prob(x).flatten(1).sum(1)
    assert got.shape == (B,)
    # the plain CDF difference loses digits in the upper tail; the stable form does not (see the tail test)
    rtol = 1e-4 if name.startswith("discretized") else 1e-10
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-9)
    assert lik.mean(params).shape == x.shape
    assert lik.sample(params).shape == x.shape


@pytest.mark.parametrize(("case", "name", "sigma", "binary"), CASES, ids=[c[0] for c in CASES])
def test_mean_matches_torch_distributions(case, name, sigma, binary):
    gen = torch.Generator().manual_seed(2)
    lik = _make(case, name, sigma)
    params = _params(lik, gen)
    # the discretized families' mean is E[clip(Y, 0, 1)]: the 8-bit mean to within half a level
    atol = 0.5 / 255 if name.startswith("discretized") else 1e-9
    torch.testing.assert_close(lik.mean(params), _reference(case, lik, params).mean, rtol=1e-6, atol=atol)


def test_gaussian_closed_form_nats():
    """−log N(x; μ, σ²I) = ‖x−μ‖²/(2σ²) + (D/2)·log(2πσ²): the constant is not dropped."""
    lik = make_likelihood("gaussian", "0.1").double()
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    mu = torch.full_like(x, 0.3)
    d = 4
    expected = (d * 0.2 ** 2) / (2 * 0.01) + d / 2 * math.log(2 * math.pi * 0.01)
    torch.testing.assert_close(-lik.log_prob([mu], x), torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("logit", [0.0, 1e-7, 5e-3, -5e-3, 0.02, 3.0, -40.0, 80.0])
def test_continuous_bernoulli_normalizes(logit):
    """∫₀¹ p(x) dx = 1 numerically, including at and near the λ = 0.5 singularity of the textbook formula."""
    lik = make_likelihood("continuous-bernoulli")
    x = torch.linspace(0, 1, 200001, dtype=torch.float64).view(-1, 1, 1, 1)
    eta = torch.full_like(x, logit)
    density = torch.exp(lik.log_prob([eta], x))
    assert torch.isfinite(density).all()
    area = torch.trapezoid(density, dx=1 / 200000)
    assert abs(area.item() - 1.0) < 1e-4


def test_optimal_sigma_is_batch_mse_and_running_in_eval():
    lik = make_likelihood("gaussian", "optimal")
    assert isinstance(lik, GaussianOptimal)
    gen = torch.Generator().manual_seed(3)
    x, mu = torch.rand(8, 1, 4, 4, generator=gen), torch.rand(8, 1, 4, 4, generator=gen)
    lik.train()
    got = lik.log_prob([mu], x)
    mse = (x - mu).square().mean()
    want = D.Normal(mu, mse.sqrt()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lik.scale([mu])[0], mse.sqrt())
    assert lik.running_var.item() == pytest.approx(mse.item())  # the first batch sets the running value
    lik.train()
    lik.log_prob([mu + 0.1], x)  # a second, worse batch moves the running value by the momentum
    mse2 = (x - mu - 0.1).square().mean().item()
    assert lik.running_var.item() == pytest.approx((1 - lik.MOMENTUM) * mse.item() + lik.MOMENTUM * mse2,
                                                   rel=1e-5)
    lik.eval()
    s = lik.running_var.sqrt()
    want_eval = D.Normal(mu, s).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob([mu], x), want_eval, rtol=1e-5, atol=1e-4)


def test_learned_pixel_sigma_is_softly_bounded():
    lik = make_likelihood("gaussian", "learned-pixel")
    raw = torch.tensor([-1e4, -20.0, 0.0, 20.0, 1e4]).view(1, 1, 1, 5)
    s = torch.exp(lik.log_scale_for([raw, raw]))
    assert (s >= lik.SIGMA_MIN * 0.999).all()
    assert (s <= lik.SIGMA_MAX * 1.001).all()
    assert torch.all(s[..., 1:] >= s[..., :-1])  # monotone in the raw output


def test_learned_sigma_is_a_parameter_and_fixed_is_not():
    assert any(p.numel() == 1 for p in make_likelihood("gaussian", "learned").parameters())
    assert list(make_likelihood("gaussian", "0.1").parameters()) == []
    assert any(True for _ in make_likelihood("laplace", "learned").parameters())


@pytest.mark.parametrize(("name", "sigma", "needle"), [
    ("gaussian", "-1", "--sigma must be a number > 0"),
    ("gaussian", "0", "--sigma must be a number > 0"),
    ("gaussian", "fixed", "learned, learned-pixel, optimal"),
    ("laplace", "optimal", "learned"),
    ("poisson", "0.1", "--likelihood must be one of"),
    ("discretized-logistic", "optimal", "learned, learned-pixel"),
    ("discretized-gaussian", "-2", "must be a number > 0"),
])
def test_bad_arguments_name_the_allowed_values(name, sigma, needle):
    with pytest.raises(ConfigError, match=needle):
        make_likelihood(name, sigma)


@pytest.mark.parametrize(("name", "sigma", "k", "needle"), [
    ("gaussian", "0.1", 3, "--mixtures 3 applies to discretized-logistic only"),
    ("discretized-gaussian", "learned-pixel", 2, "applies to discretized-logistic only"),
    ("discretized-logistic", "learned", 2, "use --sigma learned-pixel"),
    ("discretized-logistic", "learned-pixel", 0, "--mixtures must be an integer >= 1"),
])
def test_bad_mixtures_name_the_allowed_values(name, sigma, k, needle):
    with pytest.raises(ConfigError, match=needle):
        make_likelihood(name, sigma, k)


def test_table_is_the_one_place():
    assert set(LIKELIHOODS) == {"gaussian", "bernoulli", "continuous-bernoulli", "laplace", "discretized-logistic",
                                "discretized-gaussian"}
    assert {k for k, v in LIKELIHOODS.items() if not v.continuous} == {"bernoulli", "discretized-logistic",
                                                                        "discretized-gaussian"}


@pytest.mark.parametrize(("case", "name", "sigma", "binary"), CASES, ids=[c[0] for c in CASES])
def test_log_prob_broadcasts_over_leading_sample_dims(case, name, sigma, binary):
    """params (K, B, C, H, W) against x (B, C, H, W) gives (K, B), as the IWAE bound uses it."""
    gen = torch.Generator().manual_seed(4)
    lik = _make(case, name, sigma).eval()
    params = [torch.randn(3, B, *SHAPE, generator=gen, dtype=torch.float64) for _ in range(lik.n_params)]
    x = _x(binary, gen)
    got = lik.log_prob(params, x)
    want = torch.stack([lik.log_prob([p[k] for p in params], x) for k in range(3)])
    assert got.shape == (3, B)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------ 8-bit likelihoods
LEVELS = (torch.arange(256, dtype=torch.float64) / 255).view(256, 1, 1, 1)  # every 8-bit value, as 256 images
DISCRETIZED = ["discretized-logistic", "discretized-gaussian"]


@pytest.mark.parametrize("name", DISCRETIZED)
@pytest.mark.parametrize("scale", [1e-7, 1e-3, 0.05, 1.0, 1e3, 1e7])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_the_256_bin_probabilities_sum_to_one_for_any_parameters(name, scale, dtype, tol):
    lik = make_likelihood(name, str(scale)).to(dtype)
    x = LEVELS.to(dtype)
    for mu in [-1e4, -3.0, -0.01, 0.0, 0.3, 0.5 + 0.25 / 255, 1.0, 1.2, 1e4]:
        log_p = lik.log_prob([torch.full_like(x, mu)], x)  # (256,): log P(level k)
        assert torch.isfinite(log_p).all() or scale < 1e-3, (mu, log_p)  # a tiny scale may give exact zeros
        assert not torch.isnan(log_p).any()
        assert abs(torch.logsumexp(log_p.double(), 0).item()) < tol, mu


@pytest.mark.parametrize("logit_scale", [1.0, 1e4])
def test_a_mixture_sums_to_one_for_extreme_weights_and_components(logit_scale):
    lik = make_likelihood("discretized-logistic", "learned-pixel", 4).double()
    gen = torch.Generator().manual_seed(5)
    one = torch.ones_like(LEVELS)
    logits = [logit_scale * torch.randn((), generator=gen, dtype=torch.float64) * one for _ in range(4)]
    locs = [v * one for v in (-5.0, 0.2, 0.9, 40.0)]
    raws = [v * one for v in (-30.0, -3.0, 0.0, 30.0)]  # scales at and beyond both soft bounds
    log_p = lik.log_prob(logits + locs + raws, LEVELS)
    assert torch.isfinite(log_p).all()
    assert abs(torch.logsumexp(log_p, 0).item()) < 1e-9


@pytest.mark.parametrize("name", DISCRETIZED)
def test_tails_are_exact_where_the_plain_cdf_difference_cancels(name):
    """Deep in the upper tail both CDF values round to 1 and the plain difference is 0 (log −inf); the stable
    form must give the mirror image of the lower tail, which the plain difference gets right."""
    lik = make_likelihood(name, "0.01").double()
    x = LEVELS[1:-1]  # interior levels
    upper = lik.log_prob([torch.full_like(x, 0.2)], x)
    mirrored = lik.log_prob([torch.full_like(x, 0.8)], 1 - x)
    torch.testing.assert_close(upper, mirrored, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(upper).all()
    assert upper.min() < -50  # really in the far tail
    cdf = _logistic_cdf(0.2, 0.01) if "logistic" in name else _normal_cdf(0.2, 0.01)
    plain = torch.log(cdf(x + 0.5 / 255) - cdf(x - 0.5 / 255)).flatten()
    below = (x.flatten() < 0.2) & torch.isfinite(plain)  # the lower tail, where the plain form is accurate
    torch.testing.assert_close(upper[below], plain[below], rtol=1e-6, atol=1e-6)
    assert not torch.isfinite(plain[x.flatten() > 0.6]).all()  # ... and the upper tail, where it fails


@pytest.mark.parametrize("case", ["disc-logistic-fixed", "disc-logistic-learned", "disc-logistic-pixel",
                                  "disc-logistic-mixture", "disc-gaussian-fixed", "disc-gaussian-pixel"])
def test_discretized_gradients_match_finite_differences(case):
    name, sigma = next((c[1], c[2]) for c in CASES if c[0] == case)
    lik = _make(case, name, sigma)
    gen = torch.Generator().manual_seed(6)
    x = _x("8bit", gen)
    params = [(0.5 + 0.3 * torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64)).requires_grad_()
              for _ in range(lik.n_params)]
    own = [p for p in lik.parameters()]
    torch.autograd.gradcheck(lambda *t: lik.log_prob(list(t[:len(params)]), x), (*params, *own))


@pytest.mark.parametrize("name", DISCRETIZED)
def test_float32_gradients_stay_finite_at_extreme_parameters(name):
    lik = make_likelihood(name, "learned-pixel")
    x = LEVELS.float().expand(256, 3, 2, 2)
    mu = torch.tensor([-50.0, 0.0, 0.5, 60.0]).view(1, 1, 2, 2).expand_as(x).clone().requires_grad_()
    raw = torch.tensor([-1e3, -5.0, 5.0, 1e3]).view(1, 1, 2, 2).expand_as(x).clone().requires_grad_()
    lik.log_prob([mu, raw], x).sum().backward()
    assert torch.isfinite(mu.grad).all()
    assert torch.isfinite(raw.grad).all()


@pytest.mark.parametrize("name", DISCRETIZED)
def test_non_8bit_values_are_rounded_to_the_nearest_level(name):
    lik = make_likelihood(name, "0.1").double()
    mu = torch.full((1, 1, 1, 3), 0.4, dtype=torch.float64)
    exact = torch.tensor([0, 100, 255], dtype=torch.float64).view(1, 1, 1, 3) / 255
    off_grid = exact + torch.tensor([0.4, -0.45, 0.3], dtype=torch.float64).view(1, 1, 1, 3) / 255
    torch.testing.assert_close(lik.log_prob([mu], off_grid), lik.log_prob([mu], exact))


def test_samples_are_8bit_and_follow_the_bin_probabilities():
    lik = make_likelihood("discretized-logistic", "0.02").double()
    mu = torch.full((20000, 1, 1, 1), 0.1, dtype=torch.float64)
    torch.manual_seed(0)
    draws = lik.sample([mu])
    k = torch.round(draws * 255)
    assert torch.equal(draws, k / 255)
    freq = torch.bincount(k.long().flatten(), minlength=256).double() / len(k)
    probs = lik.log_prob([mu[:256]], LEVELS).exp()
    assert (freq - probs).abs().max() < 0.01


def test_a_mixture_of_identical_components_is_the_component():
    one = make_likelihood("discretized-logistic", "learned-pixel").double()
    mix = make_likelihood("discretized-logistic", "learned-pixel", 3).double()
    gen = torch.Generator().manual_seed(7)
    x, mu, raw = _x("8bit", gen), torch.rand(B, *SHAPE, generator=gen, dtype=torch.float64), \
        torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64)
    logits = [torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(mix.log_prob(logits + [mu] * 3 + [raw] * 3, x), one.log_prob([mu, raw], x))
    torch.testing.assert_close(mix.mean(logits + [mu] * 3 + [raw] * 3), one.mean([mu, raw]))


# ------------------------------------------------------------------------------------ learned scales
@pytest.mark.parametrize(("name", "sigma", "expected"), [
    ("gaussian", "learned", lambda err: err.square().mean().sqrt()),
    ("laplace", "learned", lambda err: err.abs().mean()),
    ("discretized-gaussian", "learned", lambda err: err.square().mean().sqrt()),
    ("discretized-logistic", "learned", lambda err: (3 * err.square().mean()).sqrt() / math.pi),
])
def test_a_learned_scale_starts_at_its_maximum_likelihood_value(name, sigma, expected):
    lik = make_likelihood(name, sigma).double()
    gen = torch.Generator().manual_seed(8)
    x, mu = _x("8bit", gen), torch.rand(B, *SHAPE, generator=gen, dtype=torch.float64)
    lik.init_from_data([mu], x)
    s = torch.exp(lik.log_scale)
    torch.testing.assert_close(s, expected(x - mu))
    if name in ("gaussian", "laplace"):  # the closed-form MLE: the log-likelihood's derivative in the scale is 0
        log_s = lik.log_scale.detach().clone().requires_grad_()
        lik.log_scale = torch.nn.Parameter(log_s)
        (g,) = torch.autograd.grad(lik.log_prob([mu], x).sum(), lik.log_scale)
        assert abs(g.item()) < 1e-9


def test_a_per_pixel_scale_is_centred_on_the_best_shared_value():
    lik = make_likelihood("gaussian", "learned-pixel").double()
    gen = torch.Generator().manual_seed(9)
    x, mu = _x(False, gen), torch.rand(B, *SHAPE, generator=gen, dtype=torch.float64)
    raw = 0.1 * torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64)
    lik.init_from_data([mu, raw], x)
    geo_mean = torch.exp(lik.log_scale_for([mu, raw]).mean())
    torch.testing.assert_close(geo_mean, (x - mu).square().mean().sqrt(), rtol=0.02, atol=0)


def test_a_per_pixel_scale_saved_without_its_offset_still_loads():
    lik = make_likelihood("gaussian", "learned-pixel")
    lik.load_state_dict({})  # runs saved before the shared offset existed: offset 0, the same σ as then
    assert lik.log_scale.item() == 0.0


@pytest.mark.parametrize(("optimizer", "expected"), [("adam", 0.05), ("sgd", 0.25 / 784)])
def test_learned_scales_have_their_own_step_size(optimizer, expected):
    assert make_likelihood("gaussian", "learned").scale_lr(optimizer, 784) == pytest.approx(expected)
    assert make_likelihood("gaussian", "0.1").scale_lr(optimizer, 784) is None
    assert make_likelihood("gaussian", "optimal").scale_lr(optimizer, 784) is None
