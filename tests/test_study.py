"""The σ study: the identities behind it, its bookkeeping, and one real end-to-end run."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import distributions as D

from vaelab.analysis.study import StudyConfig, epoch_to_reach, markdown_table, summarize
from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.models.likelihoods import make_likelihood
from vaelab.models.vae import VAE


def test_gaussian_nll_identity():
    """−log N(x; μ, σ²I) = ‖x−μ‖²/(2σ²) + (D/2)·log(2πσ²), against torch.distributions."""
    gen = torch.Generator().manual_seed(0)
    x, mu = torch.rand(3, 1, 7, 5, generator=gen, dtype=torch.float64), torch.rand(3, 1, 7, 5, generator=gen,
                                                                                    dtype=torch.float64)
    for sigma in (0.01, 0.1, 1.0, 3.0):
        d = 35
        closed = (x - mu).square().flatten(1).sum(1) / (2 * sigma ** 2) + d / 2 * math.log(2 * math.pi * sigma ** 2)
        torch_nll = -D.Normal(mu, sigma).log_prob(x).flatten(1).sum(1)
        ours = -make_likelihood("gaussian", str(sigma)).log_prob([mu], x)
        torch.testing.assert_close(closed, torch_nll)
        torch.testing.assert_close(ours, torch_nll)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("sigma", [0.05, 0.3, 2.0])
def test_fixed_sigma_equals_beta_vae_with_beta_2_sigma_squared(sigma):
    """∇[‖x−f‖²/2σ² + KL] = (1/2σ²)·∇[‖x−f‖² + β·KL] with β = 2σ² (the calibrated-decoders equivalence)."""
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(hidden=[16], latent_dim=3, sigma=str(sigma)), (1, 6, 6)).double()
    x = torch.rand(8, 1, 6, 6, dtype=torch.float64)
    torch.manual_seed(1)
    t = model.terms(x)
    g_gauss = _grads(model, (t.rec + t.kl).mean())
    torch.manual_seed(1)  # the same z
    q = model.encode(x)
    f = model.decode(q.sample())[0]
    sse = (x - f).square().flatten(1).sum(1)
    g_beta = _grads(model, (sse + 2 * sigma ** 2 * q.kl_per_dim().sum(1)).mean())
    for a, b in zip(g_gauss, g_beta, strict=True):
        torch.testing.assert_close(a, b / (2 * sigma ** 2), rtol=1e-9, atol=1e-12)


def test_optimal_sigma_squared_is_the_batch_mse_in_a_model():
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(hidden=[16], latent_dim=2, sigma="optimal"), (1, 5, 5))
    model.train()
    x = torch.rand(16, 1, 5, 5)
    t = model.terms(x)
    batch_mse = t.sq_err.sum() / x.numel()
    torch.testing.assert_close(t.sigma.square(), batch_mse.expand(16), rtol=1e-5, atol=0)
    d = 25
    torch.testing.assert_close(t.rec, d / 2 * torch.log(2 * math.pi * batch_mse) + t.sq_err / (2 * batch_mse),
                               rtol=1e-5, atol=1e-4)


def test_epoch_to_reach_interpolates():
    assert epoch_to_reach([0.5, 0.3, 0.1], 0.2) == pytest.approx(2.5)
    assert epoch_to_reach([0.1, 0.05], 0.2) == 1.0
    assert epoch_to_reach([0.5, 0.4], 0.2) is None


def _row(setting, sigma, kl, sharp, speed, within=0.998, elbo=100.0, mse=0.01):
    return {"setting": setting, "fixed": setting not in ("learned", "optimal"), "sigma": sigma, "neg_elbo": elbo,
            "rec": elbo - kl, "kl": kl, "mse": mse, "active_units": 2, "sharpness_recon": sharp,
            "sharpness_samples": sharp, "sharpness_data": 0.2, "within_997": within, "radius_997": 3.4086,
            "n_images": 10000, "mse_epoch1": 0.05, "epoch_to_threshold": speed}


def test_summary_reports_what_the_numbers_say():
    rows = [_row("0.1", 0.1, 10.0, 0.05, 1.5), _row("0.3", 0.3, 6.0, 0.03, 2.0), _row("1", 1.0, 2.0, 0.01, 3.0)]
    text = summarize(rows, 0.02, "adam")
    assert text[0].startswith("Larger σ gives blurrier outputs: held")
    assert text[1].startswith("Larger σ puts fewer nats in the code (the posterior moves toward the prior): held")
    assert "Smaller σ learns more slowly (adam): did not hold" in text[2]  # smaller σ reached it sooner
    assert text[-1].startswith("Codes lie where the prior puts its mass: held (share of test posterior means "
                               "within r = 3.41, the radius that holds 99.7 % of N(0, I): 99.8% (0.1), ")
    rows[2]["sharpness_recon"] = 0.04  # not monotone any more
    rows[0]["within_997"] = 0.5
    text = summarize(rows, 0.02, "sgd")
    assert "partly held for reconstructions" in text[0]
    assert "did not hold everywhere" in text[-1]


@pytest.mark.parametrize(("within", "n", "held"), [
    (0.997, 10000, True),  # the prior's own share
    (0.9962, 10000, True),  # within two standard errors (0.00055 each) of it
    (0.995, 10000, False),  # outside them: codes leave the prior's mass more often than prior draws do
    (0.995, 500, True),  # on 500 codes, 0.5 % outside is still within sampling error (2 s.e. = 0.0049)
    (0.98, 500, False),
])
def test_where_codes_lie_compares_with_the_prior_up_to_sampling_error(within, n, held):
    row = _row("0.1", 0.1, 10.0, 0.05, 1.5, within=within)
    row["n_images"] = n
    assert ("held (" if held else "did not hold everywhere (") in summarize([row], 0.02, "adam")[-1]


def test_markdown_table_has_every_column():
    md = markdown_table([_row("0.1", 0.1, 10.0, 0.05, None)])
    header, _, line = md.splitlines()
    assert header.count("|") == line.count("|")
    assert "never" in line
    assert "99.8%" in line
    assert "codes within r99.7" in header


@pytest.mark.parametrize(("kwargs", "needle"), [({"sigmas": [0.1, -1]}, "--sigmas must be numbers > 0"),
                                           ({"also": ["fixed"]}, "--also must be a comma-separated subset"),
                                           ({"optimizer": "lbfgs"}, "--optimizer must be one of adam, sgd"),
                                           ({"eval_limit": 0}, "--eval-limit must be an integer > 0; got 0"),
                                           ({"eval_limit": 2.5}, "--eval-limit must be an integer > 0; got 2.5"),
                                           ({"iw_samples": 0}, "--iw-samples must be an integer >= 1; got 0")])
def test_study_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        StudyConfig(**kwargs)


@pytest.mark.parametrize(("value", "needle"), [("0", "--eval-limit must be an integer > 0; got 0"),
                                               ("-5", "--eval-limit must be an integer > 0; got -5"),
                                               ("ten", "argument --eval-limit: invalid int value: 'ten'")])
def test_a_bad_eval_limit_is_one_line_before_any_training(value, needle, tmp_path, capsys):
    assert main(["sigma-study", "--sigmas", "0.1", "--eval-limit", value, "--out", str(tmp_path / "s")]) == 2
    _one_line_and_nothing_written(capsys, needle, tmp_path / "s")


def test_bad_iw_samples_are_one_line_before_any_training(tmp_path, capsys):
    assert main(["sigma-study", "--sigmas", "0.1", "--iw-samples", "0", "--out", str(tmp_path / "s")]) == 2
    _one_line_and_nothing_written(capsys, "--iw-samples must be an integer >= 1; got 0", tmp_path / "s")


def _one_line_and_nothing_written(capsys, needle, out):
    err = capsys.readouterr().err
    assert err.startswith("vaelab: error: ")
    assert needle in err
    assert err.count("\n") == 1
    assert not out.exists()


def vaelab(*args):
    return subprocess.run([sys.executable, "-m", "vaelab.cli", *args], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_sigma_study_end_to_end_reuses_runs_and_agrees_with_eval(tmp_path, fashion_dir):
    out = tmp_path / "sigma"
    common = ["--dataset", "fashion-mnist", "--limit", "1500", "--epochs", "2", "--hidden", "64",
              "--iw-samples", "3", "--out", str(out), "--quiet"]
    r = vaelab("sigma-study", "--sigmas", "0.1,1", *common)
    assert r.returncode == 0, r.stderr
    weights = out / "sigma-0.1" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    r = vaelab("sigma-study", "--sigmas", "0.1,1", "--also", "optimal", *common)  # extend the study
    assert r.returncode == 0, r.stderr
    assert weights.stat().st_mtime_ns == before  # reused, not retrained
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert [r["setting"] for r in rows] == ["0.1", "1", "optimal"]
    for name in ("index.html", "table.md", "summary.md", "recon_samples.png", "manifolds.png", "curves.png",
                 "vs_sigma.png"):
        assert (out / name).stat().st_size > 0, name
    # the table's numbers agree with `vaelab eval` on the same run, whatever K eval uses
    ev = vaelab("eval", str(out / "sigma-1"), "--iw-samples", "7", "--json", str(tmp_path / "e.json"))
    assert ev.returncode == 0, ev.stderr
    e = json.loads((tmp_path / "e.json").read_text())
    row = rows[1]
    assert float(row["neg_elbo"]) == pytest.approx(-e["elbo"], rel=1e-9)
    assert float(row["kl"]) == pytest.approx(e["kl"], rel=1e-9)
    assert float(row["mse"]) == pytest.approx(e["mse"], rel=1e-9)
    assert float(row["sharpness_samples"]) == pytest.approx(e["sharpness"]["samples"], rel=1e-9)
    assert float(row["within_997"]) == pytest.approx(e["radius_share"]["99.7"])
    assert float(row["sigma"]) == pytest.approx(1.0)
    summary = (out / "summary.md").read_text()
    assert "Larger σ puts fewer nats in the code" in summary
    assert "within r = 3.41, the radius that holds 99.7 % of N(0, I)" in summary  # a 2-D latent
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    # a different network in the same folder is refused, not silently mixed in
    r = vaelab("sigma-study", "--sigmas", "0.1", *[a if a != "64" else "32" for a in common])
    assert r.returncode == 2
    assert "different settings (hidden)" in r.stderr


@pytest.mark.slow
def test_eval_limit_scores_each_setting_on_the_first_n_test_images_as_eval_does(tmp_path, fashion_dir):
    out = tmp_path / "sigma"
    common = ["--sigmas", "0.3", "--dataset", "fashion-mnist", "--limit", "300", "--epochs", "1", "--hidden", "32",
              "--iw-samples", "2", "--out", str(out), "--quiet"]
    assert main(["sigma-study", *common, "--eval-limit", "50"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["config"]["eval_limit"] == 50
    assert study["rows"][0]["n_images"] == 50
    assert "Test split, the first 50 test images;" in (out / "index.html").read_text()
    assert main(["eval", str(out / "sigma-0.3"), "--limit", "50", "--iw-samples", "2", "--no-sample-quality",
                 "--quiet", "--json", str(tmp_path / "e.json")]) == 0
    alone, row = json.loads((tmp_path / "e.json").read_text()), study["rows"][0]
    assert (row["neg_elbo"], row["kl"], row["mse"]) == (-alone["elbo"], alone["kl"], alone["mse"])
    weights = (out / "sigma-0.3" / "model.safetensors").stat().st_mtime_ns
    assert main(["sigma-study", *common, "--eval-limit", "80"]) == 0  # the run is reused, its evaluation redone
    again = json.loads((out / "study.json").read_text())["rows"][0]
    assert (out / "sigma-0.3" / "model.safetensors").stat().st_mtime_ns == weights
    assert again["n_images"] == 80
    assert again["neg_elbo"] != row["neg_elbo"]
    assert "Test split, the first 80 test images;" in (out / "index.html").read_text()


@pytest.mark.slow
def test_sigma_study_with_conv_networks_and_a_learned_sigma(tmp_path, capsys, fashion_dir):
    out = tmp_path / "conv"
    assert main(["sigma-study", "--arch", "conv", "--hidden", "4", "--blocks", "1", "--sigmas", "0.3",
                 "--also", "learned", "--dataset", "fashion-mnist", "--limit", "640", "--epochs", "1",
                 "--iw-samples", "2", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert [r["setting"] for r in rows] == ["0.3", "learned"]
    config = json.loads((out / "sigma-learned" / "config.json").read_text())
    assert (config["model"]["arch"], config["model"]["hidden"], config["model"]["blocks"]) == ("conv", [4], 1)
    learned = rows[1]  # a learned σ ends near √MSE (5 steps here: started from the data, moving fast)
    assert 0.5 < float(learned["sigma"]) / math.sqrt(float(learned["mse"])) < 2.0
    assert (out / "manifolds.png").stat().st_size > 0
