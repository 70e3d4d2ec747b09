"""vaelab sweep: --set parsing and validation, the grid, the comparison page, reuse and resume on real data, and
the batched ensemble against runs trained alone."""

from __future__ import annotations

import csv
import json
import math

import pytest

import vaelab
from vaelab.analysis.sweep import SweepConfig, parse_set
from vaelab.analysis.sweep_page import against_field, rate_distortion, value_text, winners
from vaelab.cli import main
from vaelab.errors import ConfigError
from vaelab.runs import load_run

TINY = ["--dataset", "fashion-mnist", "--limit", "300", "--epochs", "1", "--hidden", "32", "--iw-samples", "2",
        "--quiet"]


@pytest.mark.parametrize(("text", "name", "values"), [
    ("sigma=0.1,0.3,learned", "sigma", ["0.1", "0.3", "learned"]),
    ("beta=1,4", "beta", [1.0, 4.0]),
    ("latent-dim=2,20", "latent_dim", [2, 20]),
    ("--latent_dim=2", "latent_dim", [2]),
    ("hidden=400/512,256", "hidden", ["400", "512,256"]),
    ("cuda-graph=true,no", "cuda_graph", [True, False]),
])
def test_parse_set_reads_values_as_the_train_flag_does(text, name, values):
    assert parse_set(text) == (name, values)


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "sigmaa=0.1"], "--set: 'sigmaa' is not a training setting; allowed: dataset, "),
    (["--set", "out=a,b"], "'out' is not a training setting"),
    (["--set", "beta=1,x"], "--set beta: each value must be a number; got 'x'"),
    (["--set", "latent-dim=2.5"], "--set latent-dim: each value must be an integer; got '2.5'"),
    (["--set", "sigma=0.1,-1"], "--sigma must be a number > 0"),
    (["--set", "arch=mlp,rnn"], "--arch must be one of mlp, conv"),
    (["--set", "sigma"], "--set must be FIELD=V1,V2,..."),
    (["--set", "sigma=0.1", "--sigma", "0.3"], "--sigma is swept by --set sigma=...; give it there only"),
    (["--set", "sigma=0.1", "--set", "sigma=0.3"], "--set sigma is given twice"),
    (["--set", "sigma=0.1,0.3", "--set", "beta=1", "--zip"], "each must list as many values; got sigma: 2, beta: 1"),
    ([], "a sweep needs at least one --set"),
    (["--set", "sigma=0.1", "--eval-limit", "0"], "--eval-limit must be an integer > 0; got 0"),
    (["--set", "sigma=0.1", "--eval-limit", "-3"], "--eval-limit must be an integer > 0; got -3"),
    (["--set", "sigma=0.1", "--eval-limit", "1.5"], "argument --eval-limit: invalid int value: '1.5'"),
    (["--arch", "hierarchical", "--dataset", "shapes", "--set", "groups=1/1,2"], "--groups gives 2 counts, but "
     "64x64 images have 4 latent resolutions (1x1, 4x4, 8x8, 16x16): give one count, or 4, top first"),
    (["--arch", "hierarchical", "--dataset", "shapes", "--progressive", "1", "--set", "epochs=4,3"],
     "--progressive 1 opens the last of the 4 latent resolutions (1x1, 4x4, 8x8, 16x16) after 3 epochs, but the "
     "run has --epochs 3: give more --epochs or a smaller --progressive"),
])
def test_bad_sweeps_are_one_line_errors_before_any_training(args, needle, capsys, tmp_path):
    assert main(["sweep", *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1
    assert err.startswith("vaelab: error: ")
    assert not (tmp_path / "s").exists()  # nothing written


def test_grid_and_zip_name_each_run_by_its_settings(tmp_path):
    grid = SweepConfig(["beta=1,4", "latent-dim=2,8"], out=str(tmp_path), hidden="16")
    labels = [p.label for p in grid.points()]
    assert labels == ["beta=1,latent-dim=2", "beta=1,latent-dim=8", "beta=4,latent-dim=2", "beta=4,latent-dim=8"]
    last = grid.points()[-1].config
    assert (last.optim.beta, last.model.latent_dim, last.model.hidden) == (4.0, 8, [16])
    assert last.runtime.out == str(tmp_path / "beta=4,latent-dim=8")
    paired = SweepConfig({"sigma": ["0.1", "0.3"], "seed": [0, 1]}, zip=True, out=str(tmp_path))
    assert [p.label for p in paired.points()] == ["sigma=0.1,seed=0", "sigma=0.3,seed=1"]
    assert [p.config.model.sigma for p in paired.points()] == ["0.1", "0.3"]
    with pytest.raises(ConfigError, match="--latent-dim must be an integer > 0"):
        SweepConfig({"latent_dim": [2, 0]}, out=str(tmp_path))


def test_value_text():
    assert [value_text(v) for v in (0.1, 4.0, 20, "learned", [512, 256], True, "a/b.npz")] == [
        "0.1", "4", "20", "learned", "512-256", "true", "a_b.npz"]


def _row(run, loss, rate, **more):
    return {"run": run, "loss": loss, "rate": rate, "distortion": loss - rate, "log_px": -loss + 1, "mse": 0.01,
            "active_units": 2, "sharpness_samples": 0.1, **more}


def test_winners_name_the_best_run_on_each_number():
    rows = [_row("sigma=0.1", 120.0, 10.0, active_units=5), _row("sigma=1", 110.0, 3.0, mse=0.02),
            _row("sigma=3", 130.0, 1.0, mse=0.03, sharpness_samples=0.05),
            {"run": "sigma=9", "loss": None, "error": "diverged"}]
    said = winners(rows)
    assert "lowest −ELBO: sigma=1 (110.00)" in said
    assert "highest IWAE log p(x): sigma=1 (-109.00)" in said
    assert "lowest MSE: sigma=0.1 (0.01000)" in said
    assert "lowest rate (fewest nats in the code): sigma=3 (1.00)" in said
    assert "most active units: sigma=0.1 (5)" in said
    assert "sharpest prior samples: sigma=0.1 and sigma=1 (0.10000)" in said


def test_rate_distortion_plane_draws_failed_runs_out(tmp_path):
    rows = [{**_row(f"sigma={s},beta={b}", 100 + 10 * s + b, 5 - s), "sigma": s, "beta": b}
            for s in (0.1, 1.0) for b in (1.0, 2.0)] + [{"run": "x", "loss": None, "sigma": 3.0, "beta": 1.0}]
    path = rate_distortion(rows, ["sigma", "beta"], tmp_path / "rd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_with_infinite_numbers_are_listed_but_not_drawn_or_ranked(tmp_path):
    """A run can end with an infinite loss without stopping (a tiny σ after a few steps): the figures leave it
    out (matplotlib refuses infinite axis limits) and no sentence names it the best."""
    rows = [{**_row("sigma=0.1", 100.0, 5.0), "sigma": 0.1},
            {**_row("sigma=1e-4", -math.inf, math.inf), "sigma": 1e-4, "distortion": -math.inf}]
    for draw in (lambda r, p: rate_distortion(r, ["sigma"], p), lambda r, p: against_field(r, "sigma", ["sigma"], p)):
        for subset in (rows, rows[1:]):
            assert draw(subset, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any("sigma=1e-4" in line for line in winners(rows))
    assert any("sigma=0.1" in line for line in winners(rows))


def _rows(out):
    return list(csv.DictReader((out / "table.csv").read_text().splitlines()))


@pytest.mark.slow
def test_sigma_sweep_end_to_end_reuses_runs(tmp_path, fashion_dir, capsys):
    out = tmp_path / "sweep"
    # trained as one batched ensemble; run again below without --batched, every run is reused all the same
    assert main(["sweep", "--set", "sigma=0.05,0.1,0.3,1", "--batched", *TINY, "--out", str(out)]) == 0
    assert [r["action"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["trained"] * 4
    rows = _rows(out)
    assert [r["run"] for r in rows] == ["sigma=0.05", "sigma=0.1", "sigma=0.3", "sigma=1"]
    assert {"run", "sigma", "loss", "rate", "distortion", "log_px", "active_units", "mse"} <= set(rows[0])
    for r in rows:
        run = load_run(out / r["run"])  # an ordinary run directory
        assert run.config.model.sigma == r["sigma"]
        assert run.last()["epoch"] == 1
        numbers = json.loads((out / r["run"] / "eval.json").read_text())  # `vaelab eval`'s numbers
        assert float(r["loss"]) == pytest.approx(float(r["rate"]) + float(r["distortion"]), rel=1e-12)
        assert float(r["loss"]) == pytest.approx(-numbers["elbo"], rel=1e-12)
        assert float(r["rate"]) == pytest.approx(numbers["kl"], rel=1e-12)
    # a smaller σ costs more nats per image for the same images: −log N(x; f, σ²) grows as σ falls below √MSE
    losses = [float(r["loss"]) for r in rows]
    assert losses[0] > losses[1] > losses[2]
    html = (out / "index.html").read_text()
    assert '<figure id="rate_distortion"><img alt="The rate–distortion plane" src="data:image/png;base64,' in html
    assert 'id="vs_sigma"' in html
    assert 'id="samples"' in html
    assert "lowest −ELBO: " in html
    assert main(["info", str(out / "sigma=0.3")]) == 0
    weights = out / "sigma=0.1" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", "--set", "sigma=0.05,0.1,0.3,1", *TINY, "--out", str(out)]) == 0  # again: all reused
    assert weights.stat().st_mtime_ns == before
    record = json.loads((out / "sweep.json").read_text())
    assert [r["action"] for r in record["runs"]] == ["reused"] * 4
    assert [float(r["loss"]) for r in _rows(out)] == losses


@pytest.mark.slow
def test_eval_limit_evaluates_the_first_n_test_images_and_redoes_an_evaluation_at_another(tmp_path, fashion_dir,
                                                                                          capsys):
    out, run = tmp_path / "sweep", tmp_path / "sweep" / "sigma=0.3"
    assert main(["sweep", "--set", "sigma=0.3", *TINY, "--eval-limit", "50", "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["config"]["eval_limit"] == 50
    line = record["runs"][0]["eval"]
    assert (line["limit"], line["numbers"]["n_images"]) == (50, 50)
    assert "Test split, the first 50 test images, " in (out / "index.html").read_text()
    # the numbers of `vaelab eval RUN --limit 50` at the same K
    assert main(["eval", str(run), "--limit", "50", "--iw-samples", "2", "--no-sample-quality", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    alone = json.loads((tmp_path / "e.json").read_text())
    assert (alone["elbo"], alone["kl"], alone["mse"]) == (line["numbers"]["elbo"], line["numbers"]["kl"],
                                                          line["numbers"]["mse"])
    weights = (run / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", "--set", "sigma=0.3", *TINY, "--eval-limit", "80", "--out", str(out)]) == 0
    again = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert again["action"] == "reused"
    assert (run / "model.safetensors").stat().st_mtime_ns == weights
    assert (again["eval"]["limit"], again["eval"]["numbers"]["n_images"]) == (80, 80)  # evaluated again
    assert again["eval"]["numbers"]["elbo"] != line["numbers"]["elbo"]
    assert json.loads((run / "eval.json").read_text())["n_images"] == 80
    assert main(["sweep", "--set", "sigma=0.3", *TINY, "--out", str(out)]) == 0  # no limit: every test image
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["eval"]["numbers"]["n_images"] == 10000
    assert "Test split, all 10000 test images, " in (out / "index.html").read_text()


@pytest.mark.slow
def test_beta_by_latent_grid_resumes_shorter_runs(tmp_path, fashion_dir):
    out = tmp_path / "grid"
    common = {"dataset": "fashion-mnist", "limit": 300, "hidden": "32", "iw_samples": 2, "out": str(out),
              "progress": False}
    vaelab.sweep({"beta": [1, 4], "latent_dim": [2, 5]}, epochs=1, **common)
    assert len(_rows(out)) == 4
    first = json.loads((out / "sweep.json").read_text())
    assert [r["action"] for r in first["runs"]] == ["trained"] * 4
    (out / "beta=4,latent-dim=5" / "config.json").unlink()  # as if that run never started
    for name in ("model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "eval.json"):
        (out / "beta=4,latent-dim=5" / name).unlink()
    page = vaelab.sweep({"beta": [1, 4], "latent_dim": [2, 5]}, epochs=2, **common)  # a longer budget
    record = json.loads((out / "sweep.json").read_text())
    assert [r["action"] for r in record["runs"]] == ["resumed"] * 3 + ["trained"]
    for r in _rows(out):
        run = load_run(out / r["run"])
        assert [m["epoch"] for m in run.metrics if m["split"] == "test"] == [1, 2]
        assert run.config.optim.beta == float(r["beta"])
        assert run.model.latent_dim == int(r["latent-dim"])
        assert math.isclose(float(r["loss"]), float(r["rate"]) + float(r["distortion"]), rel_tol=1e-12)
    assert page.read_text().count("data:image/png;base64,") == 4  # the plane, one per field, the samples


def test_runs_that_share_network_shapes_share_an_ensemble():
    from vaelab import TrainConfig
    from vaelab.training.ensemble import group_key, groups

    base = TrainConfig(dataset="fashion-mnist", hidden=[32], out="x")
    configs = [base.replace(sigma="0.1"), base.replace(sigma="1", beta=4.0, seed=3, lr=3e-3),
               base.replace(sigma="learned"), base.replace(sigma="0.1", hidden=[16]),
               base.replace(sigma=None, binarize="dynamic", likelihood="bernoulli"),
               base.replace(sigma="0.3", free_bits=0.5, kl_warmup=1.0)]
    assert group_key(configs[4]) is None  # dynamic binarization draws inside the step: trained alone
    conv = group_key(base.replace(arch="conv", sigma="0.1"))  # conv runs batch among themselves (stacked_conv)
    assert conv is not None
    assert conv != group_key(configs[0])
    assert groups(configs) == [[0, 1, 5], [2], [3], [4]]


@pytest.mark.slow
def test_a_learned_sigma_member_counts_its_sigma_gradient_as_the_run_alone(tmp_path, fashion_dir):
    """A learned σ lies outside the stacked networks: its gradient still counts in the member's guard (the
    gradient-norm columns), and the member still equals its run alone."""
    from vaelab.training.ensemble import train_ensemble

    common = {"dataset": "fashion-mnist", "limit": 256, "hidden": "16", "batch_size": 64, "epochs": 1,
              "sigma": "learned", "device": "cpu"}
    configs = [vaelab.TrainConfig(seed=s, out=str(tmp_path / f"m{s}"), **common) for s in (0, 1)]
    members = train_ensemble(configs, progress=False)
    alone = vaelab.train(configs[1].replace(out=str(tmp_path / "alone")), progress=False)
    m, r = (next(x for x in run.metrics if x["split"] == "train") for run in (members[1], alone))
    for key in ("grad_norm_mean", "grad_norm_max", "loss", "sigma"):
        assert m[key] == pytest.approx(r[key], rel=1e-4), key


@pytest.mark.slow
def test_an_ensemble_member_equals_the_run_trained_alone(tmp_path, fashion_dir):
    import torch
    from safetensors.torch import load_file

    common = {"dataset": "fashion-mnist", "limit": 384, "hidden": "48", "batch_size": 64, "epochs": 2}
    out = tmp_path / "sweep"
    vaelab.sweep({"sigma": ["0.1", "0.3"], "seed": [0, 1]}, zip=True, batched=True, iw_samples=2, out=str(out),
                 progress=False, beta=2.0, **common)
    record = json.loads((out / "sweep.json").read_text())
    assert [r["action"] for r in record["runs"]] == ["trained", "trained"]
    alone = vaelab.train(vaelab.TrainConfig(sigma="0.3", seed=1, beta=2.0, out=str(tmp_path / "alone"), **common),
                         progress=False)
    member = load_run(out / "sigma=0.3,seed=1")
    a, b = load_file(out / "sigma=0.3,seed=1" / "model.safetensors"), load_file(tmp_path / "alone" /
                                                                                  "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # 12 steps apart only in the rounding of batched matmuls
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for m, r in zip(member.metrics, alone.metrics, strict=True):
        assert (m["epoch"], m["split"]) == (r["epoch"], r["split"])
        assert m.keys() == r.keys()  # the same record as a run alone writes
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert m["kl"] == pytest.approx(r["kl"], rel=1e-5)
    # its own RNG streams: the checkpoint resumes as the run alone does
    ck_a, ck_b = load_file(out / "sigma=0.3,seed=1" / "checkpoint.safetensors"), load_file(
        tmp_path / "alone" / "checkpoint.safetensors")
    assert torch.equal(ck_a["rng.cpu"], ck_b["rng.cpu"])
    assert torch.equal(ck_a["rng.shuffle"], ck_b["rng.shuffle"])
    moments = [k for k in ck_b if k.startswith("optim.")]  # Adam's moments and step counts, updated over the stacks
    assert moments
    assert set(moments) == {k for k in ck_a if k.startswith("optim.")}
    for k in moments:
        torch.testing.assert_close(ck_a[k], ck_b[k], rtol=1e-4, atol=1e-6)
    other = load_file(out / "sigma=0.1,seed=0" / "model.safetensors")
    assert not torch.allclose(other["decoder.body.0.weight"], a["decoder.body.0.weight"])


def test_a_tie_among_every_run_is_said_so():
    rows = [_row("a", 100.0, 3.0), _row("b", 101.0, 4.0)]
    assert "most active units: every run (2)" in winners(rows)


def test_an_evaluation_is_reused_only_for_the_same_weights_and_numbers(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vaelab.analysis import sweep as sweep_module
    from vaelab.analysis.sweep import Outcome, Point, evaluate_once, sweep_row

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    run = SimpleNamespace(path=tmp_path, model=torch_module())
    calls = []

    def fake_eval(run, split, k, limit=None, sample_quality=False):
        calls.append((k, sample_quality, limit))
        extra = {"sample_quality": {"prior": {"fd": 1.5}}} if sample_quality else {}
        return {"elbo": -10.0, "kl": 4.0, "rec": 6.0, "log_px": -9.0, "bits_per_dim": 1.0, "active_units": 3,
                "mse": 0.1, "sharpness": {"recon": 0.1, "samples": 0.2}, "iw_samples": k, **extra}

    monkeypatch.setattr(sweep_module, "evaluate_run", fake_eval)
    first = evaluate_once(run, 5, None, print)
    key = [(tmp_path / "model.safetensors").stat().st_mtime_ns, 7]
    previous = {"weights": key, "iw_samples": 5, "numbers": first}  # a record of every test image
    assert evaluate_once(run, 5, previous, print) is first  # same weights, same K: reused
    evaluate_once(run, 6, previous, print)  # another K
    scored = evaluate_once(run, 5, previous, print, sample_quality=True)  # numbers it did not hold
    evaluate_once(run, 5, previous, print, limit=50)  # the first 50 test images, not all of them
    fifty = {**previous, "limit": 50}
    assert evaluate_once(run, 5, fifty, print, limit=50) is first  # the same 50: reused
    evaluate_once(run, 5, fifty, print, limit=80)  # another limit
    evaluate_once(run, 5, fifty, print)  # all of them
    assert calls == [(5, False, None), (6, False, None), (5, True, None), (5, False, 50), (5, False, 80),
                     (5, False, None)]
    point = Point("sigma=0.1", {"sigma": "0.1"}, None)  # type: ignore[arg-type]
    row = sweep_row(Outcome(point, "reused", None, scored))
    assert (row["loss"], row["rate"], row["distortion"], row["sample_fd"]) == (10.0, 4.0, 6.0, 1.5)
    assert sweep_row(Outcome(point, "failed", error="diverged"))["loss"] is None


def torch_module():
    import torch

    return torch.nn.Linear(1, 1)


@pytest.mark.parametrize(("hidden", "n_params"), [([16], 1), ([12, 8], 2)])
def test_stacked_mlp_matches_each_member_run_alone_with_its_gradients(hidden, n_params):
    import torch

    from vaelab.models.nets import MLPDecoder, MLPEncoder
    from vaelab.training import stacked

    torch.manual_seed(0)
    shape, latent, m = (1, 5, 4), 3, 3
    encs = [MLPEncoder(shape, hidden, latent) for _ in range(m)]
    decs = [MLPDecoder(shape, hidden, latent, n_params) for _ in range(m)]
    assert stacked.stackable(encs[0], decs[0])

    def stack(nets):
        named = [dict(n.named_parameters()) for n in nets]
        return {k: torch.stack([n[k].detach() for n in named]).requires_grad_() for k in named[0]}

    enc_w, dec_w = stack(encs), stack(decs)
    xs, zs = torch.randn(m, 7, *shape), torch.randn(m, 7, latent)  # (M, B, C, H, W), (M, B, L)
    mean, logvar = stacked.encode(encs[0], enc_w, xs)
    outs = stacked.decode(decs[0], dec_w, zs)
    assert mean.shape == (m, 7, latent)
    assert [o.shape for o in outs] == [(m, 7, *shape)] * n_params
    weights = torch.randn(m, 7, latent)  # an arbitrary loss, to compare gradients
    (mean * weights).sum().add((logvar ** 2).sum()).add(sum((o ** 2).sum() for o in outs)).backward()
    for k in range(m):
        mu_k, lv_k = encs[k](xs[k])
        outs_k = decs[k](zs[k])
        torch.testing.assert_close(mean[k], mu_k)
        torch.testing.assert_close(logvar[k], lv_k)
        for a, b in zip(outs, outs_k, strict=True):
            torch.testing.assert_close(a[k], b)
        (mu_k * weights[k]).sum().add((lv_k ** 2).sum()).add(sum((o ** 2).sum() for o in outs_k)).backward()
        for net, w in ((encs[k], enc_w), (decs[k], dec_w)):
            for name, p in net.named_parameters():
                torch.testing.assert_close(w[name].grad[k], p.grad, msg=name)


SKIPS = {3: {1}, 4: {1}, 10: {2}}  # step -> the members whose update is skipped there


def _members(shapes, lrs, settings, gen):
    """len(lrs) members' parameters as slices of one stack per shape, each with its own Adam."""
    import torch

    own = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes] for _ in lrs]
    opts = [torch.optim.Adam(ps, lr=lr, **settings) for ps, lr in zip(own, lrs, strict=True)]
    stacks = [torch.stack([ps[j].detach() for ps in own]).requires_grad_() for j in range(len(shapes))]
    for j, w in enumerate(stacks):
        for k, ps in enumerate(own):
            ps[j].data = w.data[k]
    return own, opts, stacks


@pytest.mark.parametrize("settings", [
    {"fused": True},  # vaelab's Adam
    {"foreach": True, "weight_decay": 0.1, "betas": (0.8, 0.99)},
    {"foreach": False, "amsgrad": True, "maximize": True, "eps": 1e-6},
    {"fused": True, "decoupled_weight_decay": True, "weight_decay": 0.05, "lrs": (0.01, 0.03, 0.01)},  # lr sweep
])
def test_one_adam_update_over_the_stacks_equals_each_members_own_with_skips(settings, monkeypatch):
    """SharedAdam over 3 members for 20 steps, member 1 skipping steps 3 and 4 and member 2 step 10 (their step
    counts differ from then on): every step is one call of Adam's update (one per lr), never a member's own
    optimizer, and weights, moments and step counts are those of 3 separate torch.optim.Adam stepped alone."""
    import torch

    from vaelab.training import stacked

    settings = dict(settings)
    lrs = settings.pop("lrs", (0.01,) * 3)
    gen = torch.Generator().manual_seed(0)
    shapes, m = [(5, 3), (5,), (2, 3, 2, 2)], len(lrs)
    own, opts, stacks = _members(shapes, lrs, settings, gen)
    ref = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in own]
    ref_opt = [torch.optim.Adam(ps, lr=lr, **settings) for ps, lr in zip(ref, lrs, strict=True)]
    calls, update = [], stacked.adam  # Adam's update (torch.optim.adam.adam), counted: the tensors of each call
    monkeypatch.setattr(stacked, "adam", lambda *a, **kw: (calls.append(len(a[0])), update(*a, **kw)))
    for o in opts:
        monkeypatch.setattr(o, "step", lambda *a, **kw: pytest.fail("a member's own optimizer stepped"))
    assert stacked.SharedAdam.applies(opts, own)
    shared = stacked.SharedAdam(stacks, opts, own)
    for step in range(20):
        grads = [torch.randn(m, *s, generator=gen) for s in shapes]
        taken = [k not in SKIPS.get(step, ()) for k in range(m)]
        for k in range(m):
            if taken[k]:
                for p, g in zip(ref[k], grads, strict=True):
                    p.grad = g[k]
                ref_opt[k].step()
            for g in grads:  # a skipped member's gradient is never read (a non-finite step's may be NaN)
                g[k] = g[k] if taken[k] else float("nan")
        for w, g in zip(stacks, grads, strict=True):
            w.grad = g
        shared.step(taken)
        # one call per lr among the members stepped, over their slices of every stack
        stepped = [sum(taken[k] for k in range(m) if lrs[k] == lr) * len(shapes) for lr in set(lrs)]
        assert sorted(calls) == sorted(n for n in stepped if n)
        calls.clear()
    assert shared.counts().tolist() == [20, 18, 19]
    for k in range(m):
        for p, q in zip(own[k], ref[k], strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
            assert opts[k].state[p].keys() == ref_opt[k].state[q].keys()
            for key, value in ref_opt[k].state[q].items():
                torch.testing.assert_close(opts[k].state[p][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_an_ensemble_keeps_one_adam_update_when_its_members_skip_different_steps(tmp_path, fashion_dir,
                                                                                 monkeypatch):
    """--skip-threshold skips members' updates at different steps, so their step counts part: every step is still
    one Adam update over the stacks (no member's own optimizer steps), and a member skips the steps its run alone
    skips and ends with its weights and Adam step count."""
    import torch
    from safetensors.torch import load_file

    from vaelab.training import ensemble

    common = {"dataset": "fashion-mnist", "limit": 512, "hidden": "16", "batch_size": 32, "epochs": 1,
              "skip_threshold": 0.9, "device": "cpu"}
    configs = [vaelab.TrainConfig(seed=s, out=str(tmp_path / f"m{s}"), **common) for s in (0, 1, 2)]
    monkeypatch.setattr(ensemble, "apply_update", lambda *a: pytest.fail("a member's own optimizer stepped"))
    members = ensemble.train_ensemble(configs, progress=False)
    skipped = [next(r for r in run.metrics if r["split"] == "train")["skipped_updates"] for run in members]
    steps = [int(load_file(tmp_path / f"m{s}" / "checkpoint.safetensors")["optim.0.step"]) for s in (0, 1, 2)]
    assert steps == [16 - n for n in skipped]
    assert len(set(steps)) > 1  # the members' step counts parted
    k = max(range(3), key=lambda i: skipped[i])
    monkeypatch.undo()
    alone = vaelab.train(configs[k].replace(out=str(tmp_path / "alone")), progress=False)
    assert next(r for r in alone.metrics if r["split"] == "train")["skipped_updates"] == skipped[k]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in (f"m{k}", "alone"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert int(load_file(tmp_path / "alone" / "checkpoint.safetensors")["optim.0.step"]) == steps[k]


@pytest.mark.slow
def test_an_ensemble_clips_each_member_as_its_run_alone_does(tmp_path, fashion_dir):
    """--clip-threshold: each member's gradient is scaled by its own factor inside the batched step, so a member
    clips the updates its run alone clips and ends with the same weights."""
    import torch
    from safetensors.torch import load_file

    from vaelab.training import ensemble

    common = {"dataset": "fashion-mnist", "limit": 512, "hidden": "16", "batch_size": 32, "epochs": 1,
              "skip_threshold": 0.0, "clip_threshold": 0.5, "device": "cpu"}
    configs = [vaelab.TrainConfig(seed=s, out=str(tmp_path / f"m{s}"), **common) for s in (0, 1)]
    members = ensemble.train_ensemble(configs, progress=False)
    clipped = [next(r for r in run.metrics if r["split"] == "train")["clipped_updates"] for run in members]
    assert all(n > 0 for n in clipped)
    alone = vaelab.train(configs[1].replace(out=str(tmp_path / "alone")), progress=False)
    assert next(r for r in alone.metrics if r["split"] == "train")["clipped_updates"] == clipped[1]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("m1", "alone"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
