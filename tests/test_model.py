"""The VAE's parts: posterior, KL, networks sized from data, IWAE bound."""

import math

import pytest
import torch
from torch import distributions as D

from vaelab.config import TrainConfig
from vaelab.errors import ConfigError, RunError
from vaelab.models.vae import VAE, DiagonalGaussian
from vaelab.runs import CONFIG, WEIGHTS, load_run, save_weights


def test_kl_closed_form_matches_torch_and_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen,
                                                                                       dtype=torch.float64)
    q = DiagonalGaussian(mean, logvar)
    ref = D.kl_divergence(D.Normal(mean, torch.exp(0.5 * logvar)), D.Normal(0.0, 1.0))
    torch.testing.assert_close(q.kl_per_dim(), ref)
    torch.manual_seed(0)
    z = q.sample(200000)  # (K, B, L)
    mc = (q.log_prob(z) - D.Normal(0.0, 1.0).log_prob(z).sum(-1)).mean(0)
    torch.testing.assert_close(mc, q.kl_per_dim().sum(1), rtol=0.02, atol=0.02)


def test_posterior_log_prob_matches_torch():
    mean, logvar = torch.randn(2, 3), torch.randn(2, 3)
    q = DiagonalGaussian(mean, logvar)
    z = torch.randn(5, 2, 3)
    ref = D.Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(q.log_prob(z), ref)


@pytest.mark.parametrize(("arch", "hidden"), [("mlp", [16]), ("mlp", [32, 16]), ("conv", [8, 16]), ("conv", [4])])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 30, 17), (1, 9, 9)])
@pytest.mark.parametrize(("lik", "sigma"), [("gaussian", "learned-pixel"), ("bernoulli", "0.1")])
def test_networks_are_sized_from_the_data(arch, hidden, shape, lik, sigma):
    cfg = TrainConfig(arch=arch, hidden=hidden, latent_dim=3, likelihood=lik, sigma=sigma)
    model = VAE.from_config(cfg, shape)
    x = torch.rand(5, *shape)
    q = model.encode(x)
    assert q.mean.shape == (5, 3)
    assert q.logvar.shape == (5, 3)
    params = model.decode(q.sample())
    assert len(params) == model.likelihood.n_params
    assert all(p.shape == (5, *shape) for p in params)
    t = model.terms(x)
    assert t.rec.shape == t.kl.shape == t.sq_err.shape == (5,)
    assert torch.isfinite(t.loss).all()


def test_iwae_k1_is_the_elbo_estimate_and_grows_with_k():
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(hidden=[32], latent_dim=2, likelihood="bernoulli"), (1, 6, 6)).double()
    x = (torch.rand(7, 1, 6, 6, dtype=torch.float64) > 0.5).double()
    # terms() uses the analytic KL and iwae_bound(K=1) the sampled log q - log p, so compare expectations:
    # the mean of many K=1 bounds against the mean ELBO, each over 4000 copies of every image.
    xs = x.repeat(4000, 1, 1, 1)
    torch.manual_seed(1)
    k1 = model.iwae_bound(xs, 1).view(4000, 7).mean(0)
    torch.manual_seed(2)
    with torch.no_grad():
        elbo = -model.terms(xs).loss.view(4000, 7).mean(0)
    torch.testing.assert_close(k1, elbo, rtol=0, atol=0.15)
    torch.manual_seed(3)
    k100 = model.iwae_bound(x, 500, chunk=64)
    assert (k100 >= elbo - 0.05).all()
    assert (k100 - elbo).mean() > 0.01  # strictly tighter on average for an untrained model


def test_iwae_matches_a_direct_computation():
    model = VAE.from_config(TrainConfig(hidden=[8], latent_dim=2, likelihood="bernoulli"), (1, 4, 4)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64).round()
    torch.manual_seed(6)
    q = model.encode(x)
    z = q.sample(12)
    params = model.decode(z.reshape(-1, 2))
    lw = (model.likelihood.log_prob(params, x.repeat(12, 1, 1, 1)).view(12, -1)
          + D.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z))
    direct = torch.logsumexp(lw, 0) - math.log(12)
    torch.manual_seed(6)
    torch.testing.assert_close(model.iwae_bound(x, 12, chunk=12), direct.detach())


@pytest.mark.parametrize(("lik", "sigma"), [("bernoulli", "0.1"), ("gaussian", "learned"), ("gaussian", "optimal")])
def test_bf16_autocast_keeps_z_kl_and_likelihood_in_float32(lik, sigma):
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(likelihood=lik, sigma=sigma, hidden=[32], latent_dim=3), (1, 6, 6))
    model.eval()
    x = torch.rand(5, 1, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encoder(x)[0].dtype == torch.bfloat16  # the matmuls did run in bfloat16
        params = model.decode(model.encode(x).mean)
        torch.manual_seed(1)
        t = model.terms(x)
    assert t.rec.dtype == t.kl_per_dim.dtype == t.sq_err.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in params)
    torch.manual_seed(1)
    exact = model.terms(x)
    assert not torch.equal(t.rec, exact.rec)  # different precision, different numbers ...
    assert t.rec.float().sub(exact.rec).abs().max() < 0.05 * exact.rec.abs().max() + 1  # ... but close


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"latent_dim": 0}, "--latent-dim must be an integer > 0"),
    ({"arch": "rnn"}, "--arch must be one of mlp, conv"),
    ({"hidden": "12,x"}, "--hidden must be comma-separated"),
    ({"lr": -1}, "--lr must be a finite number > 0"),
    ({"binarize": "yes"}, "--binarize must be one of none, dynamic, static"),
    ({"free_bits": float("nan")}, "--free-bits"),
    ({"precision": "fp16"}, "--precision must be one of fp32, bf16"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config keys \\['sigmaa'\\]"):
        TrainConfig.from_dict({"sigmaa": 1})


def test_weights_of_another_network_design_give_one_line_that_says_so(tmp_path):
    """A run directory whose weights were saved for another network (an earlier conv design, an edited
    config.json) stops with one line that counts what differs, not torch's list of every key."""
    saved = TrainConfig(arch="conv", hidden=[8], blocks=0, latent_dim=4, data_shape=[3, 16, 16])
    save_weights(VAE.from_config(saved, (3, 16, 16)), tmp_path / WEIGHTS)
    saved.save(tmp_path / CONFIG)
    assert load_run(tmp_path).config.model.blocks == 0  # the matching network loads
    saved.replace(blocks=1).save(tmp_path / CONFIG)
    with pytest.raises(RunError, match=r"do not fit the network config\.json describes") as e:
        load_run(tmp_path)
    assert "\n" not in str(e.value)
    assert "missing, e.g. encoder.body" in str(e.value)
