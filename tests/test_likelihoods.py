"""Every observation model against torch.distributions or a closed form: one table, one contract."""

import math

import pytest
import torch
from torch import distributions as D

from vaelab.errors import ConfigError
from vaelab.likelihoods import LIKELIHOODS, GaussianOptimal, make_likelihood

B, SHAPE = 4, (1, 5, 3)


def _params(lik, gen):
    return [torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64) for _ in range(lik.n_params)]


def _x(binary, gen):
    u = torch.rand(B, *SHAPE, generator=gen, dtype=torch.float64)
    return (u > 0.5).double() if binary else u


def _reference(name, lik, params):
    """The same density built from torch.distributions, per pixel."""
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
]


@pytest.mark.parametrize("case,name,sigma,binary", CASES, ids=[c[0] for c in CASES])
def test_log_prob_matches_torch_distributions(case, name, sigma, binary):
    gen = torch.Generator().manual_seed(1)
    lik = make_likelihood(name, sigma).double()
    if case == "gaussian-learned":
        with torch.no_grad():
            lik.log_scale.fill_(math.log(0.25))
    params, x = _params(lik, gen), _x(binary, gen)
    got = lik.log_prob(params, x)
    want = _reference(case, lik, params).log_prob(x).flatten(1).sum(1)
    assert got.shape == (B,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
    assert lik.mean(params).shape == x.shape
    assert lik.sample(params).shape == x.shape


@pytest.mark.parametrize("case,name,sigma,binary", CASES, ids=[c[0] for c in CASES])
def test_mean_matches_torch_distributions(case, name, sigma, binary):
    gen = torch.Generator().manual_seed(2)
    lik = make_likelihood(name, sigma).double()
    params = _params(lik, gen)
    torch.testing.assert_close(lik.mean(params), _reference(case, lik, params).mean, rtol=1e-6, atol=1e-9)


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
    assert (s >= lik.SIGMA_MIN * 0.999).all() and (s <= lik.SIGMA_MAX * 1.001).all()
    assert torch.all(s[..., 1:] >= s[..., :-1])  # monotone in the raw output


def test_learned_sigma_is_a_parameter_and_fixed_is_not():
    assert any(p.numel() == 1 for p in make_likelihood("gaussian", "learned").parameters())
    assert list(make_likelihood("gaussian", "0.1").parameters()) == []
    assert any(True for _ in make_likelihood("laplace", "learned").parameters())


@pytest.mark.parametrize("name,sigma,needle", [
    ("gaussian", "-1", "--sigma must be a number > 0"),
    ("gaussian", "0", "--sigma must be a number > 0"),
    ("gaussian", "fixed", "learned, learned-pixel, optimal"),
    ("laplace", "optimal", "learned"),
    ("poisson", "0.1", "--likelihood must be one of"),
])
def test_bad_arguments_name_the_allowed_values(name, sigma, needle):
    with pytest.raises(ConfigError, match=needle):
        make_likelihood(name, sigma)


def test_table_is_the_one_place():
    assert set(LIKELIHOODS) == {"gaussian", "bernoulli", "continuous-bernoulli", "laplace"}


@pytest.mark.parametrize("case,name,sigma,binary", CASES, ids=[c[0] for c in CASES])
def test_log_prob_broadcasts_over_leading_sample_dims(case, name, sigma, binary):
    """params (K, B, C, H, W) against x (B, C, H, W) gives (K, B), as the IWAE bound uses it."""
    gen = torch.Generator().manual_seed(4)
    lik = make_likelihood(name, sigma).double().eval()
    params = [torch.randn(3, B, *SHAPE, generator=gen, dtype=torch.float64) for _ in range(lik.n_params)]
    x = _x(binary, gen)
    got = lik.log_prob(params, x)
    want = torch.stack([lik.log_prob([p[k] for p in params], x) for k in range(3)])
    assert got.shape == (3, B)
    torch.testing.assert_close(got, want)
