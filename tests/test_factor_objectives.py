"""β-TCVAE and DIP-VAE: the minibatch-weighted estimates against sums written out term by term, the
decomposition adding up to the KL estimate, DIP's covariance and penalty, shares of a batch split over processes,
the settings' one-line errors, and one short training run that reports the −ELBO and the objective apart."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributions as D

import vaelab
from vaelab.analysis import reporting
from vaelab.data import shapes as S
from vaelab.errors import ConfigError
from vaelab.models.factor_objectives import (
    DEFAULT_TC_WEIGHT,
    DIPVAEI,
    DIPVAEII,
    BetaTCVAE,
    aggregate_tc,
    dip_covariance,
    dip_penalty,
    tc_decomposition,
)
from vaelab.models.objective import OBJECTIVES, Batch, ObjectiveSettings
from vaelab.models.vae import DiagonalGaussian, Terms


def _posterior(m: int = 5, latent: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(m, latent, generator=g, dtype=torch.float64)
    logvar = torch.randn(m, latent, generator=g, dtype=torch.float64) * 0.5 - 1.0
    z = mean + torch.exp(0.5 * logvar) * torch.randn(m, latent, generator=g, dtype=torch.float64)
    return mean, logvar, z


def _brute_force(mean, logvar, z, n):
    """Chen et al.'s minibatch-weighted sampling written as loops over i, j and d with torch.distributions."""
    m, latent = z.shape
    normal = D.Normal(mean, torch.exp(0.5 * logvar))  # (M, L): the posterior of row j
    mi, tc, dw = [], [], []
    for i in range(m):
        dens = torch.stack([normal.log_prob(z[i])[j] for j in range(m)])  # (M, L): log q(z_i,d | x_j)
        log_qz = math.log(sum(math.exp(dens[j].sum().item()) for j in range(m)) / (n * m))
        log_qzd = [math.log(sum(math.exp(dens[j, d].item()) for j in range(m)) / (n * m)) for d in range(latent)]
        log_qzx = dens[i].sum().item()
        log_pz = D.Normal(0.0, 1.0).log_prob(z[i]).sum().item()
        mi.append(log_qzx - log_qz)
        tc.append(log_qz - sum(log_qzd))
        dw.append(sum(log_qzd) - log_pz)
    return {"mi": mi, "tc": tc, "dwkl": dw}


@pytest.mark.parametrize("n", [5, 1000])
def test_minibatch_weighted_sampling_matches_the_sums_written_out(n):
    mean, logvar, z = _posterior()
    got = tc_decomposition(mean, logvar, z, dataset_size=n)
    expected = _brute_force(mean, logvar, z, n)
    for part in ("mi", "tc", "dwkl"):
        torch.testing.assert_close(got[part], torch.tensor(expected[part], dtype=torch.float64))


def test_the_total_correlation_of_a_split_weighs_each_row_once():
    """aggregate_tc: q(z) = (1/M) Σ_j q(z|x_j) over exactly the M rows, in blocks of rows."""
    mean, logvar, z = _posterior(m=6, latent=3, seed=3)
    expected = torch.tensor(_brute_force(mean, logvar, z, 1)["tc"], dtype=torch.float64)  # weights 1/M
    torch.testing.assert_close(aggregate_tc(mean, logvar, z, block=4), expected)


def test_the_three_parts_sum_to_the_kl_estimate_at_the_sampled_z():
    """MI + TC + dimension-wise KL = log q(z|x) − log p(z) per example, whatever N; so β-TCVAE at α = β = γ = 1
    is the reconstruction plus that one-sample KL estimate."""
    mean, logvar, z = _posterior(m=7, latent=4, seed=1)
    q = DiagonalGaussian(mean, logvar)
    kl_estimate = q.log_prob(z) - D.Normal(0.0, 1.0).log_prob(z).sum(-1)  # (M,)
    for n in (7, 60000):
        parts = tc_decomposition(mean, logvar, z, n)
        torch.testing.assert_close(parts["mi"] + parts["tc"] + parts["dwkl"], kl_estimate)
    rec = torch.arange(7, dtype=torch.float64)
    terms = Terms(rec, q.kl_per_dim(), None, None, q=q, z=z)
    loss = BetaTCVAE(ObjectiveSettings(tc_weight=1.0, dataset_size=100))(terms, Batch(7))
    torch.testing.assert_close(loss.total, (rec + kl_estimate).mean())
    tc6 = BetaTCVAE(ObjectiveSettings(tc_weight=6.0, dataset_size=100))(terms, Batch(7))
    torch.testing.assert_close(tc6.total - loss.total, 5 * loss.parts["tc"])
    assert set(loss.parts) == {"rec", "mi", "tc", "dwkl"}


