"""The learning-rate schedule (--lr-schedule, --lr-warmup, --lr-final): its values, the rates a run really takes
(every parameter group), bit-identical resume mid-epoch, ensembles, and bad settings."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_guards import tick_each_step
from vaelab import TrainConfig, resume, train
from vaelab.cli import main
from vaelab.config import OptimConfig
from vaelab.training.schedule import lr_factor

STEPS = 20  # steps per epoch of _cfg's runs: 2,000 images in batches of 100


def _cfg(tmp_path, name, **kw):
    base = dict(dataset="fashion-mnist", limit=2000, hidden=[64], latent_dim=2, epochs=3, batch_size=100,
                out=str(tmp_path / name))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(("settings", "table"), [
    ({}, [(0.0, 1.0), (3.3, 1.0), (10.0, 1.0)]),
    ({"lr_warmup": 2.0}, [(0.5, 0.25), (1.0, 0.5), (2.0, 1.0), (9.0, 1.0)]),
    ({"lr_schedule": "cosine"}, [(0.0, 1.0), (5.0, 0.5), (10.0, 0.0), (2.5, 0.5 + 0.5 / math.sqrt(2))]),
    ({"lr_schedule": "cosine", "lr_final": 0.1}, [(0.0, 1.0), (5.0, 0.55), (10.0, 0.1), (12.0, 0.1)]),
    ({"lr_schedule": "cosine", "lr_warmup": 2.0}, [(1.0, 0.5), (2.0, 1.0), (6.0, 0.5), (10.0, 0.0)]),
])
def test_the_factor_follows_its_formula(settings, table):
    optim = OptimConfig(epochs=10, **settings)
    for progress, expected in table:
        assert lr_factor(optim, progress) == pytest.approx(expected, abs=1e-12), progress


def test_the_cosine_is_pytorchs_cosine_annealing():
    """Without a warm-up, the rate at each step's end is CosineAnnealingLR's over the same number of steps."""
    steps_per_epoch, epochs, final = 7, 3, 0.2
    optim = OptimConfig(epochs=epochs, lr_schedule="cosine", lr_final=final)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=final)
    for k in range(epochs * steps_per_epoch):
        opt.step()
        reference.step()  # the rate after step k: the one for step k + 1
        assert lr_factor(optim, (k + 1) / steps_per_epoch) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)


def _groups(run_dir):
    with safe_open(str(run_dir / "checkpoint.safetensors"), "pt") as fh:
        return json.loads(fh.metadata()["param_groups"])


def _rates(run):
    return [r["lr"] for r in run.metrics if r["split"] == "train"]


def test_every_group_takes_the_scheduled_rate(tmp_path, fashion):
    """A learned σ has a step size of its own: the schedule multiplies it as it multiplies --lr. The train rows
    record the rate of each epoch's last step, and the schedule changes what the run learns."""
    kw = dict(sigma="learned", lr_schedule="cosine", lr_warmup=0.5, lr_final=0.1)
    run = train(_cfg(tmp_path, "cosine", **kw), progress=False, data=fashion)
    optim = run.config.optim
    assert _rates(run) == pytest.approx([1e-3 * lr_factor(optim, e) for e in (1, 2, 3)])
    assert _rates(run)[-1] == pytest.approx(1e-4)
    groups = _groups(run.path)
    assert len(groups) == 2
    assert groups[1]["initial_lr"] != groups[0]["initial_lr"]
    for g in groups:
        assert g["lr"] == pytest.approx(0.1 * g["initial_lr"])
    flat = train(_cfg(tmp_path, "constant", sigma="learned"), progress=False, data=fashion)
    assert _rates(flat) == [1e-3] * 3
    a, b = (load_file(p / "model.safetensors") for p in (run.path, flat.path))
    assert any(not a[k].equal(b[k]) for k in a)


