"""A learned prior over the hierarchical model's top group (--arch hierarchical --prior mog | vamp): its KL is
estimated at the drawn z_top while the lower groups' stays in closed form, its draws start prior samples, the IWAE
bound and the objective use it, and a real run trains, evaluates, reports, explores and resumes with it."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from vaelab import TrainConfig, load_run, resume, train
from vaelab.errors import ConfigError
from vaelab.models.hierarchical import HierarchicalVAE
from vaelab.models.objective import Batch, make_objective
from vaelab.models.priors import MixturePrior, VampPrior
from vaelab.models.vae import VAE

SMALL = dict(arch="hierarchical", hidden=[16], latent_dim=4)
SHAPE = (1, 12, 12)


def _model(seed=0, **kw) -> HierarchicalVAE:
    torch.manual_seed(seed)
    model = VAE.from_config(TrainConfig(**{**SMALL, "likelihood": "bernoulli", **kw}), SHAPE)
    assert isinstance(model, HierarchicalVAE)
    return model.eval()


def _standard_mixture() -> tuple[HierarchicalVAE, HierarchicalVAE]:
    """A model with N(0, I) over the top group and the same networks with a one-component mixture equal to it."""
    standard = _model(groups=2)
    learned = _model(groups=2, prior="mog", prior_components=1)
    learned.load_state_dict(standard.state_dict(), strict=False)  # every weight but the mixture's
    top = learned.prior.top
    assert isinstance(top, MixturePrior)
    with torch.no_grad():
        top.means.zero_()
        top.logvars.zero_()
    return standard, learned


def test_a_mixture_equal_to_n01_gives_the_standard_models_bound_and_kl():
    standard, learned = _standard_mixture()
    x = (torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    k, top = 4000, learned.code_dim
    eps = torch.randn(k, 3, learned.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(learned.iwae_bound(x, 50, eps=eps[:50]), standard.iwae_bound(x, 50, eps=eps[:50]),
                              atol=1e-4)
        a, b = standard(x, eps, samples=k), learned(x, eps, samples=k)
        assert torch.allclose(a.log_weights, b.log_weights, atol=1e-4)
        assert a.kl_estimate is None
        assert b.kl_estimate is not None
        assert b.kl_per_dim is not None
        assert a.kl_per_dim is not None
        assert (b.kl_per_dim[:, :top] == 0).all()  # the top group's KL is the estimate, not a unit's
        assert torch.allclose(b.kl_per_dim[:, top:], a.kl_per_dim[:, top:], atol=1e-5)
        # the estimate, averaged over the draws, is the top group's closed-form KL to N(0, I)
        one = [learned(x, eps[i]) for i in range(400)]
    estimates = torch.stack([t.kl_estimate for t in one]).double()  # (400, B)
    closed = a.kl_per_dim[:, :top].sum(1).double()
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    assert (closed > 0.05).all()
    assert ((estimates.mean(0) - closed).abs() < 4 * se + 1e-4).all(), (estimates.mean(0), closed, se)
    # the terms' KL is both parts, and the ELBO objective adds both
    t = one[0]
    assert torch.allclose(t.kl, t.kl_per_dim.sum(1) + t.kl_estimate)
    loss = make_objective("elbo")(t, Batch(3, 0.5))
    assert loss.total.item() == pytest.approx((t.rec + 0.5 * t.kl).mean().item(), rel=1e-5)


def test_prior_draws_start_from_the_learned_top_prior():
    model = _model(prior="mog", prior_components=2)
    top = model.prior.top
    assert isinstance(top, MixturePrior)
    with torch.no_grad():
        top.means.copy_(torch.tensor([[6.0] * 4, [-6.0] * 4]))
        top.logvars.fill_(math.log(0.01))
    for t in (1.0, 0.5):
        u = model.sample_prior(2000, torch.Generator().manual_seed(0), temperature=t)  # (n, L)
        z_top, rest = u[:, :model.code_dim], u[:, model.code_dim:]
        assert ((z_top.abs() - 6).abs() < 0.5 * t).all()  # each draw near one component, its spread x T
        assert set(torch.sign(z_top[:, 0]).tolist()) == {-1.0, 1.0}
        assert rest.std().item() == pytest.approx(t, rel=0.02)  # the lower groups' standardized noise x T
        with torch.no_grad():
            _, draws = model.decoder(u[:5])
        assert torch.equal(draws.z[:, :model.code_dim], z_top[:5])  # decoded as the top group's z itself
    assert model.code_prior is top
    assert model.prior.describe() == ("a mixture of 2 learned Gaussians for the top group, p(z_i | z_<i) below it")


def test_the_vamp_prior_encodes_its_pseudo_inputs_with_the_models_own_top_posterior():
    model = _model(prior="vamp", prior_components=3)
    top = model.prior.top
    assert isinstance(top, VampPrior)
    _, mean, logvar = top.components()
    q = model.encode(top.pseudo_inputs())
    assert torch.equal(mean, q.mean)
    assert torch.equal(logvar, q.logvar)
    model.train()
    x = torch.rand(4, *SHAPE)
    model.terms(x).kl.sum().backward()
    first = next(model.encoder.parameters())
    assert top.pseudo_logits.grad is not None
    assert top.pseudo_logits.grad.abs().sum() > 0
    assert first.grad is not None
    assert first.grad.abs().sum() > 0  # the KL reaches the encoder through q(z_top|x) and the pseudo-inputs
    twin = copy.deepcopy(model)  # the moving average's copy: its prior encodes with the copy's encoder
    with torch.no_grad():
        for p in twin.encoder.parameters():
            p.add_(0.1)
    assert not torch.equal(twin.prior.top.components()[1], top.components()[1])
    assert "pseudo_logits" in "".join(model.state_dict())


@pytest.mark.parametrize(("settings", "match"), [
    (dict(prior="mog", free_bits=0.5), "--free-bits bounds a per-dimension KL"),
    (dict(prior="vamp", objective="betatcvae"), "--objective betatcvae splits the KL over the dimensions of the prior"),
    (dict(prior="gmm"), "--prior must be one of standard, mog, vamp"),
])
def test_bad_prior_settings_name_the_value_and_what_is_allowed(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{**SMALL, **settings})


@pytest.mark.slow
def test_train_eval_report_explore_and_resume_with_a_vamp_top_prior(tmp_path, fashion):
    data = tmp_path / "fashion-small.npz"
    np.savez(data, x_train=fashion.train[:300], y_train=fashion.train_labels[:300],
             x_test=fashion.test[:100], y_test=fashion.test_labels[:100])

    def cfg(name, epochs):
        return TrainConfig(**{**SMALL, "latent_dim": 2, "prior": "vamp", "prior_components": 8,
                              "dataset": str(data), "epochs": epochs, "batch_size": 50, "device": "cpu",
                              "out": str(tmp_path / name)})

    full = train(cfg("full", 2), progress=False)
    train(cfg("part", 1), progress=False)
    resumed = resume(tmp_path / "part", progress=False, epochs=2)
    for k, v in full.model.state_dict().items():
        assert v.equal(resumed.model.state_dict()[k]), k
    rows = [json.loads(line) for line in (full.path / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["kl_per_dim"] is None for r in test)  # the top group's KL has no closed form per unit
    assert all(sum(r["kl_per_group"]) == pytest.approx(r["kl"], rel=1e-6) for r in test)

    from vaelab.analysis.metrics import evaluate_run
    from vaelab.analysis.reporting import write_report
    from vaelab.analysis.summary import network_lines
    from vaelab.explorer.core import Explorer

    run = load_run(full.path)
    assert isinstance(run.model.prior.top, VampPrior)
    numbers = evaluate_run(run, iw_samples=5, limit=100)
    assert numbers["log_px"] >= numbers["elbo"] - 1.0
    assert sum(numbers["kl_per_group"]) == pytest.approx(numbers["kl"], rel=1e-6)
    info = Explorer(run, n_codes=50).info()
    assert (info["prior"], info["latent_dim"]) == ("vamp", 2)
    density = info["prior_density"]  # the learned prior of the top group's plane, on a grid
    assert density is not None
    assert np.isfinite(np.array(density["log_p"])).all()
    write_report(run, tmp_path / "report", iw_samples=2, limit=100)
    assert (tmp_path / "report" / "levels.png").is_file()
    lines = "\n".join(network_lines(run.model, "hierarchical", [16], 1))
    # 8 pseudo-inputs of 28 x 28 pixels
    assert "prior: VampPrior, 8 pseudo-inputs for the top group, p(z_i | z_<i) below it, 6,272 parameters" in lines
