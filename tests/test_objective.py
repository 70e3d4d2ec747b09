"""The training objective: the ELBO's value and gradients with β and free bits, shares of a batch split over
processes, its value on a split, the registry, and a new objective added through the public API alone."""

import math
import re

import pytest
import torch
import torch.distributions as D

import toy_objective
import vaelab
from vaelab.cli import build_parser
from vaelab.errors import ConfigError
from vaelab.models.likelihoods import make_likelihood
from vaelab.models.objective import ELBO, IWAE, OBJECTIVES, Batch, ObjectiveSettings, make_objective
from vaelab.models.vae import VAE, Terms

REC = torch.tensor([10.0, 20.0], dtype=torch.float64)
KL = torch.tensor([[0.1, 2.0], [0.3, 4.0]], dtype=torch.float64)  # batch-mean per dimension: 0.2, 3.0


@pytest.mark.parametrize(("beta", "free_bits", "expected"), [
    (1.0, 0.0, 15 + 3.2),  # the negative ELBO
    (0.5, 0.0, 15 + 1.6),
    (1.0, 1.0, 15 + 1.0 + 3.0),  # dimension 0 is clamped up to the bound
    (2.0, 0.25, 15 + 2 * (0.25 + 3.0)),
    (0.0, 0.5, 15.0),
])
def test_elbo_value_with_beta_and_free_bits(beta, free_bits, expected):
    loss = ELBO(ObjectiveSettings(free_bits=free_bits))(Terms(REC, KL, None, None), Batch(2, beta))
    assert loss.total.item() == pytest.approx(expected)
    assert loss.parts["rec"].item() == pytest.approx(15.0)
    clamped = sum(max(k, free_bits) for k in (0.2, 3.0))
    assert loss.parts["kl"].item() == pytest.approx(clamped)


def test_a_clamped_dimension_gets_no_gradient():
    kl = KL.clone().requires_grad_()
    ELBO(ObjectiveSettings(free_bits=1.0))(Terms(REC, kl, None, None), Batch(2)).total.backward()
    assert kl.grad is not None
    torch.testing.assert_close(kl.grad[:, 0], torch.zeros(2, dtype=torch.float64))  # mean 0.2 < 1: clamped
    torch.testing.assert_close(kl.grad[:, 1], torch.full((2,), 0.5, dtype=torch.float64))  # d mean / d KL_b


