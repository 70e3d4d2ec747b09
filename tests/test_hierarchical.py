"""The hierarchical VAE (--arch hierarchical): shapes for grey, colour and non-square images, the KL of the
hierarchy against its Monte-Carlo estimate, the IWAE bound against the ELBO, every likelihood, and real runs
(train, eval, report, resume) through the CLI's code paths."""

import json
import math

import numpy as np
import pytest
import torch

from vaelab import TrainConfig, load_run, resume, train
from vaelab.errors import ConfigError
from vaelab.models.hierarchical import HierarchicalVAE, ladder, size_widths
from vaelab.models.likelihoods import LIKELIHOODS
from vaelab.models.vae import VAE
from vaelab.training.build import check_hierarchies

SMALL = dict(arch="hierarchical", hidden=[16], latent_dim=4)


def _model(shape, likelihood="gaussian", seed=0, **kw) -> HierarchicalVAE:
    torch.manual_seed(seed)
    model = VAE.from_config(TrainConfig(**{**SMALL, "likelihood": likelihood, **kw}), shape)
    assert isinstance(model, HierarchicalVAE)
    return model.eval()


def _randomize_priors(model: HierarchicalVAE, seed: int = 1) -> None:
    """The prior nets start at N(0, I) (their last conv zeroed): give them weights, so p(z_i | z_<i) depends on
    z_<i and the KL's closed form is tested against a prior that is not standard."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for cell in model.decoder.cells:
            if cell.prior_net is not None:
                last = cell.prior_net.convs[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)
                last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.3)


@pytest.mark.parametrize(("shape", "latent"), [
    ((1, 28, 28), [(1, 1), (4, 4), (7, 7), (14, 14)]),
    ((3, 32, 32), [(1, 1), (4, 4), (8, 8), (16, 16)]),
    ((3, 64, 48), [(1, 1), (4, 3), (8, 6), (16, 12)]),
])
def test_shapes_of_everything(shape, latent):
    assert ladder(shape)[1] == latent
    model = _model(shape, groups=2)
    n_units = 2 * sum(4 * h * w for h, w in latent)
    assert model.latent_dim == n_units == sum(model.group_sizes)
    assert len(model.group_names()) == 2 * len(latent)
    x = torch.rand(3, *shape)
    t = model.terms(x)
    assert t.rec.shape == (3,)
    assert t.kl_per_dim.shape == (3, n_units)
    assert t.z.shape == (3, n_units)
    assert t.q.mean.shape == (3, n_units)
    assert t.sq_err.shape == (3,)
    k = model(x, samples=5)
    assert k.log_weights.shape == (5, 3)
    assert k.z.shape == (5, 3, n_units)
    assert k.kl_per_dim.shape == (3, n_units)
    assert model.encode(x).mean.shape == (3, model.code_dim) == (3, 4)
    assert model.decode_mean(model.encode(x).mean).shape == (3, *shape)
    assert model.decode_mean(model.sample_prior(2)).shape == (2, *shape)
    assert model.iwae_bound(x, 7, chunk=3).shape == (3,)
    assert model.unit_means(x).shape == (3, n_units)
    assert model.per_group(t.kl_per_dim).shape == (3, 2 * len(latent))
    with pytest.raises(ValueError, match="columns"):
        model.decode(torch.zeros(1, 5))


@pytest.mark.parametrize(("given", "saved"), [(None, 1), (2, 2), ("3", 3), ([2], 2), ("2,1,3", [2, 1, 3]),
                                               ([1, 1, 1], [1, 1, 1])])
def test_group_counts_are_saved_as_one_count_or_one_per_resolution(given, saved):
    assert TrainConfig(arch="hierarchical", groups=given).model.groups == saved


def test_a_count_per_resolution_stacks_that_many_groups_there():
    model = _model((1, 12, 12), groups=[2, 1, 3])  # latents at 1x1, 3x3 and 6x6
    assert model.group_names() == ["1x1", "1x1 #2", "3x3", "6x6", "6x6 #2", "6x6 #3"]
    assert model.group_sizes == [4, 4, 36, 144, 144, 144]
    _randomize_priors(model)
    # a group's prior depends on the draw of the group before it at the same size: change only the first 6x6
    # group's noise and the second one's prior moves, while every group above keeps its prior
    noise = torch.randn(2, model.latent_dim, generator=torch.Generator().manual_seed(0))
    moved = noise.clone()
    moved[:, 44:188] += 1.0
    with torch.no_grad():
        _, a = model.decoder(noise)
        _, b = model.decoder(moved)
    assert torch.equal(a.pm[:, :188], b.pm[:, :188])
    assert not torch.allclose(a.pm[:, 188:332], b.pm[:, 188:332])
    same = _model((1, 12, 12), groups=2)
    listed = _model((1, 12, 12), groups=[2, 2, 2])
    for (k, v), (k2, v2) in zip(same.state_dict().items(), listed.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(v, v2), k


@pytest.mark.parametrize(("groups", "names", "refined"), [
    ([1, 0, 2], ["1x1", "6x6", "6x6 #2"], [(12, 12)]),
    ([2, 1, 0], ["1x1", "1x1 #2", "3x3"], [(6, 6), (12, 12)]),
])
def test_a_zero_count_leaves_a_resolution_without_latents(groups, names, refined):
    """The decoder passes a resolution with no groups by, or refines up to the image from the last one that has
    some: fewer units, and the same contract as any hierarchy."""
    model = _model((1, 12, 12), groups=groups)
    assert model.group_names() == names
    assert model.decoder.refine_sizes == refined
    sizes = {"1x1": 4, "3x3": 36, "6x6": 144}
    assert model.group_sizes == [sizes[n.split()[0]] for n in names]
    _randomize_priors(model)
    x = torch.rand(3, 1, 12, 12)
    t = model.terms(x)
    assert t.kl_per_dim.shape == (3, model.latent_dim)
    assert torch.isfinite(t.loss).all()
    assert model.decode_mean(model.sample_prior(2)).shape == (2, 1, 12, 12)
    assert model.per_group(t.kl_per_dim).shape == (3, len(names))
    assert (model.iwae_bound(x, 50) >= -t.loss - 1e-3).all()  # the bound over K draws is at least the ELBO


def test_a_count_per_resolution_must_give_every_resolution_one():
    with pytest.raises(ConfigError, match=r"--groups gives 2 counts, but 64x48 images have 4 latent resolutions "
                                          r"\(1x1, 4x3, 8x6, 16x12\): give one count, or 4, top first"):
        _model((3, 64, 48), groups=[1, 2])


def test_group_counts_are_checked_against_the_data_before_training(tmp_path):
    data = tmp_path / "grey.npy"
    np.save(data, np.random.default_rng(0).random((20, 12, 12), np.float32))
    good = [TrainConfig(arch="hierarchical", dataset=str(data), groups=g) for g in (3, [1, 2, 1])]
    check_hierarchies([*good, TrainConfig(arch="conv", dataset="no-such-data")])  # nothing to load for conv
    with pytest.raises(ConfigError, match=r"--groups gives 4 counts, but 12x12 images have 3 latent resolutions"):
        check_hierarchies([*good, TrainConfig(arch="hierarchical", dataset=str(data), groups="1,1,1,1")])


def test_kl_per_dim_sums_to_the_monte_carlo_kl_of_the_hierarchy():
    model = _model((1, 12, 12), groups=2)  # latents at 1x1, 3x3 and 6x6, two groups each
    _randomize_priors(model)
    x = torch.rand(2, 1, 12, 12)
    k = 2000
    eps = torch.randn(k, 2, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_px_z, log_w, draws = model._weights(x, model.encoder(x), eps)
    mc = log_px_z - log_w  # (K, B) log q(z|x) − log p(z) at each draw
    closed = draws.kl_per_dim().sum(-1).view(k, 2)  # (K, B) Σ_i KL(q(z_i|x,z_<i) ‖ p(z_i|z_<i)) at each draw
    assert (draws.kl_per_dim() >= 0).all()
    assert closed.mean() > 1.0  # a prior unlike the posterior: a KL worth checking
    diff = (mc - closed).double()
    se = diff.std(0) / math.sqrt(k)
    assert (diff.mean(0).abs() < 4 * se + 1e-4).all(), (diff.mean(0), se)


def test_iwae_bound_matches_the_elbo_at_k1_and_exceeds_it_at_k50():
    model = _model((1, 12, 12), likelihood="bernoulli")
    _randomize_priors(model)
    x = (torch.rand(16, 1, 12, 12) > 0.5).float()
    eps = torch.randn(6, 16, model.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, eps, samples=6)
        chunked = model.iwae_bound(x, 6, chunk=4, eps=eps)
        assert torch.allclose(chunked, torch.logsumexp(out.log_weights, 0) - math.log(6), atol=1e-4)
        # K = 1 at the noise of draw j is that draw's log weight: −rec − (log q − log p), the ELBO's estimate
        for j in range(2):
            one = model.iwae_bound(x, 1, eps=eps[j:j + 1])
            t = model.terms(x, eps=eps[j])
            assert torch.allclose(one, out.log_weights[j], atol=1e-4)
            assert torch.allclose(t.z, out.z[j], atol=1e-6)  # the same z as the ELBO's terms at that noise
        # over many draws the K = 1 bound (the log weights) averages to −(rec + KL), the closed-form ELBO
        many = model(x, samples=400)
        elbo = -(many.rec + many.kl)  # (B,) −log p(x|z) and the KL averaged over the same 400 draws
        diff = (many.log_weights - elbo).double()  # (K, B): log p − log q − (−KL) at each draw, mean 0
        assert diff.mean().abs() < 4 * diff.mean(1).std() / math.sqrt(400) + 1e-4
        tight = model.iwae_bound(x, 50)
    assert tight.mean() > elbo.mean()


def test_decode_reads_the_top_code_or_every_groups_prior_noise():
    model = _model((3, 32, 32))
    _randomize_priors(model)
    x = torch.rand(2, 3, 32, 32)
    top = model.encode(x).mean
    padded = torch.cat([top, torch.zeros(2, model.latent_dim - model.code_dim)], 1)
    assert torch.equal(model.decode_mean(top), model.decode_mean(padded))
    u = model.sample_prior(2, torch.Generator().manual_seed(0), temperature=0.7)
    assert u.shape == (2, model.latent_dim)
    # keeping no group of q(z|x) is a prior draw (the top group's prior is N(0, I), its z is its noise)
    assert torch.allclose(model.decode_keeping(x, 0, u)[0], model.decode(u)[0], atol=1e-6)
    # keeping every group at zero noise decodes the posterior means
    means = model.decode_keeping(x, len(model.group_sizes), torch.zeros_like(u))[0]
    assert torch.allclose(means, model.decoder(torch.zeros_like(u), model.encoder(x))[0][0], atol=1e-6)
    assert not torch.allclose(model.decode_keeping(x, 1, u)[0], means)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_builds_and_gives_a_finite_loss(name):
    model = _model((3, 16, 12), likelihood=name).train()
    x = torch.randint(0, 256, (4, 3, 16, 12)).float() / 255
    if LIKELIHOODS[name].binary_only:
        x = (x > 0.5).float()
    loss = model(x).loss.mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.decoder.out.out_channels == model.likelihood.n_params * 3
    assert len(model.decode(model.sample_prior(2))) == model.likelihood.n_params


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_bf16_autocast_keeps_the_terms_in_float32_and_close():
    model = _model((3, 16, 16), likelihood="discretized-logistic")
    _randomize_priors(model)
    x = torch.rand(4, 3, 16, 16)
    eps = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(0))
    exact = model(x, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, eps)
    assert low.rec.dtype == low.kl_per_dim.dtype == torch.float32
    assert torch.allclose(low.loss, exact.loss, rtol=0.02)


@pytest.mark.parametrize(("settings", "match"), [
    (dict(arch="conv", groups=2), "--groups applies to --arch hierarchical"),
    (dict(arch="hierarchical", hidden=[32, 64]), "--hidden for --arch hierarchical is one width"),
    (dict(arch="hierarchical", groups=0), "--groups must be a positive integer, or one count per latent "
     "resolution"),
    (dict(arch="hierarchical", groups="2,x"), r"such as 1,2,4,1 \(0 leaves a resolution without latents: 1,2,4,0; "
     r"the top needs one\); got '2,x'"),
    (dict(arch="hierarchical", groups=[0, 1, 1]), r"the top needs one\); got \[0, 1, 1\]"),
    (dict(arch="hierarchical", groups=[1, -1, 1]), r"got \[1, -1, 1\]"),
])
def test_bad_settings_name_the_value_and_what_is_allowed(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**settings)


def test_defaults_fit_a_cpu():
    config = TrainConfig(arch="hierarchical")
    assert (config.model.hidden, config.model.blocks, config.model.groups) == ([64], 1, 1)
    for shape in ((1, 28, 28), (3, 32, 32), (3, 64, 64)):
        n = sum(p.numel() for p in VAE.from_config(config, shape).parameters())
        assert 2e5 < n < 2e6, (shape, n)


def _small_fashion(tmp_path, fashion):
    path = tmp_path / "fashion-small.npz"
    np.savez(path, x_train=fashion.train[:400], y_train=fashion.train_labels[:400],
             x_test=fashion.test[:200], y_test=fashion.test_labels[:200])
    return str(path)


def _cfg(tmp_path, name, dataset, **kw):
    return TrainConfig(**{**SMALL, "dataset": dataset, "epochs": 2, "batch_size": 50, "device": "cpu",
                          "out": str(tmp_path / name), **kw})


@pytest.mark.slow
def test_train_eval_report_and_bit_identical_resume_on_fashion(tmp_path, fashion):
    data = _small_fashion(tmp_path, fashion)
    settings = dict(likelihood="discretized-logistic")
    full = train(_cfg(tmp_path, "full", data, **settings), progress=False)
    train(_cfg(tmp_path, "part", data, epochs=1, **settings), progress=False)
    resumed = resume(tmp_path / "part", progress=False, epochs=2)
    for k, v in full.model.state_dict().items():
        assert v.equal(resumed.model.state_dict()[k]), k
    rows = [json.loads(line) for line in (full.path / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    groups = len(full.model.group_sizes)
    assert all(len(r["kl_per_group"]) == groups for r in test)
    assert all(sum(r["kl_per_group"]) == pytest.approx(r["kl"], rel=1e-6) for r in test)
    assert test[-1]["loss"] < test[0]["loss"]

    from vaelab.analysis.metrics import evaluate_run, table_rows
    from vaelab.analysis.reporting import write_report
    from vaelab.analysis.summary import network_lines

    run = load_run(full.path)
    numbers = evaluate_run(run, iw_samples=5, limit=100)
    assert numbers["log_px"] >= numbers["elbo"] - 1.0  # K = 5 is at least about as tight as the ELBO
    assert len(numbers["kl_per_group"]) == groups
    assert len(numbers["active_units_per_group"]) == groups
    assert sum(numbers["kl_per_group"]) == pytest.approx(numbers["kl"], rel=1e-6)
    rows = dict(table_rows(numbers))
    assert rows["KL per latent group (top first)"].startswith("1x1: ")
    assert "mutual_info" not in numbers  # the ELBO anatomy is defined for one latent group
    assert "decoder (top-down)" in "\n".join(network_lines(run.model, "hierarchical", [16], 1))
    from vaelab.explorer.core import Explorer

    explorer = Explorer(run, n_codes=50)  # the explorer's plane is the top group's
    assert explorer.latent_dim == run.model.code_dim == explorer.codes.shape[1]
    z = explorer.parse_z(",".join(["0.5"] * explorer.latent_dim))
    assert explorer.decode(z).shape[0] == 1
    page = write_report(run, tmp_path / "report", iw_samples=2, limit=100)
    assert (tmp_path / "report" / "levels.png").is_file()
    assert (tmp_path / "report" / "keeping.png").is_file()
    assert "levels" in page.read_text()


@pytest.mark.slow
def test_trains_on_shapes(tmp_path):
    run = train(_cfg(tmp_path, "shapes", "shapes", limit=300, likelihood="gaussian"), progress=False)
    test = [r for r in run.metrics if r["split"] == "test"]
    assert test[-1]["loss"] < test[0]["loss"]
    assert len(test[-1]["kl_per_group"]) == len(run.model.group_sizes)


@pytest.mark.slow
# vamp: the top prior's encoder pass is in the forward; --progressive: the closed groups' posterior networks get a
# zero gradient, which DistributedDataParallel must still find (four steps of 64: a resolution opens at each)
@pytest.mark.parametrize(("prior", "progressive"), [("standard", 0.0), ("vamp", 0.0), ("standard", 0.25)])
def test_two_torchrun_processes_train_the_model_one_process_trains(tmp_path, fashion, prior, progressive):
    import subprocess

    from test_distributed import LAUNCH_TIMEOUT, args, check_matches_one_process, config, env, torchrun_cmd

    data = tmp_path / "subset.npz"
    np.savez(data, x_train=fashion.train[:256], x_test=fashion.test[:100])
    kw = dict(arch="hierarchical", latent_dim=4, epochs=1, prior=prior, progressive=progressive)
    r = subprocess.run(torchrun_cmd(2, *args(data, tmp_path / "two", hidden=16, **kw)), capture_output=True,
                       text=True, timeout=LAUNCH_TIMEOUT, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    one = train(config(data, tmp_path / "one", hidden=[16], **kw), progress=False)
    check_matches_one_process(tmp_path / "two", one.path)


def test_every_groups_log_variance_is_bounded_as_the_single_latent_encoders():
    from vaelab.models.cells import gaussian_stats
    from vaelab.models.nets import LOGVAR_MAX, LOGVAR_MIN, bounded_logvar

    raw = torch.linspace(-40, 40, 81).view(1, 1, 81, 1)
    t = torch.cat([torch.zeros_like(raw), raw], 1)  # (1, 2Z, h, w): mean 0, log-variance `raw`
    assert torch.equal(gaussian_stats(t)[1], bounded_logvar(raw))
    model = _model((1, 12, 12), groups=2)
    with torch.no_grad():  # outputs far past the bounds: huge last-conv biases of every q and p net
        for i, cell in enumerate(model.decoder.cells):
            for net in (cell.posterior_net, cell.prior_net):
                if net is not None:
                    net.convs[-1].bias.fill_(60.0 if i % 2 else -60.0)
    draws = model.decoder(torch.zeros(2, model.latent_dim), model.encoder(torch.rand(2, 1, 12, 12)))[1]
    for lv in (draws.qlv, draws.plv[:, model.code_dim:]):  # the top group's prior is N(0, I)
        assert LOGVAR_MIN <= lv.min() < LOGVAR_MIN + 0.1  # both bounds reached, softly
        assert LOGVAR_MAX - 0.1 < lv.max() <= LOGVAR_MAX
    assert torch.isfinite(draws.kl_per_dim()).all()


def test_reconstruct_decodes_every_groups_posterior_mean():
    model = _model((1, 12, 12), groups=2)
    _randomize_priors(model)
    x = torch.rand(3, 1, 12, 12)
    recon = model.reconstruct(x)
    # the ELBO's terms at zero noise draw every group at its posterior mean: their squared error is recon's
    t = model.terms(x, eps=torch.zeros(3, model.latent_dim))
    assert torch.allclose((x - recon).square().flatten(1).sum(1), t.sq_err, rtol=1e-5)
    assert torch.equal(t.z, model.unit_means(x))
    top_only = model.decode_mean(model.encode(x).mean)  # the lower groups at their prior means
    assert (recon - top_only).abs().max() > 1e-3
    # a single-latent VAE reconstructs at its posterior mean, as before
    torch.manual_seed(0)
    flat = VAE.from_config(TrainConfig(arch="mlp", hidden=[16], latent_dim=3), (1, 12, 12)).eval()
    assert torch.equal(flat.reconstruct(x), flat.decode_mean(flat.encode(x).mean))


def test_reconstructions_figure_draws_every_group_from_its_posterior():
    from vaelab.analysis.views import posterior_mean_params, reconstructions

    model = _model((1, 12, 12), groups=2)
    _randomize_priors(model)
    x = torch.rand(3, 1, 12, 12)
    eps = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(0))
    draw = model.reconstruct_draw(x, eps)
    # the training pass's draw with the same noise: its squared error is the draw's
    assert torch.allclose((x - draw).square().flatten(1).sum(1), model.terms(x, eps=eps).sq_err, rtol=1e-5)
    assert (model.reconstruct_draw(x) - model.reconstruct_draw(x)).abs().max() > 1e-3  # fresh noise each time
    mean = model.likelihood.mean(posterior_mean_params(model, x))
    assert torch.allclose(mean, model.reconstruct(x), atol=1e-6)
    with torch.no_grad():  # every posterior's σ at its floor (log σ² = −20): a draw is the posterior mean
        for cell in model.decoder.cells:
            cell.posterior_net.convs[-1].bias[model.code_dim:].fill_(-60.0)
    rows = reconstructions(model, x, n_samples=2)
    assert [r[0] for r in rows] == ["input", "f(mean z)", "f(z), z~q #1", "f(z), z~q #2"]
    for _, images in rows[2:]:
        np.testing.assert_allclose(images, rows[1][1], atol=1e-3)
    with torch.no_grad():  # decoding a draw of the top group alone puts the others at their prior means
        top_only = model.decode_mean(model.encode(x).sample()).clamp(0, 1).numpy()
    assert np.abs(top_only - rows[1][1]).max() > 1e-2


def test_interpolations_run_between_the_codes_of_every_group():
    from vaelab.analysis.views import interpolations

    model = _model((1, 12, 12), groups=2)
    _randomize_priors(model)
    xa, xb = torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12)
    code = model.path_code(xa)
    assert code.shape == (2, model.latent_dim)
    torch.testing.assert_close(model.decode_mean(code), model.reconstruct(xa), atol=1e-5, rtol=1e-5)
    rows = interpolations(model, xa, xb, steps=5)
    assert len(rows) == 2
    assert rows[0][1].shape == (7, 1, 12, 12)  # x_a, 5 steps, x_b
    for p, (_, images) in enumerate(rows):  # the ends are the reconstructions of every group, not of the top alone
        np.testing.assert_allclose(images[1], model.reconstruct(xa[p:p + 1]).clamp(0, 1)[0].detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(images[5], model.reconstruct(xb[p:p + 1]).clamp(0, 1)[0].detach().numpy(), atol=1e-5)
    top_only = model.decode_mean(model.encode(xa).mean).clamp(0, 1).detach().numpy()
    assert np.abs(top_only[0] - rows[0][1][1]).max() > 1e-2


def test_eval_scores_reconstructions_from_every_group():
    from vaelab.analysis.metrics import evaluate, sharpness

    model = _model((1, 12, 12), groups=2)
    _randomize_priors(model)
    x = torch.rand(20, 1, 12, 12)
    numbers = evaluate(model, x, lambda t: t, iw_samples=2, batch_size=8)
    with torch.no_grad():
        recon = sharpness(model.reconstruct(x).clamp(0, 1))
        top_only = sharpness(model.decode_mean(model.encode(x).mean).clamp(0, 1))  # lower groups at prior means
    assert numbers["sharpness"]["recon"] == pytest.approx(recon, rel=1e-5)
    assert numbers["sharpness"]["recon"] != pytest.approx(top_only, rel=1e-3)


def test_eval_measures_what_the_top_groups_hold():
    from vaelab.analysis.metrics import evaluate, table_rows

    model = _model((1, 12, 12), groups=2)  # 6 groups: 1x1, 1x1, 3x3, 3x3, 6x6, 6x6
    _randomize_priors(model)
    x = torch.rand(20, 1, 12, 12)
    numbers = evaluate(model, x, lambda t: t, iw_samples=2, batch_size=8)
    keeping = numbers["mse_keeping"]
    assert len(keeping) == len(model.group_sizes) + 1
    with torch.no_grad():
        recon = (model.reconstruct(x) - x).square().mean().item()
        top = model.encode(x).mean  # the top group's posterior mean, every other group at its prior mean
        one = (model.decode_mean(top) - x).square().mean().item()
        prior = (model.decode_mean(torch.zeros_like(top)) - x).square().mean().item()
    assert keeping[-1] == pytest.approx(recon, rel=1e-5)
    assert keeping[1] == pytest.approx(one, rel=1e-5)
    assert keeping[0] == pytest.approx(prior, rel=1e-5)
    assert keeping[0] != pytest.approx(keeping[-1], rel=1e-3)
    row = dict(table_rows(numbers))["MSE keeping groups down to (rest at prior means)"]
    assert row.startswith(f"none: {keeping[0]:.4f} | 1x1: {keeping[1]:.4f} | 1x1 #2: ")
    from vaelab.analysis.views import level_rows

    rows = level_rows(model, x[:5], temperature=0.0)  # the report's `keeping` figure: the same decodings
    with torch.no_grad():
        np.testing.assert_allclose(rows[2][1], model.decode_mean(top[:5]).clamp(0, 1).numpy(), atol=1e-6)
        np.testing.assert_allclose(rows[-1][1], model.reconstruct(x[:5]).clamp(0, 1).numpy(), atol=1e-6)


def test_evaluation_in_smaller_passes_gives_the_same_numbers():
    from vaelab.models.objective import ObjectiveSettings, make_objective
    from vaelab.training.evaluation import Scored, elbo_metrics

    model = _model((1, 12, 12), groups=2)
    _randomize_priors(model)
    x = torch.rand(23, 1, 12, 12)
    scored = Scored(make_objective("iwae", ObjectiveSettings(iw_train=3)))  # K = 3 draws of its own per image
    whole = elbo_metrics(model, x, 10, lambda t: t, seed=5, scored=scored, rows=10)
    for rows in (1, 4):
        parts = elbo_metrics(model, x, 10, lambda t: t, seed=5, scored=scored, rows=rows)
        assert parts.keys() == whole.keys()
        for key, v in whole.items():
            assert parts[key] == pytest.approx(v, rel=1e-5, abs=1e-7), key
    other = elbo_metrics(model, x, 10, lambda t: t, seed=6, scored=scored, rows=4)
    assert other["loss"] != pytest.approx(whole["loss"], rel=1e-4)  # the seed matters, the passes do not


def test_evaluation_passes_are_sized_by_the_decoders_widest_activation(monkeypatch):
    from vaelab.training import evaluation
    from vaelab.training.evaluation import eval_rows, widest_activation_bytes

    cpu = torch.device("cpu")
    model = _model((1, 12, 12))
    row = widest_activation_bytes(model.decoder, torch.zeros(1, model.latent_dim))
    assert row == 16 * 12 * 12 * 4  # the full-size state: 16 channels of 12x12 float32
    monkeypatch.setattr(evaluation, "EVAL_BYTES", 3 * row + 1)
    assert eval_rows(model, 1000, cpu) == 3
    assert eval_rows(model, 2, cpu) == 2
    monkeypatch.undo()
    wide = _model((3, 64, 64), hidden=[64], net_version=2)  # 64 channels at 64x64: 1 MiB a row
    assert eval_rows(wide, 1000, cpu) == evaluation.EVAL_BYTES // 2**20 == 128
    narrow = _model((3, 64, 64), hidden=[64])  # 16 channels at 64x64: 256 KiB a row
    assert eval_rows(narrow, 1000, cpu) == 512
    for arch in ("mlp", "conv"):  # every default single-latent decoder up to 64x64 keeps whole batches of 1000
        torch.manual_seed(0)
        flat = VAE.from_config(TrainConfig(arch=arch), (3, 64, 64))
        assert eval_rows(flat, 1000, cpu) == 1000


def _fingerprint(model) -> tuple[str, int]:
    """(a digest of every state_dict key and shape, the number of values): equal for the same parameter set."""
    import hashlib

    items = sorted((k, list(v.shape)) for k, v in model.state_dict().items())
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    return digest, sum(v.numel() for v in model.state_dict().values())


def _macs(model, shape) -> int:
    """Multiply-adds of every convolution in one training pass (encoder and decoder) of one image."""
    total = 0

    def hook(conv, _inputs, out) -> None:
        nonlocal total
        total += out.numel() * conv.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.terms(torch.rand(1, *shape))
    for h in handles:
        h.remove()
    return total


# the state_dicts of net_version 2's design (every size at the full width, 20 channels per group), recorded from
# it before version 3 existed
VERSION_2 = [
    ((3, 64, 64), [64], "discretized-logistic", "011922634e80e01e", 359551),
    ((3, 32, 32), [64], "discretized-logistic", "884e34df1bcf6e62", 309087),
    ((1, 28, 28), [32], "bernoulli", "70bcb5229cd30c54", 82681),
    ((3, 64, 48), [64], "gaussian", "eb4f6e3b52a00e65", 336059),
]


@pytest.mark.parametrize(("shape", "hidden", "likelihood", "digest", "n"), VERSION_2)
def test_net_version_2_builds_the_old_parameter_set_and_3_a_cheaper_one(shape, hidden, likelihood, digest, n):
    for version in (1, 2):  # a config.json without net_version is version 1: the same hierarchy
        old = _model(shape, likelihood, hidden=hidden, latent_dim=20, net_version=version)
        assert _fingerprint(old) == (digest, n)
    new = _model(shape, likelihood, hidden=hidden, latent_dim=20)
    assert new.group_sizes == old.group_sizes  # the same latents
    assert sum(v.numel() for v in new.state_dict().values()) < 0.95 * n
    ratio = _macs(new, shape) / _macs(old, shape)
    assert ratio < (0.55 if max(shape[1:]) == 64 else 0.85), ratio  # 64x64: 0.50, 64x48: 0.52, 32x32: 0.77, 28: 0.80


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_net_version_3_is_version_2_for_the_single_latent_nets(arch):
    shape = (3, 32, 32)
    two, three = (VAE.from_config(TrainConfig(arch=arch, net_version=v), shape) for v in (2, 3))
    assert _fingerprint(two) == _fingerprint(three)
    assert TrainConfig(arch=arch).model.net_version == 3


def test_sizes_above_the_latents_halve_their_width_per_doubling():
    sizes = ladder((3, 64, 64))[0]  # 64, 32, 16, 8, 4
    assert size_widths(sizes, 64) == [16, 32, 64, 64, 64]
    assert size_widths(sizes, 64, version=2) == [64] * 5
    assert size_widths(sizes, 128) == [32, 64, 128, 128, 128]
    assert size_widths(sizes, 24) == [16, 16, 24, 24, 24]  # never below MIN_WIDTH ...
    assert size_widths(sizes, 8) == [8] * 5  # ... nor above the width
    assert size_widths(ladder((3, 128, 96))[0], 64) == [16, 16, 32, 64, 64, 64]  # 128x96 .. 4x3
    assert size_widths(ladder((1, 12, 12))[0], 64) == [64, 64, 64]  # nothing above 16 px: unchanged
    model = _model((3, 64, 64), hidden=[64])
    assert model.decoder.out.in_channels == 16
    assert [b[0].convs[0].in_channels for b in model.decoder.refine] == [32, 16]
    x = torch.rand(2, 3, 64, 64)
    acts = model.encoder(x)
    assert [acts[s].shape[1] for s in [(32, 32), (16, 16), (1, 1)]] == [32, 64, 64]


def test_a_run_saved_with_net_version_2_loads_and_evaluates_as_it(tmp_path):
    from vaelab.runs import CONFIG, WEIGHTS, load_run, save_weights

    shape = (3, 32, 32)
    old = TrainConfig(**{**SMALL, "hidden": [32], "net_version": 2, "data_shape": list(shape)})
    torch.manual_seed(0)
    model = VAE.from_config(old, shape)
    _randomize_priors(model)
    save_weights(model, tmp_path / WEIGHTS)
    (tmp_path / CONFIG).write_text(json.dumps(old.to_dict()))
    run = load_run(tmp_path)
    assert run.config.model.net_version == 2
    assert _fingerprint(run.model) == _fingerprint(model) != _fingerprint(_model(shape, hidden=[32]))
    x = torch.rand(3, *shape)
    eps = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(run.model(x, eps).loss, model.eval()(x, eps).loss)
        torch.testing.assert_close(run.model.reconstruct(x), model.reconstruct(x))


@pytest.mark.slow
def test_a_net_version_2_run_resumes_bit_identically_as_it(tmp_path, fashion):
    data = _small_fashion(tmp_path, fashion)
    settings = dict(hidden=[32], net_version=2)  # width 32: version 3 would narrow 28x28 to 16 channels
    full = train(_cfg(tmp_path, "full", data, **settings), progress=False)
    train(_cfg(tmp_path, "part", data, epochs=1, **settings), progress=False)
    resumed = resume(tmp_path / "part", progress=False, epochs=2)
    assert resumed.config.model.net_version == 2
    assert _fingerprint(resumed.model) == _fingerprint(_model((1, 28, 28), hidden=[32], net_version=2))
    for k, v in full.model.state_dict().items():
        assert v.equal(resumed.model.state_dict()[k]), k