def test_a_run_stopped_mid_epoch_resumes_on_the_same_rates(tmp_path, fashion, monkeypatch):
    """Stopped by the time limit inside the warm-up's second epoch, the run resumes on the rates it would have
    taken: its weights and metrics equal those of a run that never stopped, bit for bit."""
    kw = dict(lr_schedule="cosine", lr_warmup=1.5)
    full = train(_cfg(tmp_path, "full", **kw), progress=False, data=fashion)
    tick_each_step(monkeypatch)
    part = train(_cfg(tmp_path, "part", time_limit=0.5, **kw), progress=False, data=fashion)
    assert part.metrics[-1]["stopped"] == "time-limit"
    assert 1 < part.metrics[-1]["epoch"] < 2
    monkeypatch.undo()
    done = resume(part.path, progress=False)
    a, b = (load_file(p / "model.safetensors") for p in (full.path, done.path))
    for k in a:
        assert a[k].equal(b[k]), k
    assert _rates(done)[-1] == _rates(full)[-1] == 0.0
    assert _groups(done.path) == _groups(full.path)


@pytest.mark.parametrize(("kw", "said"), [({"lr_schedule": "cosine"}, True), ({"lr_schedule": "constant"}, False),
                                          ({"lr_schedule": "cosine", "epochs": 2}, False)])
def test_a_run_stopped_early_says_its_cosine_had_not_fallen(kw, said, tmp_path, fashion, monkeypatch, capsys):
    """Stopped by the time limit after 1.5 epochs, a cosine over 10 epochs is still near --lr, which the stop
    message says; over 2 epochs it had fallen below half, and a constant rate has nothing to say."""
    tick_each_step(monkeypatch)
    run = train(_cfg(tmp_path, "stopped", time_limit=0.5, **{"epochs": 10, **kw}), progress=True, data=fashion)
    assert run.metrics[-1]["stopped"] == "time-limit"
    err = capsys.readouterr().err
    assert "time limit" in err
    assert ("falls over all of --epochs 10" in err) is said
    assert ("the learning rate was still" in err) is said


@pytest.mark.slow
def test_an_ensemble_member_takes_its_run_alones_rates(tmp_path, fashion_dir):
    """Members with a schedule step together (one Adam update over the stacks, each member at its own --lr times
    the factor) and end as their runs alone."""
    from vaelab.training.ensemble import group_key, train_ensemble

    common = {"dataset": "fashion-mnist", "limit": 384, "hidden": [16], "batch_size": 64, "epochs": 2,
              "lr_schedule": "cosine", "lr_warmup": 0.5, "device": "cpu"}
    configs = [TrainConfig(lr=lr, seed=s, out=str(tmp_path / f"m{s}"), **common) for s, lr in ((0, 1e-3), (1, 3e-3))]
    assert group_key(configs[0]) == group_key(configs[1]) is not None
    assert group_key(configs[0]) != group_key(configs[0].replace(lr_warmup=0.25))  # a schedule is shared
    members = train_ensemble(configs, progress=False)
    alone = train(configs[1].replace(out=str(tmp_path / "alone")), progress=False)
    assert _rates(members[1]) == _rates(alone) == pytest.approx([3e-3 * 0.75, 0.0])  # cos(π/3) at epoch 1
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("m1", "alone"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("args", "needle"), [
    (["--lr-warmup", "3", "--epochs", "3"], "--lr-warmup must be shorter than the run's --epochs (3); got 3.0"),
    (["--lr-warmup", "-1"], "--lr-warmup must be a finite number >= 0; got -1.0"),
    (["--lr-schedule", "cosine", "--lr-final", "1.5"], "--lr-final is a fraction of --lr, in [0, 1]; got 1.5"),
    (["--lr-final", "0.1"], "--lr-final is where --lr-schedule cosine ends; got --lr-schedule constant"),
    (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step' (choose from 'constant', 'cosine')"),
])
def test_bad_schedules_are_one_line_errors(args, needle, capsys, tmp_path):
    assert main(["train", "--dataset", "shapes", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1
    assert err.startswith("vaelab: error: ")
    assert not (tmp_path / "r").exists()
