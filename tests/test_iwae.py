"""The IWAE bound on log p(x) as `vaelab eval` computes it: drawn in chunks, images in groups, each step sized by
the decoder's activations, always equal to the direct formula on the same draws."""

import math

import pytest
import torch
from torch import distributions as D

from vaelab.analysis import metrics
from vaelab.analysis.metrics import iwae_log_px, iwae_sizes, widest_activation_bytes
from vaelab.config import TrainConfig
from vaelab.models.vae import VAE

K, N, SHAPE = 37, 10, (3, 11, 11)  # 11 -> 6 -> 3: two conv stages, odd and even sides


def conv_model(likelihood: str, sigma: str) -> VAE:
    torch.manual_seed(0)
    config = TrainConfig(arch="conv", hidden=[4], latent_dim=3, likelihood=likelihood, sigma=sigma)
    return VAE.from_config(config, SHAPE).double().eval()


def direct_log_px(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x) in one pass over all K·N draws, z_k = μ + σ·ε_k; (N,)."""
    with torch.no_grad():
        q = model.encode(x)
        z = q.mean + q.std * eps  # (K, N, L)
        params = model.decode(z.reshape(-1, model.latent_dim))  # (K·N, C, H, W) each
        log_px_z = model.likelihood.log_prob(params, x.repeat(K, 1, 1, 1)).view(K, -1)
        log_pz = D.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = D.Normal(q.mean, q.std).log_prob(z).sum(-1)
        return torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(K)


LIKELIHOODS = [("gaussian", "0.1"), ("discretized-logistic", "learned-pixel")]  # 1 and 2 decoder outputs


@pytest.fixture(params=LIKELIHOODS, ids=[lik for lik, _ in LIKELIHOODS])
def case(request):
    model = conv_model(*request.param)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N, *SHAPE), generator=gen).double() / 255
    eps = torch.randn(K, N, model.latent_dim, generator=gen, dtype=torch.float64)
    return model, x, eps, direct_log_px(model, x, eps)


@pytest.mark.parametrize("chunk", [1, 5, 16, K, 50])  # 5 and 16 do not divide K = 37
def test_chunked_bound_equals_the_direct_formula(case, chunk):
    model, x, eps, direct = case
    torch.testing.assert_close(model.iwae_bound(x, K, chunk, eps), direct, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(("batch_size", "budget_rows", "sizes"), [
    (3, 16, (1, 16)),  # one image per step, chunks of 16 (37 = 16 + 16 + 5)
    (N, 48, (3, 16)),  # groups of 3 (10 = 3 + 3 + 3 + 1), chunks of 16
    (4, 100, (4, 25)),  # groups of 4 (10 = 4 + 4 + 2), chunks of 25 (37 = 25 + 12)
    (7, 1000, (7, K)),  # the budget holds every draw: groups of --batch-size 7, all K at once
])
def test_grouped_evaluation_equals_the_direct_formula(case, monkeypatch, batch_size, budget_rows, sizes):
    """iwae_log_px over groups of images, each in chunks of samples, with the steps shrunk by a small memory
    budget so that neither groups nor chunks divide N and K evenly."""
    model, x, eps, direct = case
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    row = widest_activation_bytes(model.decoder, torch.zeros(1, 3, dtype=torch.float64))
    monkeypatch.setattr(metrics, "IW_BYTES", budget_rows * row)
    assert iwae_sizes(model, N, K, batch_size, x.device) == sizes
    ours = iwae_log_px(model, x, K, batch_size, lambda t: t, eps=eps)
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-9)


def test_steps_are_sized_by_the_widest_decoder_activation(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    mlp = VAE.from_config(TrainConfig(hidden=[400], latent_dim=20, likelihood="bernoulli"), (1, 28, 28))
    conv = VAE.from_config(TrainConfig(arch="conv", latent_dim=20, likelihood="gaussian"), (3, 32, 32))
    z = torch.zeros(1, 20)
    assert widest_activation_bytes(mlp.decoder, z) == 784 * 4
    assert widest_activation_bytes(conv.decoder, z) == 32 * 16 * 16 * 4  # the first stage's 32x16x16 maps
    cpu = torch.device("cpu")
    group, chunk = iwae_sizes(mlp, 10_000, 1000, 500, cpu)
    assert group * chunk == 1024  # the 784-400-20 MLP keeps the 1024 rows per thread it always had
    group, chunk = iwae_sizes(conv, 10_000, 1000, 500, cpu)
    assert 48 <= group * chunk <= metrics.IW_BYTES // (32 * 16 * 16 * 4) == 98
    assert iwae_sizes(conv, 10_000, 1, 500, cpu) == (500, 1)  # K = 1: whole batches, the ELBO's very draws
    assert iwae_sizes(conv, 30, 1000, 500, cpu)[0] <= 30
