"""Training on real Fashion-MNIST: honest metrics, bit-identical resume, Ctrl-C, failures that explain."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vaelab import TrainConfig, load_run, resume, train
from vaelab.errors import NotNormalizedWarning, RunError, TrainingError
from vaelab.models.vae import VAE
from vaelab.runs import CHECKPOINT, METRICS, WEIGHTS, save_checkpoint, save_weights, write_metrics, write_text_atomic


def _cfg(tmp_path, name, **kw):
    base = dict(dataset="fashion-mnist", limit=2000, hidden=[64], latent_dim=2, epochs=2, batch_size=100,
                out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_preloaded_data_obeys_limit_like_a_fresh_load(tmp_path, fashion):
    """train(config, data=...) trains on config.data.limit images, as a resume (which reloads) will."""
    given = train(_cfg(tmp_path, "given", epochs=1, limit=300), progress=False, data=fashion)
    loaded = train(_cfg(tmp_path, "loaded", epochs=1, limit=300), progress=False)
    assert given.config.model.data_shape == loaded.config.model.data_shape
    _assert_same_weights(given.path, loaded.path)


@pytest.mark.parametrize("sigma", ["0.1", "learned", "optimal"])
def test_gaussian_metrics_are_the_true_negative_elbo(tmp_path, fashion_dir, sigma):
    limit = 6000 if sigma == "optimal" else 2000  # enough steps for the running σ to settle
    run = train(_cfg(tmp_path, "g", sigma=sigma, limit=limit), progress=False)
    rows = _lines(run.path)
    assert [(r["epoch"], r["split"]) for r in rows] == [(1, "train"), (1, "test"), (2, "train"), (2, "test")]
    d = 784
    for r in rows:
        s2 = r["sigma"] ** 2
        expected_rec = d / 2 * math.log(2 * math.pi * s2) + d * r["mse"] / (2 * s2)
        assert r["rec"] == pytest.approx(expected_rec, rel=1e-5, abs=1e-3)
        assert r["loss"] == pytest.approx(r["rec"] + r["kl"], rel=1e-12)
        assert r["bits_per_dim"] == pytest.approx((r["loss"] / d + math.log(256)) / math.log(2))
        assert len(r["kl_per_dim"]) == 2
        assert r["kl"] == pytest.approx(sum(r["kl_per_dim"]))
    if sigma == "0.1":
        assert rows[-1]["sigma"] == pytest.approx(0.1)
    else:
        assert rows[-1]["sigma"] != pytest.approx(rows[0]["sigma"], rel=1e-3)  # σ moved during training
    if sigma == "optimal":  # the running σ² tracks the training MSE
        assert rows[-2]["sigma"] ** 2 == pytest.approx(rows[-2]["mse"], rel=0.25)


def test_run_directory_reloads_exactly(tmp_path, fashion_dir):
    run = train(_cfg(tmp_path, "r", epochs=1), progress=False)
    files = sorted(p.name for p in run.path.iterdir())
    assert files == ["checkpoint.safetensors", "config.json", "metrics.jsonl", "model.safetensors"]
    again = load_run(run.path)
    assert again.config == run.config
    for (k, a), (k2, b) in zip(run.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert k == k2
        assert a.equal(b)
    with safe_open(str(run.path / "model.safetensors"), "pt") as fh:  # plain tensors, no pickle
        assert set(fh.keys()) == set(run.model.state_dict())


def _weights(run_dir):
    with safe_open(str(run_dir / "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  safe_open is not iterable


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), f"{k} differs"


NO_NATIVE_BF16 = "ignore:this CPU has no native bfloat16"  # the warning bf16 gives on CPUs that emulate it


@pytest.mark.filterwarnings(NO_NATIVE_BF16)
@pytest.mark.parametrize(("lik", "extra"), [("gaussian", {"sigma": "learned"}),
                                       ("bernoulli", {"binarize": "dynamic", "kl_warmup": 1.5}),
                                       ("bernoulli", {"binarize": "dynamic", "precision": "bf16"}),
                                       pytest.param("gaussian", {"arch": "conv", "hidden": [4],
                                                                 "sigma": "learned-pixel"}, marks=pytest.mark.slow),
                                       pytest.param("discretized-logistic", {"arch": "conv", "hidden": [4],
                                                                             "mixtures": 2}, marks=pytest.mark.slow),
                                       ("laplace", {"sigma": "learned", "optimizer": "sgd", "lr": 1e-4})])
def test_resume_is_bit_identical(tmp_path, fashion, lik, extra):
    if extra.get("arch") == "conv":  # real images, fewer of them: each epoch evaluates the whole test split
        small = tmp_path / "fashion-small.npz"
        np.savez(small, x_train=fashion.train[:600], y_train=fashion.train_labels[:600],
                 x_test=fashion.test[:500], y_test=fashion.test_labels[:500])
        extra = {**extra, "dataset": str(small)}
    full = train(_cfg(tmp_path, "full", epochs=3, likelihood=lik, **extra), progress=False)
    train(_cfg(tmp_path, "part", epochs=1, likelihood=lik, **extra), progress=False)
    resumed = resume(tmp_path / "part", progress=False, epochs=3)
    _assert_same_weights(full.path, resumed.path)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(_lines(full.path)) == strip(_lines(resumed.path))


@pytest.mark.filterwarnings(NO_NATIVE_BF16)
def test_bf16_precision_trains_to_the_same_loss_and_reports_float32(tmp_path, fashion_dir):
    """--precision bf16 changes the arithmetic of the networks' matmuls only: weights and the reported numbers
    stay float32, and the model reaches the loss of the float32 run."""
    kw = dict(epochs=3, likelihood="bernoulli", binarize="dynamic", hidden=[128], latent_dim=8)
    fast = train(_cfg(tmp_path, "bf16", precision="bf16", **kw), progress=False)
    exact = train(_cfg(tmp_path, "fp32", **kw), progress=False)
    assert json.loads((fast.path / "config.json").read_text())["runtime"]["precision"] == "bf16"
    wf, we = _weights(fast.path), _weights(exact.path)
    assert all(t.dtype == torch.float32 for t in wf.values())
    assert any(not wf[k].equal(we[k]) for k in wf)  # bf16 really was in effect
    lf, le = _lines(fast.path), _lines(exact.path)
    assert [r["loss"] for r in lf if r["split"] == "test"] == pytest.approx(
        [r["loss"] for r in le if r["split"] == "test"], rel=0.01)
    assert lf[-1]["loss"] < lf[1]["loss"] - 5  # and it learned


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, fashion_dir):
    """A real process gets SIGINT mid-training; the resumed run equals an uninterrupted one bit for bit."""
    out = tmp_path / "interrupted"
    # 500 steps of a 256-wide MLP per epoch (~0.6 s on one thread), so the interrupt lands inside epoch 2
    args = ["train", "--dataset", "fashion-mnist", "--limit", "8000", "--hidden", "256", "--latent-dim", "2",
            "--batch-size", "16", "--epochs", "3", "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "vaelab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # wait for epoch 1 to finish, then interrupt epoch 2
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err
    assert "Traceback" not in err
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    assert meta["epoch"] >= 1, meta
    assert meta["step"] > 0, meta  # stopped mid-epoch
    assert subprocess.run([sys.executable, "-m", "vaelab.cli", "train", "--resume", str(out), "--quiet"],
                          capture_output=True, timeout=900).returncode == 0
    ref = train(TrainConfig(dataset="fashion-mnist", limit=8000, hidden=[256], latent_dim=2, batch_size=16,
                            epochs=3, out=str(tmp_path / "ref")), progress=False)
    _assert_same_weights(ref.path, out)


def test_non_finite_loss_stops_with_a_cause(tmp_path, fashion_dir):
    with pytest.raises(TrainingError, match=r"non-finite.*likely cause.*learning rate"):
        train(_cfg(tmp_path, "nan", sigma="0.0001", lr=1e4, epochs=1), progress=False)


def test_bernoulli_on_grey_pixels_warns_and_says_so(tmp_path, fashion_dir):
    with pytest.warns(NotNormalizedWarning, match="not a normalized density"):
        run = train(_cfg(tmp_path, "b", likelihood="bernoulli", epochs=1), progress=False)
    assert all(r["normalized"] is False for r in run.metrics)
    assert all(r["bits_per_dim"] == pytest.approx(r["loss"] / 784 / math.log(2)) for r in run.metrics)


def test_objective_is_reported_when_it_differs(tmp_path, fashion_dir):
    run = train(_cfg(tmp_path, "beta", beta=4.0, free_bits=0.5, epochs=1), progress=False)
    for r in run.metrics:
        assert r["loss"] == pytest.approx(r["rec"] + r["kl"])
        assert r["objective"] == pytest.approx(r["rec"] + 4.0 * sum(max(k, 0.5) for k in r["kl_per_dim"]))


def test_existing_run_is_not_overwritten(tmp_path, fashion_dir):
    cfg = _cfg(tmp_path, "once", epochs=1)
    train(cfg, progress=False)
    before = (tmp_path / "once" / "model.safetensors").read_bytes()
    with pytest.raises(RunError, match=r"already holds a run.*--resume"):
        train(_cfg(tmp_path, "once", epochs=1), progress=False)
    assert (tmp_path / "once" / "model.safetensors").read_bytes() == before


@pytest.mark.skipif(os.environ.get("VAELAB_SKIP_SLOW") == "1", reason="VAELAB_SKIP_SLOW=1")
@pytest.mark.slow
def test_conv_and_static_binarization_train(tmp_path, fashion_dir):
    run = train(_cfg(tmp_path, "conv", arch="conv", hidden=[8, 16], likelihood="bernoulli", binarize="static",
                     epochs=2), progress=False)
    test = [r for r in run.metrics if r["split"] == "test"]
    assert "normalized" not in test[-1]  # binary data: a true probability mass
    assert test[-1]["loss"] < test[0]["loss"]


def test_bf16_on_a_cpu_without_native_support_warns(monkeypatch):
    T = sys.modules["vaelab.training.build"]
    monkeypatch.setattr(T, "_cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated and slower"):
        T.check_precision(TrainConfig(precision="bf16"), torch.device("cpu"))
    T.check_precision(TrainConfig(precision="fp32"), torch.device("cpu"))  # fp32: nothing to say


def test_loaded_optimizer_state_lives_in_aligned_memory_of_its_own(tmp_path):
    """load_file's tensors are views into the checkpoint's mapping at 4-byte-aligned offsets; Adam's moments
    must be copied out (64-byte aligned by torch's allocator): on the views each step ran ~5 % slower."""
    from vaelab.models.vae import VAE
    from vaelab.runs import load_checkpoint, save_checkpoint
    from vaelab.training.trainer import make_optimizer

    cfg = TrainConfig(hidden=[24], latent_dim=3, likelihood="bernoulli")
    model = VAE.from_config(cfg, (1, 5, 7))
    optimizer = make_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    save_checkpoint(tmp_path / "ck.safetensors", model, optimizer, {"epoch": 1, "step": 0}, {})
    fresh = VAE.from_config(cfg, (1, 5, 7))
    fresh_opt = make_optimizer(cfg, fresh)
    load_checkpoint(tmp_path / "ck.safetensors", fresh, fresh_opt)
    moments = [v for s in fresh_opt.state.values() for k, v in s.items() if k != "step"]
    assert len(moments) == 2 * len(list(fresh.parameters()))
    assert all(v.data_ptr() % 64 == 0 for v in moments)
    for s_new, s_old in zip(fresh_opt.state.values(), optimizer.state.values(), strict=True):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s_new[k], s_old[k])


