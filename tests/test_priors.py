"""Priors p(z): the mixture and the VampPrior against torch.distributions and their definitions, sampling
moments, the Monte-Carlo KL, the IWAE bound with a learned prior, DReG's gradients, the config's checks, and
training, evaluation and resume on real Fashion-MNIST with each prior."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import distributions as D

from vaelab import load_run, resume, train
from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.models.objective import IWAE, Batch, ObjectiveSettings, make_objective
from vaelab.models.priors import MixturePrior, StandardPrior, VampPrior, make_prior
from vaelab.models.vae import VAE, DiagonalGaussian


def tiny_model(prior: str = "standard", components: int | None = None, latent_dim: int = 2,
               shape: tuple[int, int, int] = (1, 3, 3), seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    components = None if prior == "standard" else components
    config = TrainConfig(hidden=[8], latent_dim=latent_dim, sigma="0.5", prior=prior, prior_components=components)
    return VAE.from_config(config, shape).double()


def images(n: int, shape=(1, 3, 3), seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomise_mixture(prior: MixturePrior, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (prior.means, prior.logvars, prior.logits):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------------------ densities
def test_mixture_log_prob_is_torch_mixture_same_family():
    prior = MixturePrior(3, 4).double()
    randomise_mixture(prior)
    ref = D.MixtureSameFamily(D.Categorical(logits=prior.logits),
                              D.Independent(D.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1))
    z = torch.randn(5, 7, 3, dtype=torch.float64) * 2  # any leading shape
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z), rtol=1e-12, atol=1e-12)


def test_vamp_log_prob_is_the_mean_of_the_encoders_posteriors_at_the_pseudo_inputs():
    model = tiny_model("vamp", 6)
    prior = model.prior
    assert isinstance(prior, VampPrior)
    z = torch.randn(4, 5, 2, dtype=torch.float64)
    q = model.encode(prior.pseudo_inputs())  # (K, L) posteriors
    comps = torch.stack([DiagonalGaussian(q.mean[k], q.logvar[k]).log_prob(z) for k in range(6)], -1)  # (4, 5, K)
    torch.testing.assert_close(prior.log_prob(z), torch.logsumexp(comps, -1) - math.log(6), rtol=1e-12, atol=1e-12)


def test_vamp_holds_the_models_encoder_once_and_trains_it_through_the_prior():
    model = tiny_model("vamp", 6)
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("prior.")] == ["prior.pseudo_logits"]
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.state_dict().values())
    model.prior.log_prob(torch.zeros(1, 2, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert model.prior.pseudo_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())


def test_a_copy_of_a_vamp_model_reads_its_own_encoder():
    model = tiny_model("vamp", 3)
    twin = copy.deepcopy(model)
    assert twin.prior._encode is twin.encoder
    assert model.prior._encode is model.encoder
    with torch.no_grad():
        next(twin.encoder.parameters()).add_(1.0)
    z = torch.zeros(1, 2, dtype=torch.float64)
    assert twin.prior.log_prob(z) != model.prior.log_prob(z)


def test_vamp_pseudo_inputs_start_from_the_first_training_images():
    model = tiny_model("vamp", 5)
    noise = model.prior.pseudo_logits.detach().clone()
    x = images(3)
    model.init_from_data(x)
    want = torch.sigmoid(torch.logit(x[[0, 1, 2, 0, 1]].clamp(0.02, 0.98)) + noise)  # repeated past 3 images
    torch.testing.assert_close(model.prior.pseudo_inputs(), want)
    assert (model.prior.pseudo_inputs() > 0).all()
    assert (model.prior.pseudo_inputs() < 1).all()


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_samples_have_the_priors_moments(prior):
    model = tiny_model(prior, 4)
    if prior == "mog":
        randomise_mixture(model.prior)
    log_w, mean, logvar = (t.detach() for t in model.prior.components())
    w = log_w.exp()[:, None]  # (K, 1)
    for temperature in (1.0, 0.5):
        var = logvar.exp() * temperature**2
        want_mean = (w * mean).sum(0)
        want_var = (w * (var + mean.square())).sum(0) - want_mean.square()
        z = model.sample_prior(200_000, torch.Generator().manual_seed(0), temperature).double()  # (n, L)
        assert z.shape == (200_000, 2)
        se = (want_var / len(z)).sqrt()
        assert ((z.mean(0) - want_mean).abs() < 5 * se).all(), (z.mean(0), want_mean)
        torch.testing.assert_close(z.var(0), want_var, rtol=0.03, atol=1e-3)
    again = model.sample_prior(10, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, model.sample_prior(10, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------ the KL
def test_the_standard_priors_terms_keep_the_closed_form_kl():
    model = tiny_model()
    t = model.terms(images(4))
    assert t.kl_per_dim is not None
    assert t.kl_estimate is None
    torch.testing.assert_close(t.kl, StandardPrior(2).kl_per_dim(t.q.mean, t.q.logvar).sum(1))


def test_the_monte_carlo_kl_averages_to_the_closed_form_for_n01():
    """log q(z|x) − log N(z; 0, I) at z ~ q is the estimator a learned prior uses; for N(0, I) its mean is known."""
    q = DiagonalGaussian(torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[-1.0, 0.3]],
                                                                                           dtype=torch.float64))
    z = q.sample(400_000)  # (n, 1, L)
    mc = q.log_prob(z) - StandardPrior(2).log_prob(z)  # (n, 1)
    exact = StandardPrior(2).kl_per_dim(q.mean, q.logvar).sum()
    assert abs(mc.mean() - exact) < 5 * mc.std() / math.sqrt(len(mc))


def test_the_kl_estimate_of_a_learned_prior_is_unbiased():
    """A 1-D latent: KL(q ‖ p) by quadrature on a fine grid against the mean of the terms' estimate."""
    model = tiny_model("mog", 3, latent_dim=1)
    randomise_mixture(model.prior)
    with torch.no_grad():
        model.prior.means.mul_(3)  # components away from q(z|x), so the KL is far from 0
    x = images(1)
    q = model.encode(x)
    grid = torch.linspace(-15, 15, 200_001, dtype=torch.float64)[:, None]  # (G, 1)
    log_q = q.log_prob(grid[:, None, :])[:, 0]  # (G,)
    exact = torch.trapezoid(log_q.exp() * (log_q - model.prior.log_prob(grid)), grid[:, 0])
    n = 20_000
    with torch.no_grad():
        one = model.terms(x.expand(n, -1, -1, -1)).kl_estimate  # (n,) one draw each, as the ELBO trains with
        five = model(x.expand(n // 5, -1, -1, -1), samples=5).kl_estimate  # (n/5,) the mean over 5 draws each
    for est in (one, five):
        assert abs(est.mean() - exact) < 5 * est.std() / math.sqrt(len(est)), (est.mean(), exact)
    assert exact > 0.1  # a case where the KL is not trivially 0


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_the_iwae_bound_with_one_draw_is_minus_rec_and_kl_at_the_same_noise(prior):
    model = tiny_model(prior, 4).eval()
    x, eps = images(6), torch.randn(1, 6, 2, dtype=torch.float64)
    t = model.terms(x, eps=eps[0])
    mc_kl = t.q.log_prob(t.z) - model.prior.log_prob(t.z)  # (B,) log q(z|x) − log p(z) at the z drawn
    torch.testing.assert_close(model.iwae_bound(x, 1, eps=eps), -(t.rec + mc_kl), rtol=1e-12, atol=1e-10)
    if prior != "standard":  # the terms' KL is that estimate; N(0, I) keeps the closed form
        torch.testing.assert_close(t.kl, mc_kl, rtol=0, atol=0)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_the_elbo_objective_differentiates_the_estimated_kl(prior):
    model = tiny_model(prior, 4)
    x = images(5)
    t = model(x, torch.randn(5, 2, dtype=torch.float64))
    loss = make_objective("elbo", ObjectiveSettings(beta=0.5))(t, Batch(5, 0.5))
    torch.testing.assert_close(loss.total, (t.rec + 0.5 * t.kl_estimate).mean())
    loss.total.backward()
    assert all(p.grad is not None for p in model.prior.parameters())


# ------------------------------------------------------------------------------ DReG
K = 8


def _gradients(model: VAE, x: torch.Tensor, eps: torch.Tensor, grad: str) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = IWAE(ObjectiveSettings(iw_train=eps.shape[0], iw_grad=grad))(model(x, eps, samples=eps.shape[0]),
                                                                       Batch(x.shape[0]))
    loss.total.backward()
    return loss.total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_dreg_has_the_bounds_value_and_the_bounds_decoder_and_prior_gradients(prior):
    model = tiny_model(prior, 3)
    x, eps = images(4), torch.randn(K, 4, 2, dtype=torch.float64)
    value, iwae = _gradients(model, x, eps, "standard")
    dreg_value, dreg = _gradients(model, x, eps, "dreg")
    assert dreg_value == value
    for name, g in iwae.items():
        if name.startswith(("decoder.", "prior.means", "prior.logvars", "prior.logits", "likelihood.")):
            torch.testing.assert_close(dreg[name], g, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(dreg[n], iwae[n]) for n in iwae if n.startswith("encoder."))


@pytest.mark.parametrize("grad", ["standard", "dreg"])
def test_shares_of_a_split_batch_add_up_to_the_whole_batchs_gradients(grad):
    """As under DistributedDataParallel: each process's rows, the objective's share of the whole batch; the
    prior's gradient (through the encoder's pseudo-input posteriors) and DReG's reweighting are per row."""
    model = tiny_model("vamp", 3)
    x, eps = images(6), torch.randn(K, 6, 2, dtype=torch.float64)
    objective = IWAE(ObjectiveSettings(iw_train=K, iw_grad=grad))
    whole = copy.deepcopy(model)
    objective(whole(x, eps, samples=K), Batch(6)).total.backward()
    total = 0.0
    for rows in (slice(0, 4), slice(4, 6)):
        share = objective(model(x[rows], eps[:, rows], samples=K), Batch(6, processes=2)).total
        share.backward()
        total += share.item()
    assert total == pytest.approx(objective(whole(x, eps, samples=K), Batch(6)).total.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def _encoder_estimates(model, x, grad: str, repeats: int, copies: int) -> torch.Tensor:
    """(repeats, P) encoder gradients, each averaged over `copies` independent draws for the same image."""
    g = torch.Generator().manual_seed(7)  # the same draws for every estimator
    rows = []
    for _ in range(repeats):
        eps = torch.randn(K, copies, 2, dtype=torch.float64, generator=g)
        grads = _gradients(model, x.expand(copies, -1, -1, -1), eps, grad)[1]
        rows.append(torch.cat([grads[n].flatten() for n in sorted(grads) if n.startswith("encoder.")]))
    return torch.stack(rows)


def test_dregs_encoder_gradient_is_unbiased():
    model = tiny_model("mog", 3)
    randomise_mixture(model.prior)
    x = images(1)
    iwae = _encoder_estimates(model, x, "standard", 30, 2000)
    dreg = _encoder_estimates(model, x, "dreg", 30, 2000)
    diff = dreg - iwae  # the same draws: a paired comparison
    se = diff.std(0) / math.sqrt(len(diff))
    assert (diff.mean(0).abs() < 4 * se + 1e-9).all(), (diff.mean(0) / se).abs().max()


def test_dregs_encoder_gradient_has_lower_variance():
    """N(0, I) and a posterior not far from the true one (the case DReG is for): several times lower variance.
    (Far from it, with weights that one draw dominates, the two estimators' variances are alike.)"""
    model = tiny_model()
    x = images(1)
    iwae = _encoder_estimates(model, x, "standard", 20, 500)
    dreg = _encoder_estimates(model, x, "dreg", 20, 500)
    assert dreg.var(0).sum() < 0.25 * iwae.var(0).sum(), (dreg.var(0).sum(), iwae.var(0).sum())
    torch.testing.assert_close(dreg.mean(0), iwae.mean(0), rtol=0.2, atol=0.02)


def test_the_paired_comparison_can_tell_a_biased_estimator_apart():
    """Without its squared weights (ŵ_k instead of ŵ_k², the 'sticking the landing' estimator at K > 1) the same
    comparison must fail: the test above has the power to see a bias."""
    model = tiny_model("mog", 3)
    randomise_mixture(model.prior)
    x = images(1)

    def stl(self, out):
        q_stop = DiagonalGaussian(out.q.mean.detach(), out.q.logvar.detach())
        return out.log_joint - q_stop.log_prob(out.z)

    iwae = _encoder_estimates(model, x, "standard", 30, 2000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(IWAE, "_dreg_weights", staticmethod(lambda out: stl(None, out)))
        biased = _encoder_estimates(model, x, "dreg", 30, 2000)
    diff = biased - iwae
    assert ((diff.mean(0).abs() / (diff.std(0) / math.sqrt(len(diff)))) > 6).any()


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("settings", "needle"), [
    ({"prior": "gauss"}, "--prior must be one of standard, mog, vamp; got 'gauss'"),
    ({"prior_components": 5}, "--prior-components applies to --prior mog or vamp; got 5 with --prior standard"),
    ({"prior": "mog", "prior_components": 0}, "--prior-components must be an integer >= 1; got 0"),
    ({"prior": "vamp", "free_bits": 0.5}, "--free-bits bounds a per-dimension KL, which --prior vamp does not have"),
    ({"iw_grad": "dreg"}, "--iw-grad dreg applies to --objective iwae; got --objective elbo"),
    ({"objective": "iwae", "iw_grad": "dreg"}, "--iw-grad dreg reweights K >= 2 draws per image; got --iw-train 1"),
    ({"objective": "iwae", "iw_grad": "reinforce"}, "--iw-grad must be one of standard, dreg; got 'reinforce'"),
    ({"objective": "iwae", "iw_train": 2, "iw_grad": "dreg", "arch": "hierarchical"},
     "--iw-grad dreg applies to --arch mlp and conv"),
])
def test_bad_prior_and_gradient_settings_get_one_line(settings, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**settings)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_the_default_components_are_written_into_the_config_and_read_back(tmp_path):
    config = TrainConfig(prior="vamp")
    assert config.model.prior_components == 100
    assert TrainConfig(prior="mog").model.prior_components == 10
    assert TrainConfig().model.prior_components is None
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config
    assert isinstance(make_prior("mog", 2), MixturePrior)


def test_the_cli_rejects_components_with_the_standard_prior_in_one_line(tmp_path, capsys):
    assert main(["train", "--prior-components", "3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--prior-components applies to --prior mog or vamp" in err[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ on real data
@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory, fashion_dir):
    from vaelab.data import load_dataset

    data = load_dataset("fashion-mnist")
    path = tmp_path_factory.mktemp("data") / "fashion-small.npz"
    np.savez(path, x_train=data.train[:600], y_train=data.train_labels[:600], x_test=data.test[:300],
             y_test=data.test_labels[:300])
    return path


@pytest.mark.parametrize(("prior", "extra"), [("mog", {}), ("vamp", {"prior_components": 20}),
                                              ("vamp", {"objective": "iwae", "iw_train": 3, "iw_grad": "dreg"})])
def test_train_eval_and_resume_with_a_learned_prior(tmp_path, small_fashion, prior, extra):
    cfg = dict(dataset=str(small_fashion), hidden=[32], latent_dim=4, batch_size=100, prior=prior, **extra)
    full = train(TrainConfig(**cfg, epochs=2, out=str(tmp_path / "full")), progress=False)
    train(TrainConfig(**cfg, epochs=1, out=str(tmp_path / "part")), progress=False)
    resumed = resume(tmp_path / "part", progress=False, epochs=2)
    a, b = load_file(full.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the prior's parameters resume exactly too
    assert any(k.startswith("prior.") for k in a)
    assert not any(k.startswith("prior.encoder") or k.startswith("prior._") for k in a)
    rows = [json.loads(line) for line in (full.path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl_per_dim"] is None and r["kl"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["rec"] + r["kl"], rel=1e-12) for r in rows)
    run = load_run(full.path)
    assert run.config.model.prior == prior
    assert main(["eval", str(full.path), "--iw-samples", "5", "--quiet", "--json", str(tmp_path / "e.json")]) == 0
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert numbers["kl_per_dim"] is None
    assert numbers["log_px"] >= numbers["elbo"] - 1.0  # K = 5 is tighter than the ELBO up to noise
    assert abs(numbers["kl_identity_gap"]) < 4 * numbers["kl_identity_gap_se"]
