"""β-TCVAE and DIP-VAE on --arch hierarchical: they act on the top latent group (the code `encode` gives), against
sums written out from the top group's slice of q and z; the lower groups keep their closed-form KL. Then one
short training run on `shapes` and its evaluation, and two torchrun processes training DIP-VAE-II as one does."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.distributions as D

import vaelab
from vaelab.data import shapes as S
from vaelab.errors import ConfigError
from vaelab.models.factor_objectives import (
    DEFAULT_TC_WEIGHT,
    DIPVAEI,
    DIPVAEII,
    BetaTCVAE,
    dip_penalty,
    tc_decomposition,
)
from vaelab.models.hierarchical import HierarchicalVAE
from vaelab.models.objective import ELBO, Batch, ObjectiveSettings
from vaelab.models.vae import VAE, DiagonalGaussian, Terms

B = 8


@pytest.fixture(scope="module")
def hierarchy():
    """A tiny hierarchy on 3x16x16 images (groups 1x1, 4x4, 8x8 of 4 channels: 4 + 64 + 256 units), in float64,
    its prior nets given weights so the lower groups' prior is not N(0, I); the model and B images."""
    from test_hierarchical import _randomize_priors

    torch.manual_seed(0)
    model = VAE.from_config(vaelab.TrainConfig(arch="hierarchical", hidden=[16], latent_dim=4), (3, 16, 16))
    assert isinstance(model, HierarchicalVAE)
    model = model.double()
    _randomize_priors(model)
    x = torch.rand(B, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def _terms(model, x) -> Terms:
    model.zero_grad()
    out = model(x, eps=torch.randn(B, model.latent_dim, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(2)))
    assert out.group_sizes == (4, 64, 256)
    assert out.z is not None
    assert out.q is not None
    return out


def _top(out: Terms):
    k = out.group_sizes[0]
    return out.q.mean[:, :k], out.q.logvar[:, :k], out.z[:, :k]


@pytest.mark.parametrize("beta", [1.0, 0.25])  # the warm-up weight multiplies every group's KL
def test_betatcvae_at_tc_weight_1_is_the_elbo_with_the_top_kl_estimated_at_its_draw(hierarchy, beta):
    model, x = hierarchy
    out = _terms(model, x)
    mean, logvar, z = _top(out)
    log_q = D.Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(1)  # (B,) log q(z_top|x)
    log_p = D.Normal(0.0, 1.0).log_prob(z).sum(1)  # (B,) log N(z_top; 0, I)
    lower = out.kl_per_dim[:, 4:].sum(1)  # (B,) the 4x4 and 8x8 groups' closed-form KL
    assert lower.min() > 0.1
    expected = (out.rec + beta * (log_q - log_p + lower)).mean()
    loss = BetaTCVAE(ObjectiveSettings(tc_weight=1.0, dataset_size=100))(out, Batch(B, beta))
    torch.testing.assert_close(loss.total, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(loss.parts["lower_kl"], lower.mean())
    # the decomposition applied to every group's units is another number: the slice is the top group's
    every = tc_decomposition(out.q.mean, out.q.logvar, out.z, 100)
    wrong = (out.rec + beta * (every["mi"] + every["tc"] + every["dwkl"])).mean()
    assert abs(wrong.item() - expected.item()) > 1.0
    loss.total.backward()
    for name, module in (("encoder", model.encoder), ("top posterior", model.decoder.cells[0]),
                         ("lower groups", model.decoder.cells[2]), ("decoder output", model.decoder.out)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


def test_betatcvae_weighs_up_the_top_groups_total_correlation_only(hierarchy):
    model, x = hierarchy
    with torch.no_grad():
        out = _terms(model, x)
    one = BetaTCVAE(ObjectiveSettings(tc_weight=1.0, dataset_size=100))(out, Batch(B))
    six = BetaTCVAE(ObjectiveSettings(tc_weight=6.0, dataset_size=100))(out, Batch(B))
    parts = tc_decomposition(*_top(out), dataset_size=100)  # (B,) each, the top group's
    assert parts["tc"].mean().abs() > 1e-3
    torch.testing.assert_close(six.total - one.total, 5 * parts["tc"].mean())
    for name in ("mi", "tc", "dwkl"):  # the reported parts are the top group's
        torch.testing.assert_close(six.parts[name], parts[name].mean())
    every = tc_decomposition(out.q.mean, out.q.logvar, out.z, 100)["tc"].mean()
    assert abs(every.item() - parts["tc"].mean().item()) > 1e-2


@pytest.mark.parametrize("cls", [DIPVAEI, DIPVAEII])
def test_dip_vae_penalises_the_covariance_of_the_top_group(hierarchy, cls):
    model, x = hierarchy
    with torch.no_grad():
        out = _terms(model, x)
    mean, logvar, _ = _top(out)
    cov = torch.cov(mean.T, correction=0)  # (4, 4)
    if cls is DIPVAEII:
        cov = cov + torch.diag(torch.exp(logvar).mean(0))
    objective = cls(ObjectiveSettings(lambda_od=2.0, lambda_d=3.0))
    loss = objective(out, Batch(B, 0.5))
    penalty = dip_penalty(cov, 2.0, 3.0)
    torch.testing.assert_close(loss.parts["dip"], penalty)
    torch.testing.assert_close(loss.total - penalty, ELBO(ObjectiveSettings())(out, Batch(B, 0.5)).total)
    torch.testing.assert_close(loss.parts["kl"], out.kl.mean())  # every group's KL
    whole = torch.cov(out.q.mean.T, correction=0)  # (324, 324): what a penalty over every unit would read
    assert abs(dip_penalty(whole, 2.0, 3.0).item() - penalty.item()) > 1.0


@pytest.mark.parametrize("cls", [DIPVAEI, DIPVAEII])
def test_dip_vae_shares_of_two_processes_read_the_top_group(cls):
    """The sums the processes add are the top group's: a split batch gives the whole batch's value and
    gradients (as for a single-latent model, tests/test_factor_objectives.py)."""
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(9, 3 + 5, generator=g, dtype=torch.float64)  # groups of 3 and 5 units
    logvar = torch.randn(9, 8, generator=g, dtype=torch.float64) * 0.5 - 1.0
    objective = cls(ObjectiveSettings())

    def terms(m, lv):
        q = DiagonalGaussian(m, lv)
        return Terms(m.square().sum(1), q.kl_per_dim(), None, None, q=q, z=m, group_sizes=(3, 5))

    whole_mean, whole_logvar = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    whole = objective(terms(whole_mean, whole_logvar), Batch(9))
    whole.total.backward()
    top_mean, top_logvar = mean[:, :3], logvar[:, :3]
    sums = torch.cat([top_mean.sum(0), (top_mean.T @ top_mean).flatten(), torch.exp(top_logvar).sum(0)])

    def all_sum(t):  # the collective: the sums over both processes' rows
        assert len(t) <= len(sums)
        return t.copy_(sums[:len(t)])

    part_mean, part_logvar = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    total = 0.0
    for r in (slice(0, 4), slice(4, 9)):
        share = objective(terms(part_mean[r], part_logvar[r]), Batch(9, 1.0, all_sum, 2)).total
        share.backward()
        total += share.item()
    assert total == pytest.approx(whole.total.item(), rel=1e-12)
    torch.testing.assert_close(part_mean.grad, whole_mean.grad)
    torch.testing.assert_close(part_logvar.grad, whole_logvar.grad)


def test_the_objectives_accept_a_hierarchy_and_betatcvae_still_needs_the_standard_prior():
    for objective in ("betatcvae", "dipvae-i", "dipvae-ii"):
        assert vaelab.TrainConfig(arch="hierarchical", objective=objective).optim.objective == objective
    with pytest.raises(ConfigError, match="got --prior mog: use --prior standard"):
        vaelab.TrainConfig(arch="hierarchical", objective="betatcvae", prior="mog")
    # DIP-VAE with a learned top prior: the top group's covariance, every group's KL (the top one's estimate)
    config = vaelab.TrainConfig(arch="hierarchical", hidden=[16], latent_dim=4, objective="dipvae-i", prior="mog")
    torch.manual_seed(0)
    model = VAE.from_config(config, (3, 16, 16))
    with torch.no_grad():
        out = model(torch.rand(B, 3, 16, 16))
    assert out.kl_estimate is not None
    loss = DIPVAEI(ObjectiveSettings())(out, Batch(B))
    cov = torch.cov(out.q.mean[:, :4].T, correction=0)
    torch.testing.assert_close(loss.parts["dip"], dip_penalty(cov, 10.0, 100.0))
    torch.testing.assert_close(loss.total, (out.rec + out.kl).mean() + loss.parts["dip"])


@pytest.mark.slow
def test_a_hierarchy_trains_with_betatcvae_on_shapes_and_evaluates(tmp_path, monkeypatch):
    from vaelab.cli import main

    monkeypatch.setattr(S, "N_TRAIN", 400)
    monkeypatch.setattr(S, "N_TEST", 150)
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "shapes", "--arch", "hierarchical", "--objective", "betatcvae", "--limit",
                 "200", "--epochs", "1", "--hidden", "16", "--latent-dim", "8", "--threads", "1", "--quiet",
                 "--out", str(out)]) == 0
    test = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "test")
    assert all(math.isfinite(test[k]) for k in ("loss", "rec", "kl", "objective"))
    assert test["loss"] == pytest.approx(test["rec"] + test["kl"])  # `loss` stays the −ELBO
    parts = test["objective_parts"]
    assert set(parts) == {"mi", "tc", "dwkl"}
    assert all(math.isfinite(v) for v in parts.values())
    lower = sum(test["kl_per_group"][1:])  # the lower groups' closed-form KL, weight 1
    assert test["objective"] == pytest.approx(
        test["rec"] + parts["mi"] + DEFAULT_TC_WEIGHT * parts["tc"] + parts["dwkl"] + lower, rel=1e-5)
    numbers = tmp_path / "eval.json"
    assert main(["eval", str(out), "--limit", "150", "--iw-samples", "2", "--no-sample-quality", "--quiet",
                 "--threads", "1", "--json", str(numbers)]) == 0
    got = json.loads(numbers.read_text())
    assert math.isfinite(got["elbo"])
    assert len(got["kl_per_group"]) == 4  # 1x1, 4x4, 8x8, 16x16
    scores = got["factor_scores"]  # the top group's 8 dimensions, scored against the shapes' factors
    assert list(scores["per_factor"]) == list(S.FACTORS)
    assert len(scores["matrices"]["mi"]) == 8
    assert all(0 <= scores[k] <= 1 for k in ("mig", "sap"))


@pytest.mark.slow
def test_two_torchrun_processes_train_a_hierarchy_with_dip_vae_as_one_process(tmp_path, fashion):
    from test_distributed import LAUNCH_TIMEOUT, args, check_matches_one_process, config, env, torchrun_cmd

    data = tmp_path / "subset.npz"
    np.savez(data, x_train=fashion.train[:256], x_test=fashion.test[:100])
    kw = dict(arch="hierarchical", latent_dim=4, epochs=1, objective="dipvae-ii")
    r = subprocess.run(torchrun_cmd(2, *args(data, tmp_path / "two", hidden=16, **kw)), capture_output=True,
                       text=True, timeout=LAUNCH_TIMEOUT, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    one = vaelab.train(config(data, tmp_path / "one", hidden=[16], **kw), progress=False)
    check_matches_one_process(tmp_path / "two", one.path)
