"""--progressive: a hierarchy's latent resolutions open to x one at a time, top first. A resolution not yet open
is drawn from its prior, which is then its posterior: no KL, no gradient into its posterior network, and the
ELBO and the IWAE bound stay bounds on log p(x). Runs record which groups were open and resume as they train."""

import json

import pytest
import torch

from test_hierarchical import _cfg, _small_fashion
from vaelab import TrainConfig, resume, train
from vaelab.errors import ConfigError
from vaelab.models.hierarchical import HierarchicalVAE
from vaelab.models.vae import VAE

SMALL = dict(arch="hierarchical", hidden=[16], latent_dim=4)


def _model(shape=(1, 12, 12), seed=0, **kw) -> HierarchicalVAE:
    torch.manual_seed(seed)
    model = VAE.from_config(TrainConfig(**{**SMALL, **kw}), shape)
    assert isinstance(model, HierarchicalVAE)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # priors that depend on the groups above, so that q = p is not N(0, I) by accident
        for cell in model.decoder.cells:
            if cell.prior_net is not None:
                last = cell.prior_net.convs[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)
                last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.3)
    return model


def test_open_resolutions_counts_the_groups_of_the_top_ones():
    model = _model(groups=2)  # 1x1, 3x3, 6x6: two groups each
    assert model.resolutions == [(1, 1), (3, 3), (6, 6)]
    for k, opened in ((1, 2), (2, 4), (3, None), (9, None), (None, None)):
        model.open_resolutions(k)
        assert model.opened == opened, k
    lopsided = _model((3, 32, 32), groups=[1, 3, 0, 2])  # no latents at 8x8
    lopsided.open_resolutions(2)
    assert lopsided.opened == 4
    assert lopsided.resolutions == [(1, 1), (4, 4), (16, 16)]


def test_groups_not_yet_open_hold_nothing_of_x_and_cost_no_kl():
    model = _model(groups=2).train()
    x = torch.rand(8, 1, 12, 12)
    eps = torch.randn(8, model.latent_dim, generator=torch.Generator().manual_seed(2))
    top = sum(model.group_sizes[:2])
    model.open_resolutions(1)
    t = model.terms(x, eps=eps)
    assert (t.kl_per_dim[:, top:] == 0).all()
    assert (t.kl_per_dim[:, :top].sum(1) > 0).all()
    (t.rec.sum() + t.kl_per_dim.sum()).backward()
    for i, cell in enumerate(model.decoder.cells):
        grads = [p.grad for p in cell.posterior_net.parameters()]
        assert all(g is not None for g in grads), i  # in the graph: every weight gets a gradient under DDP
        if i < 2:
            assert any(g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g.abs().sum() == 0 for g in grads), i
    model.zero_grad()
    # another image with the same top code draws the same lower groups: they do not read x
    other = torch.rand(8, 1, 12, 12)
    with torch.no_grad():
        acts, acts_other = model.encoder(x), model.encoder(other)
        acts_other[(1, 1)] = acts[(1, 1)]  # the top group's posterior sees x's features
        _, draws = model.decoder(eps, acts, keep=model.opened)
        _, draws_other = model.decoder(eps, acts_other, keep=model.opened)
    assert torch.allclose(draws.z, draws_other.z, atol=1e-6)


def test_the_bounds_stay_bounds_while_groups_are_closed():
    model = _model(groups=2).eval()
    x = torch.rand(16, 1, 12, 12)
    model.open_resolutions(2)
    with torch.no_grad():
        many = model(x, samples=200)
        elbo = -(many.rec + many.kl)
        diff = (many.log_weights - elbo).double()  # log p − log q at each draw averages to −KL: the same ELBO
        assert diff.mean().abs() < 4 * diff.mean(1).std() / 200 ** 0.5 + 1e-4
        assert model.iwae_bound(x, 50).mean() > elbo.mean()
        kl = model.terms(x).kl_per_dim
    assert (kl[:, sum(model.group_sizes[:4]):] == 0).all()
    model.open_resolutions(None)
    with torch.no_grad():
        assert (model.terms(x).kl_per_dim[:, sum(model.group_sizes[:4]):].sum(1) > 0).all()


@pytest.mark.parametrize(("settings", "match"), [
    (dict(arch="conv", progressive=1.0), "--progressive opens latent groups in turn, which --arch hierarchical "
                                         "has; got --arch conv"),
    (dict(arch="hierarchical", progressive=-1.0), r"--progressive must be a finite number >= 0; got -1\.0"),
])
def test_bad_settings_name_the_flag(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**settings)


def test_a_run_too_short_to_open_every_resolution_is_refused_before_anything_is_written(tmp_path, fashion):
    data = _small_fashion(tmp_path, fashion)  # 28x28: latents at 1x1, 4x4, 7x7, 14x14
    with pytest.raises(ConfigError, match=r"--progressive 1 opens the last of the 4 latent resolutions \(1x1, 4x4, "
                                          r"7x7, 14x14\) after 3 epochs, but the run has --epochs 3"):
        train(_cfg(tmp_path, "short", data, epochs=3, progressive=1.0), progress=False)
    assert not (tmp_path / "short").exists()


@pytest.mark.slow
def test_a_progressive_run_opens_in_turn_records_it_and_resumes_bit_identically(tmp_path, fashion):
    data = _small_fashion(tmp_path, fashion)
    settings = dict(groups=[1, 1, 1, 0], progressive=0.75)  # 1x1 alone, 4x4 from 0.75 epochs, 7x7 from 1.5
    full = train(_cfg(tmp_path, "full", data, epochs=3, **settings), progress=False)
    train(_cfg(tmp_path, "part", data, epochs=2, **settings), progress=False)
    resumed = resume(tmp_path / "part", progress=False, epochs=3)
    for k, v in full.model.state_dict().items():
        assert v.equal(resumed.model.state_dict()[k]), k
    assert full.model.opened is None  # the run's model, as its weights load: every group from q(z|x)
    rows = [json.loads(line) for line in (full.path / "metrics.jsonl").read_text().splitlines()]
    test = {r["epoch"]: r for r in rows if r["split"] == "test"}
    assert test[1]["open_groups"] == 2
    assert test[1]["kl_per_group"][2] == 0
    assert test[1]["kl_per_group"][1] > 0
    assert "open_groups" not in test[2]
    assert min(test[2]["kl_per_group"]) > 0
    assert "open_groups" not in test[3]