@pytest.mark.parametrize("free_bits", [0.0, 0.25, 1.5])
def test_shares_of_processes_add_up_to_the_whole_batch(free_bits):
    """Two processes holding rows 0-2 and 3-6 of a batch of 7: their shares sum to the one-process value, and
    the sum of processes x share, averaged (as DistributedDataParallel does), has the same gradients."""
    g = torch.Generator().manual_seed(0)
    rec = torch.rand(7, generator=g, dtype=torch.float64) * 100
    kl = torch.rand(7, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    objective = ELBO(ObjectiveSettings(free_bits=free_bits))
    whole_kl = kl.clone().requires_grad_()
    whole_rec = rec.clone().requires_grad_()
    whole = objective(Terms(whole_rec, whole_kl, None, None), Batch(7, 0.7)).total
    whole.backward()
    part_rec, part_kl = rec.clone().requires_grad_(), kl.clone().requires_grad_()
    batch_mean = kl.sum(0) / 7

    def all_sum(t):  # what the collective returns: the batch-mean KL per dimension over both processes
        return t.copy_(batch_mean)

    total = 0.0
    for rows in (slice(0, 3), slice(3, 7)):
        share = objective(Terms(part_rec[rows], part_kl[rows], None, None), Batch(7, 0.7, all_sum, 2)).total
        (share * 2 / 2).backward()
        total += share.item()
    assert total == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(part_rec.grad, whole_rec.grad)
    torch.testing.assert_close(part_kl.grad, whole_kl.grad)


def test_which_objectives_are_the_elbo():
    assert ELBO(ObjectiveSettings(free_bits=0.5)).is_elbo(1.0) is False  # free bits change the objective
    assert ELBO().is_elbo(1.0) is True
    assert ELBO().is_elbo(0.9) is False
    assert IWAE(ObjectiveSettings(iw_train=1)).is_elbo(1.0) is True
    assert IWAE(ObjectiveSettings(iw_train=5)).is_elbo(1.0) is False


def _tiny_model() -> VAE:
    torch.manual_seed(0)
    return VAE((1, 4, 5), "mlp", [8], 3, make_likelihood("bernoulli")).double()


def test_iwae_is_the_log_mean_of_the_importance_weights():
    """The bound from the model's K draws equals log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x) written out with
    torch.distributions at the same z; with one draw it is the ELBO's estimate."""
    model = _tiny_model()
    x = torch.rand(6, 1, 4, 5, dtype=torch.float64).round()
    eps = torch.randn(7, 6, 3, dtype=torch.float64)
    loss = IWAE(ObjectiveSettings(iw_train=7))(model(x, eps, samples=7), Batch(6)).total
    q = model.encode(x)
    z = q.mean + torch.exp(0.5 * q.logvar) * eps  # (7, 6, 3)
    logits = model.decode(z.reshape(-1, 3))[0].view(7, 6, 1, 4, 5)
    log_px_z = D.Bernoulli(logits=logits).log_prob(x).sum((-3, -2, -1))
    log_q = D.Normal(q.mean, torch.exp(0.5 * q.logvar)).log_prob(z).sum(-1)
    log_w = log_px_z + D.Normal(0, 1).log_prob(z).sum(-1) - log_q
    expected = -(torch.logsumexp(log_w, 0) - math.log(7)).mean()
    torch.testing.assert_close(loss, expected)
    one = model(x, eps[0])
    torch.testing.assert_close(IWAE(ObjectiveSettings(iw_train=1))(one, Batch(6)).total, (one.rec + one.kl).mean())


def test_iwae_gradients_reach_every_draw():
    model = _tiny_model()
    x = torch.rand(4, 1, 4, 5, dtype=torch.float64).round()
    IWAE(ObjectiveSettings(iw_train=3))(model(x, samples=3), Batch(4)).total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize(("settings", "needle"), [
    (dict(objective="elbo", iw_train=5), "--iw-train K applies to --objective iwae"),
    (dict(objective="iwae", beta=0.5), "--objective iwae trains the bound itself"),
    (dict(objective="iwae", free_bits=0.1), "--objective iwae trains the bound itself"),
    (dict(objective="iwae", iw_train=0), "--iw-train must be an integer > 0; got 0"),
])
def test_objective_settings_that_do_not_apply_are_one_line(settings, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        vaelab.TrainConfig(**settings)


def test_the_registry_takes_objective_classes_only():
    def not_a_class(out, batch):
        return out.rec.mean()

    with pytest.raises(TypeError, match="Objective subclass"):
        vaelab.register_objective(not_a_class)  # type: ignore[arg-type]

    class Impostor(vaelab.Objective):
        name = "elbo"

    with pytest.raises(ValueError, match="'elbo' is already registered"):
        vaelab.register_objective(Impostor)
    assert OBJECTIVES["elbo"] is ELBO


def test_an_unknown_objective_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"--objective must be one of elbo.*; got 'iwae-9000'"):
        vaelab.TrainConfig(objective="iwae-9000")
    with pytest.raises(ConfigError, match="--objective must be one of"):
        make_objective("iwae-9000")


def test_a_registered_objective_is_a_cli_choice():
    args = build_parser().parse_args(["train", "--objective", toy_objective.ReconstructionOnly.name])
    assert args.objective == "reconstruction-only"


def test_a_registered_objective_trains_on_the_cpu_step(tmp_path, fashion):
    """The toy objective (the reconstruction term alone) drives training: its runs' codes carry far more KL than
    the ELBO's, `loss` stays the −ELBO and the objective is reported beside it."""
    common = dict(dataset="fashion-mnist", limit=2000, hidden=[64], latent_dim=4, epochs=1, device="cpu",
                  likelihood="bernoulli", binarize="static")
    toy = vaelab.train(vaelab.TrainConfig(objective="reconstruction-only", out=str(tmp_path / "toy"), **common),
                       progress=False, data=fashion)
    elbo = vaelab.train(vaelab.TrainConfig(out=str(tmp_path / "elbo"), **common), progress=False, data=fashion)
    for row in toy.metrics:
        assert row["objective"] == pytest.approx(row["rec"], rel=1e-6)  # float32 sums in another order
        assert row["loss"] == pytest.approx(row["rec"] + row["kl"], rel=1e-12)
        assert math.isfinite(row["loss"])
    assert all("objective" not in row for row in elbo.metrics)  # plain ELBO: reported once, as `loss`
    assert toy.last("test")["kl"] > 2 * elbo.last("test")["kl"]
    assert vaelab.load_run(toy.path).config.optim.objective == "reconstruction-only"


def test_an_iwae_run_reports_its_bound_beside_the_elbo(tmp_path, fashion):
    """Trained with K = 8 draws, the bound it reports on each split is tighter than the −ELBO by far more than
    the Monte-Carlo noise of 2,000 and 10,000 images, and looser than the bound with K = 64 draws."""
    run = vaelab.train(vaelab.TrainConfig(objective="iwae", iw_train=8, dataset="fashion-mnist", limit=2000,
                                          hidden=[64], latent_dim=4, epochs=1, device="cpu", likelihood="bernoulli",
                                          binarize="static", out=str(tmp_path / "iwae")), progress=False, data=fashion)
    for row in run.metrics:
        assert row["objective"] < row["loss"] - 1.0, row
    tighter = vaelab.evaluate(run.path, "test", iw_samples=64, progress=False)
    assert run.last("test")["objective"] > -tighter["log_px"] - 0.5  # −log p(x) ≤ −IWAE_64 ≤ −IWAE_8
