"""Data-parallel training with real torchrun processes on loopback (gloo): the model does not depend on how many
processes trained it; one writer; resume, Ctrl-C and a dead process; several nodes. Each torchrun invocation
starts three Python processes (launcher and two workers), so every test that launches one is marked slow."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

import toy_objective
from vaelab import TrainConfig, load_run, resume, train
from vaelab.analysis.metrics import elbo_metrics
from vaelab.data import load_dataset, to_unit
from vaelab.errors import ConfigError
from vaelab.models.likelihoods import make_likelihood
from vaelab.models.objective import ELBO, Batch, ObjectiveSettings
from vaelab.models.vae import VAE
from vaelab.training.distributed import World, check_batch
from vaelab.training.trainer import EVAL_SEED

LAUNCH_TIMEOUT = 240  # seconds for one torchrun invocation on a busy 2-core machine
RUN_FILES = {"config.json", "metrics.jsonl", "model.safetensors", "checkpoint.safetensors"}


@pytest.fixture(scope="module")
def subset(tmp_path_factory, fashion_dir) -> Path:
    """The first 501 training and 300 test images of Fashion-MNIST as a .npz: 501 = 7 batches of 64 and one of
    53, which two processes split 26 / 27."""
    fashion = load_dataset("fashion-mnist")
    path = tmp_path_factory.mktemp("data") / "fashion-subset.npz"
    np.savez(path, x_train=fashion.train[:501], x_test=fashion.test[:300])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOY_ENTRY = Path(__file__).with_name("toy_objective.py")  # vaelab with a toy objective registered


def torchrun_cmd(nproc: int, *train_args, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
                 entry: tuple[str, ...] = ("-m", "vaelab")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port or free_port()}", "--rdzv-id", "vaelab-test",
            "--max-restarts", "0", *entry, "train", *map(str, train_args)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *train_args) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, *train_args), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env=env())


def args(data: Path, out: Path, **kw) -> list[str]:
    settings = {"dataset": data, "hidden": 32, "latent_dim": 3, "batch_size": 64, "epochs": 2, "out": out, **kw}
    flat = []
    for k, v in settings.items():
        flat += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return [*flat, "--quiet"]


def config(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": str(data), "hidden": [32], "latent_dim": 3, "batch_size": 64, "epochs": 2,
                          "out": str(out), **kw})


def max_rel_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12)).item() for k in wa)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_one_world_size(run: Path, size: int) -> None:
    assert {r["world_size"] for r in rows(run)} == {size}


def check_matches_one_process(two: Path, one: Path) -> float:
    """Weights equal to float rounding, the same test −ELBO to 0.01 nats; returns the max relative difference."""
    diff = max_rel_diff(one, two)
    assert diff < 1e-4, diff
    assert rows(two)[-1]["loss"] == pytest.approx(rows(one)[-1]["loss"], abs=0.01)
    assert [(r["epoch"], r["split"]) for r in rows(two)] == [(r["epoch"], r["split"]) for r in rows(one)]
    return diff


@pytest.mark.slow
@pytest.mark.parametrize(("kw", "entry"), [
    # added through the public registration alone: tests/toy_objective.py is each process's entry point
    ({"objective": toy_objective.ReconstructionOnly.name}, (str(TOY_ENTRY),)),
    # K draws of z per image: every process draws the whole batch's noise and keeps its rows
    ({"objective": "iwae", "iw_train": 3}, ("-m", "vaelab")),
    # a learned prior that reads the encoder, and DReG's hook on z
    ({"objective": "iwae", "iw_train": 3, "iw_grad": "dreg", "prior": "vamp", "prior_components": 10},
     ("-m", "vaelab")),
], ids=["registered", "iwae", "vamp-dreg"])
def test_an_objective_trains_two_processes_as_it_trains_one(tmp_path, subset, kw, entry):
    """Objectives run on the data-parallel step unchanged: two processes train the model one process trains."""
    r = subprocess.run(torchrun_cmd(2, *args(subset, tmp_path / "two", **kw), entry=entry),
                       capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    one = train(config(subset, tmp_path / "one", **kw), progress=False)
    check_matches_one_process(tmp_path / "two", one.path)
    two = rows(tmp_path / "two")
    assert all(row["objective"] == pytest.approx(one_row["objective"], abs=0.01)
               for row, one_row in zip(two, rows(one.path), strict=True))
    assert_one_world_size(tmp_path / "two", 2)


@pytest.mark.slow
def test_two_processes_train_the_model_one_process_trains(tmp_path, subset, capsys):
    """σ² = the batch MSE, free bits on the batch-mean KL and a KL warm-up: batch statistics and the split of a last
    batch of 53 are where two processes could part from one."""
    kw = dict(sigma="optimal", free_bits=0.2, kl_warmup=1.0)
    r = torchrun(2, *args(subset, tmp_path / "two", tensorboard=tmp_path / "tb", **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # from rank 0 alone
    assert r.stdout.count("test −ELBO") == 1  # the summary, from rank 0 only
    one = train(config(subset, tmp_path / "one", **kw), progress=False)
    diff = check_matches_one_process(tmp_path / "two", one.path)
    with capsys.disabled():
        print(f"\n2 processes vs 1 (σ optimal, free bits, warm-up): max relative weight difference {diff:.2e}")
    assert_one_world_size(tmp_path / "two", 2)
    assert_one_world_size(one.path, 1)
    assert {p.name for p in (tmp_path / "two").iterdir()} == RUN_FILES  # one writer, no stray temporary files

    # the metrics the two processes reported (evaluation shared between them) are one process's for those weights
    run = load_run(tmp_path / "two")
    data = load_dataset(str(subset))
    test_x = torch.from_numpy(data.test)
    last = rows(tmp_path / "two")[-1]
    alone = elbo_metrics(run.model, test_x, 1000, to_unit, seed=EVAL_SEED + last["epoch"])
    for key in ("loss", "rec", "kl", "mse", "sigma"):
        assert last[key] == pytest.approx(alone[key], rel=1e-9), key


def test_batch_size_is_the_global_batch():
    check_batch(64, World(0, 2))
    check_batch(63, World())
    with pytest.raises(ConfigError, match=r"must be a multiple of 4; got 6 \(e\.g\. 4 or 8\)"):
        check_batch(6, World(1, 4))
    assert [World(r, 2).rows(53) for r in range(2)] == [slice(0, 26), slice(26, 53)]
    assert [World(r, 3).rows(2) for r in range(3)] == [slice(0, 0), slice(0, 1), slice(1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("settings", "message"), [
    ({"batch_size": 63}, "--batch-size is the global batch, split across the 2 processes, so it must be a multiple "
                         "of 2; got 63 (e.g. 62 or 64)"),
    ({"objective": "betatcvae"}, "--objective betatcvae compares every z of a batch with every q(z|x) of it and "
                                 "trains on one process only; got 2 processes: start it without torchrun"),
], ids=["batch-size", "one-process-objective"])
def test_settings_two_processes_cannot_share_are_refused_before_anything_is_written(tmp_path, subset, settings,
                                                                                    message):
    r = torchrun(2, *args(subset, tmp_path / "odd", **settings))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("vaelab: error:")]
    assert lines == [f"vaelab: error: {message}"]
    # torchrun itself ends with its own report of the failed processes; the processes print no traceback
    assert not any(f"vaelab/{m}.py" in r.stderr for m in ("cli", "trainer", "distributed"))
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
def test_two_nodes_on_loopback_train_one_model(tmp_path, subset, capsys):
    """Two torchrun invocations (--nnodes 2, one process each) meet at one rendezvous address and train one model;
    dynamic binarization draws fresh inputs every step, the same on two nodes as on one process."""
    kw = dict(likelihood="bernoulli", binarize="dynamic")
    port = free_port()
    nodes = [subprocess.Popen(torchrun_cmd(1, *args(subset, tmp_path / "nodes", **kw), nnodes=2, node_rank=i,
                                           port=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env()) for i in range(2)]
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    one = train(config(subset, tmp_path / "one", **kw), progress=False)
    diff = check_matches_one_process(tmp_path / "nodes", one.path)
    with capsys.disabled():
        print(f"\n2 nodes vs 1 process (Bernoulli, dynamic binarization): max relative weight difference {diff:.2e}")
    assert_one_world_size(tmp_path / "nodes", 2)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _wait_for_epochs(run: Path, n: int, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (run / "metrics.jsonl").exists() and len(rows(run)) >= 2 * n:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before epoch {n}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"no epoch {n} within {timeout} s")


def _interrupt_after_an_epoch(run, launcher, sig) -> dict:
    """Send `sig` to the torchrun launcher once an epoch is done; check that the processes stopped with one
    message and a mid-epoch checkpoint, and return that checkpoint's progress record."""
    try:
        _wait_for_epochs(run, 1, launcher)
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert err.count("interrupted: checkpoint saved at epoch") == 1, err[-3000:]
    with safe_open(run / "checkpoint.safetensors", "pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    assert meta["step"] > 0, meta  # mid-epoch
    return meta


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_checkpoints_and_resumes_bit_identically(tmp_path, subset, fashion_dir):
    """SIGINT to torchrun: every process stops after the same step and rank 0 checkpoints mid-epoch; resuming with
    2 processes ends bit-identical to an uninterrupted 2-process run, resuming with 1 continues the same batches."""
    data = tmp_path / "more.npz"
    fashion = load_dataset("fashion-mnist")
    np.savez(data, x_train=fashion.train[:6000], x_test=fashion.test[:300])  # 188 steps of 32 per epoch
    kw = dict(batch_size=32, epochs=3)
    whole = torchrun(2, *args(data, tmp_path / "whole", **kw))
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "cut"
    launcher = subprocess.Popen(torchrun_cmd(2, *args(data, run, **kw)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env())
    meta = _interrupt_after_an_epoch(run, launcher, signal.SIGINT)
    assert launcher.returncode != 0
    assert meta["epoch"] >= 1, meta
    other = tmp_path / "cut-on-one"
    shutil.copytree(run, other)

    resumed = subprocess.run(torchrun_cmd(2, "--resume", run, "--quiet"), capture_output=True, text=True,
                             timeout=LAUNCH_TIMEOUT, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors",):
        a, b = load_file(tmp_path / "whole" / name), load_file(run / name)
        assert all(torch.equal(a[k], b[k]) for k in a), "resumed 2-process run differs from the uninterrupted one"
    def timeless(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert timeless(rows(run)) == timeless(rows(tmp_path / "whole"))

    on_one = resume(other, progress=False)  # one process continues the same global batches
    assert max_rel_diff(tmp_path / "whole", on_one.path) < 1e-4
    assert [r["world_size"] for r in rows(other)][-1] == 1


def _start_long_run(tmp_path):
    """A 2-process run long enough (50 epochs of 4,000 images) to be stopped from outside; (run dir, launcher)."""
    data = tmp_path / "more.npz"
    fashion = load_dataset("fashion-mnist")
    np.savez(data, x_train=fashion.train[:4000], x_test=fashion.test[:300])
    run = tmp_path / "run"
    launcher = subprocess.Popen(torchrun_cmd(2, *args(data, run, batch_size=32, epochs=50)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env())
    return run, launcher


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_like_ctrl_c(tmp_path, fashion_dir):
    """What a cluster scheduler sends before it takes the machines back: torchrun passes SIGTERM on."""
    run, launcher = _start_long_run(tmp_path)
    meta = _interrupt_after_an_epoch(run, launcher, signal.SIGTERM)
    assert meta["world_size"] == 2, meta
    assert resume(run, epochs=meta["epoch"] + 1, progress=False).last()["epoch"] == meta["epoch"] + 1


@pytest.mark.slow
def test_a_dead_process_stops_the_others_and_the_run_resumes(tmp_path, subset):
    run, launcher = _start_long_run(tmp_path)
    try:
        _wait_for_epochs(run, 1, launcher)
        workers = [p for c in _children(launcher.pid) for p in [c, *_children(c)] if _rank_of(p) == 1]
        assert workers, "rank 1's process not found"
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = launcher.communicate(timeout=90)
        stopped_after = time.monotonic() - t0
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("vaelab: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "lost contact with another training process" in lines[0], err[-3000:]
    assert f"--resume {run}" in lines[0]
    assert stopped_after < 60
    done = rows(run)[-1]["epoch"]
    continued = resume(run, epochs=done + 1, progress=False)  # from the last good checkpoint
    assert continued.last()["epoch"] == done + 1


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_process_with_one_message(tmp_path, subset):
    r = torchrun(2, *args(subset, tmp_path / "nan", lr=1e8, epochs=3))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("vaelab: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "the loss was non-finite in the last" in lines[0], r.stderr[-3000:]
    assert "likely cause" in lines[0], r.stderr[-3000:]


CLOSE_SCRIPT = """
import os, sys, torch
from vaelab.training.distributed import join, wrap
world, device = join(torch.device("cpu"))
model = wrap(torch.nn.Linear(3, 2), world, device)  # DDP: its first use imports modules that bind the default group
model(torch.ones(4, 3)).sum().backward()
del model  # as the trainer's step is gone when training ends
world.close(wait=True)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
open(os.path.join(sys.argv[1], f"rank{world.rank}.txt"), "w").write(" ".join(sorted(names)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists the process's threads from /proc")
def test_close_ends_the_process_group_before_the_interpreter_exits(tmp_path):
    """After World.close() no thread of the gloo group is left running, so nothing of it is torn down during the
    interpreter's exit, where it can abort a process that finished its work."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    r = subprocess.run(torchrun_cmd(2, entry=(str(script), str(tmp_path))), capture_output=True, text=True,
                       timeout=LAUNCH_TIMEOUT, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    threads = {rank: (tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)}
    assert all(not any("gloo" in name for name in names) for names in threads.values()), threads


class _Peers(World):
    """One process's view of a 2-process world, run in one process for the arithmetic: all_sum returns the sum
    over the whole batch, computed beforehand (the real collectives are in the torchrun tests above)."""

    def __init__(self, rank: int, size: int, totals: dict[tuple, Tensor]):
        super().__init__(rank, size)
        object.__setattr__(self, "totals", totals)

    def all_sum(self, t):
        return t.copy_(self.totals[tuple(t.shape)])


@pytest.mark.parametrize(("sigma", "free_bits"), [("0.1", 0.0), ("learned", 0.05), ("optimal", 0.05)])
def test_shard_parts_add_up_to_the_one_process_objective_and_gradients(sigma, free_bits):
    """Σ over processes of the objective's share, differentiated as Step does under DDP (which averages), has the
    one-process objective's gradients,
    and the shares add up to its value, with free bits and σ² = batch MSE computed from the whole batch."""
    torch.manual_seed(0)
    model = VAE((1, 4, 5), "mlp", [8], 3, make_likelihood("gaussian", sigma)).double()
    x, eps = torch.rand(11, 1, 4, 5, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    beta = 0.7  # free bits 0.05 clamp one of the three dimensions (batch-mean KLs 0.065, 0.029, 0.075)
    reference = copy.deepcopy(model)
    objective = ELBO(ObjectiveSettings(free_bits=free_bits))
    loss = objective(reference(x, eps), Batch(11, beta)).total
    loss.backward()
    with torch.no_grad():
        whole = copy.deepcopy(model)(x, eps)  # the whole batch's statistics, which the collectives would sum
        sq = (x - whole_mean(model, x, eps)).square().flatten(1).sum(1)
    totals = {(2,): torch.stack([sq.sum(), torch.tensor(11.0, dtype=torch.float64)]),
              (3,): whole.kl_per_dim.sum(0) / 11}  # the batch-mean KL per dimension
    shares = 0.0
    for rank in range(2):
        world = _Peers(rank, 2, totals)
        if sigma == "optimal":
            model.likelihood.batch_reduce = world.all_sum
        rows = world.rows(11)
        share = objective(model(x[rows], eps[rows]), Batch(11, beta, world.all_sum, world.size)).total
        (share * world.size / world.size).backward()  # Step's scaling, then DDP's average over the processes
        shares += share.item()
    assert shares == pytest.approx(loss.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def whole_mean(model, x, eps):
    q = model.encode(x)
    return model.decode_mean(q.reparameterize(eps))


STOP_THEN_SIGTERM = """
import os, signal, sys, time
from vaelab.errors import TrainingError
from vaelab.training.stopping import StopFlag
try:
    with StopFlag((signal.SIGINT, signal.SIGTERM)):
        if sys.argv[1] == "error":
            raise TrainingError("lost a peer")
except TrainingError:
    pass
os.kill(os.getpid(), signal.SIGTERM)  # what torchrun sends once another process has died
time.sleep(0.5)
print("reported")
"""


@pytest.mark.parametrize("how", ["error", "clean"])
def test_a_process_leaving_with_an_error_is_not_silenced_by_the_launchers_sigterm(how):
    """The launcher's SIGTERM, arriving after a process noticed a dead peer but before it printed where its
    checkpoint stands, must not end it silently (nor leave it running); after a clean end the usual SIGTERM
    behaviour is back."""
    r = subprocess.run([sys.executable, "-c", STOP_THEN_SIGTERM, how], capture_output=True, text=True, timeout=60,
                       env=env())
    assert "reported" not in r.stdout
    if how == "error":  # the error's line, then at once out: a process waiting on a dead peer must still end
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == "vaelab: error: lost a peer"
    else:
        assert r.returncode == -signal.SIGTERM