def test_optimizer_step_hooks_still_run(tmp_path, fashion_dir):
    """The trainer's step is optimizer.step(): a registered step hook runs on every step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    try:
        train(_cfg(tmp_path, "hooked", epochs=1, limit=500), progress=False)
    finally:
        handle.remove()
    assert len(calls) == 5  # 500 images in batches of 100


def test_frozen_parameters_and_module_hooks_train_as_in_plain_pytorch(tmp_path, fashion, monkeypatch):
    """A user's frozen layer stays as initialised and a forward hook runs on every step."""
    from torch.nn.modules.module import register_module_forward_hook

    from vaelab.models.vae import VAE

    original = VAE.from_config

    def frozen_head(cls, config, shape):
        model = original(config, shape)
        model.encoder.head.requires_grad_(False)
        return model

    monkeypatch.setattr(VAE, "from_config", classmethod(frozen_head))
    seen = []
    handle = register_module_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    try:
        run = train(_cfg(tmp_path, "frozen", epochs=1, limit=500), progress=False, data=fashion)
    finally:
        handle.remove()
    assert seen.count("VAE") == 5  # each training step calls model(x); evaluation calls model.terms
    torch.manual_seed(0)  # the initialisation train() made from seed 0
    fresh = original(run.config, tuple(run.config.model.data_shape))
    assert torch.equal(run.model.encoder.head.weight, fresh.encoder.head.weight)
    assert not torch.equal(run.model.decoder.body[0].weight, fresh.decoder.body[0].weight)


