"""What the rest of vaelab asks a likelihood about its family, one table: whether it has a scale and what it is
called, draws at a scale the caller chooses (the explorer's σ slider), what an exported page runs, whether it is
normalized only on binary data, and the causes of a non-finite loss it owns."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from trained_runs import trained_run
from vaelab import load_run
from vaelab.config import TrainConfig
from vaelab.data import prepare_data
from vaelab.errors import NotNormalizedWarning
from vaelab.explorer.core import Explorer, RequestError
from vaelab.models.likelihoods import LIKELIHOODS, make_likelihood

ROLES = {  # family: (has_scale, scale_name, binary_only, page_mean, additive_gaussian_noise)
    "gaussian": (True, "σ", False, "identity", True),
    "bernoulli": (False, None, True, "sigmoid", False),
    "continuous-bernoulli": (False, None, False, "cb-mean", False),
    "laplace": (True, "b", False, "identity", False),
    "discretized-logistic": (True, "s", False, None, False),
    "discretized-gaussian": (True, "σ", False, None, False),
}
SHAPE = (1, 64, 64)  # 4096 pixels per image


def test_every_family_is_in_the_table():
    assert set(ROLES) == set(LIKELIHOODS)


@pytest.mark.parametrize("name", list(ROLES))
def test_each_family_answers_for_itself(name):
    has_scale, scale_name, binary_only, page_mean, additive = ROLES[name]
    lik = make_likelihood(name)
    assert (lik.has_scale, lik.scale_name, lik.binary_only, lik.page_mean, lik.additive_gaussian_noise) == (
        has_scale, scale_name, binary_only, page_mean, additive)
    assert (lik.page_draw is None) == (page_mean is None)  # the page draws where it computes the mean
    causes = lik.instability_causes("0.001")
    if has_scale:
        assert causes == [f"{scale_name} is very small or learned {scale_name} collapsed (--sigma 0.001)"]
    else:
        assert causes == []


@pytest.mark.parametrize("name", [n for n, r in ROLES.items() if not r[0]])
def test_a_family_without_a_scale_refuses_one(name):
    lik = make_likelihood(name)
    params = [torch.zeros(2, *SHAPE)]
    with pytest.raises(ValueError, match=f"{name} has no scale to replace"):
        lik.sample(params, 0.1)
    assert lik.sample(params).shape == (2, *SHAPE)


@pytest.mark.parametrize("name", [n for n, r in ROLES.items() if r[0]])
def test_a_scale_must_be_finite_and_not_negative(name):
    lik = make_likelihood(name, "0.1")
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            lik.sample([torch.zeros(1, *SHAPE)], bad)


# (family, --sigma, standard deviation of the continuous law per unit of scale)
CONTINUOUS = [("gaussian", "0.3", 1.0), ("gaussian", "learned-pixel", 1.0), ("laplace", "0.3", math.sqrt(2))]


@pytest.mark.parametrize(("name", "sigma", "sd_per_scale"), CONTINUOUS, ids=[f"{c[0]}-{c[1]}" for c in CONTINUOUS])
def test_continuous_draws_at_a_scale_have_its_spread(name, sigma, sd_per_scale):
    torch.manual_seed(0)
    lik = make_likelihood(name, sigma)
    params = [torch.full((8, *SHAPE), 0.3)] + [torch.full((8, *SHAPE), 2.0)] * (lik.n_params - 1)
    for s in (0.01, 0.05, 0.2):
        x = lik.sample(params, s)
        assert float(x.mean()) == pytest.approx(0.3, abs=5 * s / 180)
        assert float(x.std()) == pytest.approx(s * sd_per_scale, rel=0.03)
    assert torch.equal(lik.sample(params, 0.0), params[0])  # scale 0: the mean itself


DISCRETIZED = [("discretized-logistic", math.pi / math.sqrt(3)), ("discretized-gaussian", 1.0)]


def _on_levels(x: torch.Tensor) -> bool:
    k = x.double() * 255
    return bool(((k - k.round()).abs() < 1e-4).all() and (x >= 0).all() and (x <= 1).all())


@pytest.mark.parametrize(("name", "sd_per_scale"), DISCRETIZED, ids=[d[0] for d in DISCRETIZED])
@pytest.mark.parametrize("sigma", ["0.1", "learned-pixel"])
def test_discretized_draws_at_a_scale_stay_on_the_8bit_levels(name, sd_per_scale, sigma):
    torch.manual_seed(0)
    lik = make_likelihood(name, sigma)
    params = [torch.full((8, *SHAPE), 0.5)] + [torch.full((8, *SHAPE), -1.0)] * (lik.n_params - 1)
    assert _on_levels(lik.sample(params))  # the run's own scale
    spreads = []
    for s in (0.005, 0.02, 0.05):
        x = lik.sample(params, s)
        assert _on_levels(x)
        spreads.append(float(x.std()))
    assert spreads[1] == pytest.approx(0.02 * sd_per_scale, rel=0.03)  # rounding adds 1/12 level², little
    assert spreads[0] < spreads[1] < spreads[2]
    mu = torch.linspace(-0.2, 1.2, 8 * math.prod(SHAPE)).reshape(8, *SHAPE)  # off the grid, some outside [0, 1]
    want = np.clip(np.rint(mu.numpy() * 255), 0, 255) / 255
    np.testing.assert_allclose(lik.sample([mu, *params[1:]], 0.0).numpy(), want, atol=1e-6)  # the rounded location


def test_a_mixtures_draw_at_a_scale_replaces_every_components_scale():
    torch.manual_seed(0)
    k = 3
    lik = make_likelihood("discretized-logistic", "learned-pixel", k)
    locs = [0.1, 0.5, 0.9]
    params = ([torch.zeros(4, *SHAPE)] * k + [torch.full((4, *SHAPE), v) for v in locs]
              + [torch.full((4, *SHAPE), float(r)) for r in (-8.0, 0.0, 2.0)])  # very different own scales
    at_zero = lik.sample(params, 0.0)
    levels = {round(v * 255) for v in locs}
    assert set(torch.round(at_zero * 255).int().unique().tolist()) == levels  # each pixel one rounded location
    x = lik.sample(params, 0.01)
    assert _on_levels(x)
    for v in locs:  # around each component, the same spread whatever its own scale was
        near = x[(x - v).abs() < 0.15]
        assert float(near.std()) == pytest.approx(0.01 * math.pi / math.sqrt(3), rel=0.08)


# ------------------------------------------------------------------------------------- binary data only


def _npy(tmp_path, binary: bool):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (30, 1, 4, 4)) * 255 if binary else rng.integers(0, 256, (30, 1, 4, 4))
    path = tmp_path / f"{'binary' if binary else 'grey'}.npy"
    np.save(path, x.astype(np.uint8))
    return str(path)


@pytest.mark.parametrize("binary_only", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_prepare_data_warns_only_for_a_binary_only_likelihood_on_grey_pixels(tmp_path, binary_only, binary):
    config = TrainConfig(dataset=_npy(tmp_path, binary), batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep = prepare_data(config, torch.device("cpu"), binary_only=binary_only)
    warned = [w for w in caught if issubclass(w.category, NotNormalizedWarning)]
    expected = binary_only and not binary
    assert len(warned) == expected
    assert prep.normalized is not expected
    if expected:
        assert "not a normalized density" in str(warned[0].message)


# ------------------------------------------------------------------------------------------ the explorer


def test_the_explorers_draws_of_a_discretized_run_are_the_models_at_any_sigma(tmp_path_factory, fashion_dir):
    """σ replaces the logistic's s: draws spread around the location by s·π/√3 (not f(z) plus Gaussian noise),
    and σ = 0 gives the rounded location."""
    run = load_run(trained_run(tmp_path_factory, likelihood="discretized-logistic", sigma="learned-pixel",
                               hidden=[32], epochs=1, limit=600))
    ex = Explorer(run, 50)
    info = ex.info()
    assert (info["sigma_name"], info["sigma_per_pixel"]) == ("s", True)
    assert info["sigma"] > 0
    z = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    with torch.inference_mode():
        loc = run.model.decode(torch.from_numpy(z))[0].permute(0, 2, 3, 1).numpy() * 255  # (8, H, W, C) levels
    assert np.array_equal(ex.sample(z, 0.0, 0), np.clip(np.rint(loc), 0, 255).astype(np.uint8))
    s = 0.02
    noise = ex.sample(z, s, 3, 8).astype(float) - np.repeat(loc, 8, 0)  # (64, H, W, C), code-major
    inside = np.repeat((loc > 0.2 * 255) & (loc < 0.8 * 255), 8, 0)  # no clipping at either end
    assert inside.sum() > 2000
    assert abs(noise[inside].mean()) < 0.3
    assert noise[inside].std() == pytest.approx(s * 255 * math.pi / math.sqrt(3), rel=0.05)


def test_the_explorer_refuses_a_sigma_for_a_family_without_a_scale(tmp_path_factory, fashion_dir):
    run = load_run(trained_run(tmp_path_factory, likelihood="continuous-bernoulli", hidden=[32], epochs=1,
                               limit=600))
    ex = Explorer(run, 50)
    assert (ex.info()["sigma"], ex.info()["sigma_name"]) == (None, None)
    with pytest.raises(RequestError, match="sigma applies to observation models with a scale"):
        ex.sample(np.zeros((1, 2), np.float32), 0.1, 0)
