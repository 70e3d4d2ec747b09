"""Sampling from the codes: the EM fit of a Gaussian mixture (analysis/aggregate.py) recovering a known mixture,
the choice of its size on held-out codes, its cache in the run folder, and `vaelab sample` / vaelab.sample on a
real trained run, with its one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vaelab
from conftest import vaelab_cmd
from trained_runs import trained_run
from vaelab.analysis import aggregate
from vaelab.analysis.aggregate import CACHE_FILE, Mixture, choose_mixture, fit_mixture
from vaelab.cli import main
from vaelab.errors import ConfigError

TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
TRUE_MEANS = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
TRUE_COVS = torch.stack([torch.tensor([[1.0, 0.6], [0.6, 1.0]]), torch.diag(torch.tensor([0.25, 2.0])),
                         torch.tensor([[0.5, -0.2], [-0.2, 0.3]])]).double()


def _true_mixture() -> Mixture:
    return Mixture(TRUE_WEIGHTS, TRUE_MEANS, torch.linalg.cholesky(TRUE_COVS))


def _draws(n: int = 6000, seed: int = 0) -> torch.Tensor:
    return _true_mixture().sample(n, torch.Generator().manual_seed(seed))


def _matched(mix: Mixture) -> list[int]:
    """The fitted component nearest to each true one."""
    return [int(torch.cdist(m[None], mix.means).argmin()) for m in TRUE_MEANS]


def test_em_recovers_a_known_mixture():
    mix = fit_mixture(_draws(), 3, "full")
    idx = _matched(mix)
    assert sorted(idx) == [0, 1, 2]
    torch.testing.assert_close(mix.weights[idx], TRUE_WEIGHTS, atol=0.02, rtol=0)
    torch.testing.assert_close(mix.means[idx], TRUE_MEANS, atol=0.08, rtol=0)
    covs = mix.chol @ mix.chol.transpose(1, 2)
    torch.testing.assert_close(covs[idx], TRUE_COVS, atol=0.12, rtol=0)


def test_diagonal_em_recovers_the_variances_of_a_diagonal_mixture():
    truth = Mixture(TRUE_WEIGHTS, TRUE_MEANS, torch.diag_embed(torch.tensor([[1.0, 0.5], [0.5, 1.5], [0.3, 0.3]],
                                                                            dtype=torch.float64)))
    mix = fit_mixture(truth.sample(6000, torch.Generator().manual_seed(1)), 3, "diag")
    idx = _matched(mix)
    torch.testing.assert_close(torch.diagonal(mix.chol, dim1=1, dim2=2)[idx],
                               torch.diagonal(truth.chol, dim1=1, dim2=2), atol=0.06, rtol=0)
    assert torch.count_nonzero(mix.chol - torch.diag_embed(torch.diagonal(mix.chol, dim1=1, dim2=2))) == 0


def test_log_prob_is_the_mixture_density_of_torch_distributions():
    mix = _true_mixture()
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=TRUE_WEIGHTS),
        torch.distributions.MultivariateNormal(TRUE_MEANS, covariance_matrix=TRUE_COVS))
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    torch.testing.assert_close(mix.log_prob(x), ref.log_prob(x))


def test_draws_follow_the_mixture_and_temperature_scales_them_around_the_means():
    mix = _true_mixture()
    z = mix.sample(100_000, torch.Generator().manual_seed(0))
    mean = (TRUE_WEIGHTS[:, None] * TRUE_MEANS).sum(0)
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    cold = mix.sample(100_000, torch.Generator().manual_seed(0), temperature=0.5)
    comp = torch.multinomial(TRUE_WEIGHTS, 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cold - TRUE_MEANS[comp], 0.5 * (z - TRUE_MEANS[comp]))  # same draws, half spread
    same = mix.sample(10, torch.Generator().manual_seed(5))
    torch.testing.assert_close(same, mix.sample(10, torch.Generator().manual_seed(5)), rtol=0, atol=0)


def test_the_held_out_codes_choose_enough_components():
    mix, scores = choose_mixture(_draws(3000), components=(1, 2, 3, 5))
    assert set(scores) == {1, 2, 3, 5}
    assert scores[3] > scores[2] + 0.3 > scores[1] + 0.6  # nats per held-out code
    assert mix.k in (3, 5)
    assert abs(scores[mix.k] - scores[3]) < 0.05  # more components than needed gain nothing on held-out codes


def test_fit_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="full or diag"):
        fit_mixture(_draws(10), 1, "spherical")
    with pytest.raises(ConfigError, match="at least k codes"):
        fit_mixture(_draws(3), 5)


# -------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir):
    return trained_run(tmp_path_factory)


def test_sample_draws_seeded_images_from_the_prior_and_the_aggregate(run_dir):
    prior = vaelab.sample(run_dir, 12, "prior", seed=1)
    agg = vaelab.sample(run_dir, 12, "aggregate", seed=1)
    for images in (prior, agg):
        assert images.shape == (12, 1, 28, 28)
        assert images.dtype == np.float32
        assert images.min() >= 0
        assert images.max() <= 1
    np.testing.assert_array_equal(agg, vaelab.sample(run_dir, 12, "aggregate", seed=1))
    assert not np.array_equal(agg, vaelab.sample(run_dir, 12, "aggregate", seed=2))
    assert not np.array_equal(prior, agg)
    run = vaelab.load_run(run_dir)
    codes = aggregate.training_codes(run)
    mix, info = aggregate.aggregate_mixture(run)
    assert info["n_codes"] == len(codes) == 4000  # the run trained on its first 4000 images
    assert info["chosen"] == mix.k in aggregate.COMPONENTS
    # the mixture describes the codes better than the prior N(0, I) does
    assert mix.log_prob(codes).mean() > run.model.prior.log_prob(codes.float()).double().mean()
    # temperature 0 decodes the component means
    cold = vaelab.sample(run, 6, "aggregate", temperature=1e-9, seed=0)
    means = aggregate.decode_images(run.model, mix.means.float()).numpy()
    assert all(np.abs(means - img).max(axis=(1, 2, 3)).min() < 1e-4 for img in cold)


def test_the_fit_is_cached_and_refitted_when_the_weights_change(run_dir, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / CACHE_FILE).unlink(missing_ok=True)
    run = vaelab.load_run(copy)
    mix, _ = aggregate.aggregate_mixture(run)
    assert (copy / CACHE_FILE).is_file()
    fits = []
    monkeypatch.setattr(aggregate, "choose_mixture", lambda codes: fits.append(1) or (mix, {mix.k: 0.0}))
    again, _ = aggregate.aggregate_mixture(run)  # from the file
    assert fits == []
    torch.testing.assert_close(again.means, mix.means, rtol=0, atol=0)
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    next(iter(state.values())).add_(0.01)
    save_file(state, copy / "model.safetensors")  # the weights change (a resumed run): the fit is redone
    aggregate.aggregate_mixture(vaelab.load_run(copy))
    assert fits == [1]


def test_cli_writes_a_png_grid_and_an_npy_array(run_dir, tmp_path, capsys):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "-n", "10", "--from", "aggregate", "--seed", "3", "--temperature", "0.8",
                 "--out", str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    cols = math.ceil(math.sqrt(10))  # 4 per row, 3 rows, one-pixel gaps
    with Image.open(png) as im:
        assert im.size == (cols * 29 + 1, 3 * 29 + 1)
        grid = np.asarray(im, dtype=np.float32) / 255  # the PNG shows the same images
    assert main(["sample", str(run_dir), "-n", "10", "--from", "aggregate", "--seed", "3", "--temperature", "0.8",
                 "--out", str(npy)]) == 0
    arr = np.load(npy)
    np.testing.assert_array_equal(arr, vaelab.sample(run_dir, 10, "aggregate", 0.8, seed=3))
    np.testing.assert_allclose(grid[1:29, 1:29], arr[0, 0], atol=1 / 255 + 1e-6)


BAD = [
    (["-n", "0"], "-n must be an integer >= 1; got 0"),
    (["--from", "posterior"], "--from must be one of prior, aggregate; got 'posterior'"),
    (["--temperature", "0"], "--temperature must be a finite number > 0; got 0.0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0; got -1"),
    (["--out", "{tmp}/s.jpg"], "--out must end in .png (a grid) or .npy (the array)"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[a[0] for a, _ in BAD])
def test_bad_arguments_get_one_line_and_no_file(run_dir, tmp_path, capsys, args, needle):
    argv = ["sample", str(run_dir), "--out", str(tmp_path / "s.png"), *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert needle in err
    assert list(tmp_path.iterdir()) == []


def test_eval_with_bad_temperatures_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--temperatures", "1,0", "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--temperatures must be numbers > 0 separated by commas, such as 1,0.8,0.6; got '0'" in err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.png")]) == 2
    assert "not a vaelab run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_reports_sample_quality_and_the_report_shows_it(run_dir, tmp_path):
    out = tmp_path / "e.json"
    r = subprocess.run([*vaelab_cmd(), "eval", str(run_dir), "--limit", "500", "--iw-samples", "2", "--json",
                        str(out), "--quiet", "--temperatures", "1,0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    sq = json.loads(out.read_text())["sample_quality"]
    for name in ("prior", "aggregate", "reconstructions", "data"):
        assert set(sq[name]) == {"fd", "precision", "recall"}
        assert 0 <= sq[name]["precision"] <= 1
        assert 0 <= sq[name]["recall"] <= 1
    assert sq["n_images"] == 500
    assert sq["judge"] == "classifier (10 classes)"
    # the floor: training images lie closer to the test images than anything the model makes
    assert sq["data"]["fd"] < min(sq[name]["fd"] for name in ("prior", "aggregate", "reconstructions"))
    assert "not Inception FID" in r.stdout
    cooled = sq["prior_temperature"]["0.5"]  # the same draws, their spread halved: other images, other scores
    assert set(cooled) == {"fd", "precision", "recall"}
    assert cooled["fd"] != sq["prior"]["fd"]
    assert "prior samples, T = 0.5" in r.stdout
    skipped = vaelab.evaluate(run_dir, limit=200, iw_samples=2, progress=False, sample_quality=False)
    assert "sample_quality" not in skipped
    html = vaelab.report(run_dir, tmp_path / "r", iw_samples=2, limit=300, progress=False,
                         temperatures=[1.0, 0.8]).read_text()
    assert "prior samples, T = 0.8" in html
    assert 'id="aggregate"' in html
    assert "aggregate samples (K = " in html


@pytest.mark.slow
def test_a_hierarchys_aggregate_draw_takes_the_lower_groups_from_their_priors(tmp_path_factory, fashion_dir):
    run = vaelab.load_run(trained_run(tmp_path_factory, arch="hierarchical", hidden=[16], latent_dim=4, limit=300,
                                      epochs=1, batch_size=32))
    model = run.model
    mix, _ = aggregate.aggregate_mixture(run)
    z = aggregate.draw_codes(run, 400, "aggregate", temperature=0.7, seed=3)
    assert z.shape == (400, model.latent_dim)
    assert model.latent_dim > model.code_dim
    top = mix.sample(400, torch.Generator().manual_seed(3), 0.7).float()
    torch.testing.assert_close(z[:, :model.code_dim], top)  # the top group's code from the mixture
    lower = z[:, model.code_dim:]  # the lower groups' standardized noise, N(0, T² I)
    assert abs(lower.mean().item()) < 0.01
    assert lower.std().item() == pytest.approx(0.7, abs=0.01)
    images = aggregate.sample_images(run, 400, "aggregate", temperature=0.7, seed=3)
    at_prior_means = aggregate.decode_images(model, top).numpy()  # the lower groups at their prior means
    assert np.abs(images - at_prior_means).mean() > 1e-3