def test_total_correlation_is_larger_for_codes_that_move_together():
    """Posterior means spread along the diagonal (both dimensions say the same thing) against the same spread
    drawn independently per dimension: the estimate tells them apart."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(256, 1, generator=g, dtype=torch.float64)
    together = t.repeat(1, 2)
    apart = torch.cat([t, torch.randn(256, 1, generator=g, dtype=torch.float64)], 1)
    logvar = torch.full((256, 2), math.log(0.05 ** 2), dtype=torch.float64)

    def tc(mean):
        z = mean + 0.05 * torch.randn(mean.shape, generator=g, dtype=torch.float64)
        return tc_decomposition(mean, logvar, z, 256)["tc"].mean().item()

    assert tc(together) > tc(apart) + 1.0


def test_dip_covariances_and_penalty():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    logvar = torch.randn(50, 3, generator=g, dtype=torch.float64)
    sums = torch.cat([mean.sum(0), (mean.T @ mean).flatten(), torch.exp(logvar).sum(0)])
    cov_i = dip_covariance(sums, 50, 3, with_variance=False)
    torch.testing.assert_close(cov_i, torch.cov(mean.T, correction=0))
    cov_ii = dip_covariance(sums, 50, 3, with_variance=True)
    torch.testing.assert_close(cov_ii, cov_i + torch.diag(torch.exp(logvar).mean(0)))
    assert dip_penalty(torch.eye(3, dtype=torch.float64), 10.0, 100.0).item() == 0.0
    off = torch.eye(3, dtype=torch.float64)
    off[0, 1] = off[1, 0] = 0.5
    assert dip_penalty(off, 10.0, 100.0).item() == pytest.approx(10.0 * 2 * 0.25)
    assert dip_penalty(torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)), 10.0, 100.0).item() == \
        pytest.approx(100.0 * (1.0 + 0.25))


def _dip_terms(mean, logvar):
    q = DiagonalGaussian(mean, logvar)
    return Terms(mean.square().sum(1), q.kl_per_dim(), None, None, q=q, z=mean)


@pytest.mark.parametrize("cls", [DIPVAEI, DIPVAEII])
def test_dip_vae_adds_its_penalty_to_the_elbo(cls):
    """Codes whitened over the batch (DIP-VAE-I) give no penalty; the same codes scaled by 2 do."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(64, 3, generator=g, dtype=torch.float64)
    white = (raw - raw.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(raw.T, correction=0))).T
    logvar = torch.full((64, 3), -30.0, dtype=torch.float64)  # σ² ≈ 0: DIP-VAE-II's covariance is Cov[μ] too
    objective = cls(ObjectiveSettings(lambda_od=1.0, lambda_d=1.0))
    for codes, penalty in ((white, 0.0), (2 * white, 3 * 9.0)):
        terms = _dip_terms(codes, logvar)
        loss = objective(terms, Batch(64))
        assert loss.parts["dip"].item() == pytest.approx(penalty, abs=1e-9)
        torch.testing.assert_close(loss.total, (terms.rec + terms.kl).mean() + penalty)


@pytest.mark.parametrize("cls", [DIPVAEI, DIPVAEII])
def test_dip_vae_shares_of_two_processes_add_up_with_the_same_gradients(cls):
    mean, logvar, _ = _posterior(m=9, latent=3, seed=2)
    objective = cls(ObjectiveSettings())
    whole_mean, whole_logvar = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    whole = objective(_dip_terms(whole_mean, whole_logvar), Batch(9))
    whole.total.backward()
    part_mean, part_logvar = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    rows = (slice(0, 4), slice(4, 9))
    sums = sum(torch.cat([mean[r].sum(0), (mean[r].T @ mean[r]).flatten(), torch.exp(logvar[r]).sum(0)])
               for r in rows)

    def all_sum(t):  # what the collective returns: the sums over both processes' rows
        return t.copy_(sums[:len(t)])

    total = 0.0
    for r in rows:
        share = objective(_dip_terms(part_mean[r], part_logvar[r]), Batch(9, 1.0, all_sum, 2)).total
        (share * 2 / 2).backward()  # each process differentiates 2 x its share; DDP averages the two
        total += share.item()
    assert total == pytest.approx(whole.total.item(), rel=1e-12)
    torch.testing.assert_close(part_mean.grad, whole_mean.grad)
    torch.testing.assert_close(part_logvar.grad, whole_logvar.grad)


def test_beta_tcvae_refuses_a_batch_split_over_processes():
    mean, logvar, z = _posterior()
    q = DiagonalGaussian(mean, logvar)
    with pytest.raises(ConfigError, match="trains on one process only; got 2 processes"):
        BetaTCVAE()(Terms(mean.sum(1), q.kl_per_dim(), None, None, q=q, z=z), Batch(10, 1.0, lambda t: t, 2))


def test_the_objectives_are_registered_and_not_the_elbo():
    for name, cls in (("betatcvae", BetaTCVAE), ("dipvae-i", DIPVAEI), ("dipvae-ii", DIPVAEII)):
        assert OBJECTIVES[name] is cls
        assert cls().is_elbo(1.0) is False
    assert BetaTCVAE().tc_weight == 6.0
    assert (DIPVAEI().lambda_od, DIPVAEI().lambda_d) == (10.0, 100.0)
    assert (DIPVAEII().lambda_od, DIPVAEII().lambda_d) == (10.0, 10.0)
    assert DIPVAEII(ObjectiveSettings(lambda_od=2.0)).lambda_d == 2.0