def test_run_files_get_the_mode_of_any_new_file(tmp_path):
    """Atomic writes go through a temporary file; the file that lands has the usual mode (umask applied), not the
    private 0600 that safetensors gives its own files. Each writer of a run directory's files is called on a tiny
    model, with a umask under which the two modes differ."""
    model = VAE.from_config(TrainConfig(hidden=[8], latent_dim=2), (1, 4, 4))
    optimizer = torch.optim.Adam(model.parameters())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()  # Adam's moments: the checkpoint holds optimizer state too
    old = os.umask(0o022)
    try:
        save_file({"t": torch.zeros(1)}, tmp_path / "raw.safetensors")
        save_weights(model, tmp_path / WEIGHTS)
        save_checkpoint(tmp_path / CHECKPOINT, model, optimizer, {"epoch": 1}, {"torch": torch.get_rng_state()})
        write_metrics(tmp_path / METRICS, [{"split": "test", "epoch": 1, "loss": 1.0}])
        write_text_atomic(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert (tmp_path / "raw.safetensors").stat().st_mode & 0o777 == 0o600  # what the atomic writes must undo
    for name in (WEIGHTS, CHECKPOINT, METRICS, "report.html"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def _scale_and_target(run, x, likelihood, sigma):
    """(the learned scale, the value maximum likelihood gives it for the decoder as it is) on training images x.

    Gaussian: √MSE; Laplace: the mean absolute error; per-pixel σ: √(mean σ²) against √MSE (per pixel the MLE
    is σ_i² = E(x_i − μ_i)²). The 8-bit families have no closed form (a location beyond the open end bins costs
    nothing), so their target is found by search: the factor on the scale that maximizes log p(x|z)."""
    model = run.model.eval()
    lik = model.likelihood
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        params = model.decode(model.encode(x).sample())
        err = x - lik.location(params)
        if likelihood.startswith("discretized"):
            now = lik.log_scale.clone()
            factors = torch.linspace(-1.0, 1.0, 41)  # log factors 1/e .. e in steps of 5 %, well inside the 1.3x
            scores = []
            sub_params, sub_x = [p[:2000] for p in params], x[:2000]  # the 8-bit log-densities are costly
            for f in factors:
                lik.log_scale.copy_(now + f)
                scores.append(lik.log_prob(sub_params, sub_x).sum())
            lik.log_scale.copy_(now)
            return 1.0, math.exp(-factors[int(torch.stack(scores).argmax())].item())
        if sigma == "learned-pixel":
            return torch.exp(2 * lik.log_scale_for(params)).mean().sqrt().item(), err.square().mean().sqrt().item()
        scale = torch.exp(lik.log_scale_for(params)).item()
        return scale, (err.abs().mean() if likelihood == "laplace" else err.square().mean().sqrt()).item()


@pytest.mark.slow
@pytest.mark.parametrize(("likelihood", "sigma"), [("gaussian", "learned"), ("laplace", "learned"),
                                              ("gaussian", "learned-pixel"), ("discretized-logistic", "learned"),
                                              ("discretized-gaussian", "learned"),
                                              ("discretized-logistic", "learned-pixel")])
def test_a_learned_scale_reaches_its_optimum_within_one_epoch(tmp_path, fashion, likelihood, sigma):
    """After one epoch of 50 steps, a learned σ is within 1.3x of √(train MSE) (Laplace b: of the mean absolute
    error; see _scale_and_target), the value maximum likelihood gives it for the decoder at that point."""
    run = train(_cfg(tmp_path, "s", likelihood=likelihood, sigma=sigma, limit=6400, batch_size=128, epochs=1,
                     hidden=[256], latent_dim=10), progress=False, data=fashion)
    from vaelab.data import to_unit

    scale, target = _scale_and_target(run, to_unit(fashion.train[:6400]), likelihood, sigma)
    assert 1 / 1.3 < scale / target < 1.3, (scale, target)