@pytest.mark.parametrize(("settings", "needle"), [
    (dict(objective="elbo", tc_weight=2.0), "--tc-weight applies to --objective betatcvae only; got --tc-weight 2 "
                                            "with --objective elbo"),
    (dict(objective="iwae", lambda_od=3.0), "--lambda-od applies to --objective dipvae-i and dipvae-ii only"),
    (dict(objective="betatcvae", lambda_d=1.0), "--lambda-d applies to --objective dipvae-i and dipvae-ii only"),
    (dict(objective="dipvae-i", tc_weight=1.0), "--tc-weight applies to --objective betatcvae only"),
    (dict(objective="betatcvae", beta=4.0), "--beta and --free-bits apply to --objective elbo only; got --beta 4"),
    (dict(objective="dipvae-ii", free_bits=0.5), "--beta and --free-bits apply to --objective elbo only"),
    (dict(objective="betatcvae", iw_train=4), "--iw-train K applies to --objective iwae; got --iw-train 4"),
    (dict(objective="betatcvae", tc_weight=-1.0), "--tc-weight must be a finite number >= 0; got -1.0"),
    (dict(objective="dipvae-i", lambda_od=math.inf), "--lambda-od must be a finite number >= 0; got inf"),
    (dict(objective="betatcvae", prior="mog"), "--objective betatcvae splits the KL over the dimensions of the prior "
                                               "N(0, I); got --prior mog"),
    # a hierarchy's code is its top group: its prior too must be N(0, I)
    (dict(objective="betatcvae", arch="hierarchical", prior="vamp"),
     "--objective betatcvae splits the KL over the dimensions of the prior N(0, I); got --prior vamp"),
])
def test_settings_that_do_not_apply_are_one_line_errors(settings, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        vaelab.TrainConfig(**settings)
    assert "\n" not in str(info.value)


def test_the_cli_rejects_a_setting_of_another_objective_in_one_line(tmp_path, capsys):
    from vaelab.cli import main

    assert main(["train", "--dataset", "shapes", "--tc-weight", "3", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--tc-weight applies to --objective betatcvae only" in err
    assert not (tmp_path / "run").exists()


def _tiny_shapes_run(tmp_path, monkeypatch, objective: str):
    """One epoch on 400 `shapes` images (150 test images: enough to score the factors)."""
    monkeypatch.setattr(S, "N_TRAIN", 400)
    monkeypatch.setattr(S, "N_TEST", 150)
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    vaelab.train(vaelab.TrainConfig(dataset="shapes", hidden=[64], latent_dim=4, epochs=1, objective=objective,
                                    device="cpu", out=str(out)), progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["betatcvae", "dipvae-i"])
def test_one_epoch_on_shapes_reports_the_elbo_and_the_objective_apart(tmp_path, monkeypatch, objective):
    out = _tiny_shapes_run(tmp_path, monkeypatch, objective)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = next(r for r in rows if r["split"] == "test")
    assert math.isfinite(test["loss"])
    assert math.isfinite(test["objective"])
    assert test["loss"] == pytest.approx(test["rec"] + test["kl"])  # `loss` is the −ELBO
    assert test["objective"] != pytest.approx(test["loss"], rel=1e-6, abs=1e-6)  # the objective is reported beside
    assert json.loads((out / "config.json").read_text())["optim"]["objective"] == objective
    parts = test["objective_parts"]  # the objective's own parts, which add up to it with its weights
    if objective == "dipvae-i":
        assert set(parts) == {"dip"}
        assert test["objective"] == pytest.approx(test["rec"] + test["kl"] + parts["dip"], rel=1e-6)
        return
    assert set(parts) == {"mi", "tc", "dwkl"}
    assert test["objective"] == pytest.approx(
        test["rec"] + parts["mi"] + DEFAULT_TC_WEIGHT * parts["tc"] + parts["dwkl"], rel=1e-6)
    # the report draws one traversal per factor, of the dimension eval names as most informative about it
    drawn = {}
    image_rows = reporting.plots.image_rows

    def record(rows, path, title=""):
        drawn[Path(path).stem] = [label for label, _ in rows]
        return image_rows(rows, path, title)

    monkeypatch.setattr(reporting.plots, "image_rows", record)
    html = reporting.write_report(vaelab.load_run(out), iw_samples=2).read_text()
    assert 'id="factor_traversals"' in html
    assert "Traversals by factor" in html
    per_factor = json.loads((out / "eval.json").read_text())["factor_scores"]["per_factor"]
    assert list(per_factor) == list(S.FACTORS)
    assert drawn["factor_traversals"] == [f"{name} (z{p['best_dim'] + 1})" for name, p in per_factor.items()]
    assert (out / "factor_traversals.png").stat().st_size > 5000
    few = reporting.Material.of(vaelab.load_run(out, device="cpu"), 50)  # too few images to score: no figure
    assert "factor_traversals" not in reporting.figures_for(few)
