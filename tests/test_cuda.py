"""The GPU path: the closed-form gradients, the training step and its CUDA graph, resume and eval on CUDA.
Skipped where torch sees no GPU (the CI machine has none); run on a GPU machine with
`python -m pytest tests/test_cuda.py`."""

import warnings

import pytest
import torch

import toy_objective
from test_gradients import REFERENCE, SPECS, _inputs, _likelihood, check_against_reference
from vaelab import resume, train
from vaelab.config import TrainConfig
from vaelab.models.objective import ELBO, ObjectiveSettings
from vaelab.models.vae import VAE
from vaelab.training import cudagraph
from vaelab.training.build import autocast, make_optimizer
from vaelab.training.step import Step, local_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize(("name", "sigma", "function"), SPECS)
def test_log_prob_gradients_equal_autograd_on_cuda_in_float64(name, sigma, function, lead):
    lik = _likelihood(name, sigma).to(CUDA)
    params, x = _inputs(lik, name, lead)
    params = [p.detach().to(CUDA).requires_grad_() for p in params]
    check_against_reference(lik, REFERENCE[name], params, x.detach().to(CUDA).requires_grad_())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("lik", "sigma", "free_bits"),
                         [("bernoulli", "0.1", 0.0), ("gaussian", "0.1", 0.0), ("gaussian", "learned", 0.5)])
def test_training_steps_never_wait_for_the_gpu(lik, sigma, free_bits, precision):
    """What the training loop runs per step (batch gather, preparation, loss and gradients, fused Adam) issues no
    host-device synchronisation: torch's sync debug mode turns any into an error."""
    cfg = TrainConfig(likelihood=lik, sigma=sigma, hidden=[400], latent_dim=20, precision=precision)
    model = VAE.from_config(cfg, (1, 28, 28)).to(CUDA)
    optimizer = make_optimizer(cfg, model)
    data = torch.randint(0, 256, (1024, 1, 28, 28), dtype=torch.uint8, device=CUDA)
    order = torch.randperm(1024, device=CUDA)
    step = Step(model, optimizer, ELBO(ObjectiveSettings(free_bits=free_bits)),
                local_inputs(lambda idx: data.index_select(0, idx).float() / 255), autocast(cfg, CUDA))
    losses = []
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():  # "a prototype feature": it errs on the side of missing some syncs
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        for i in range(8):
            losses.append(step(order[i * 128:(i + 1) * 128], 1.0))
        with pytest.raises(RuntimeError, match="synchroniz"):  # the detector works: reading a loss waits
            losses[-1].item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = torch.stack(losses).cpu()
    assert torch.isfinite(values).all()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters())


def _cfg(tmp_path, name, **kw):
    base = dict(dataset="fashion-mnist", limit=3000, hidden=[64], latent_dim=4, batch_size=100, device="cuda",
                likelihood="bernoulli", binarize="dynamic", out=str(tmp_path / name))
    return TrainConfig(**{**base, **kw})


def test_cuda_resume_is_bit_identical_and_trains(tmp_path, fashion):
    full = train(_cfg(tmp_path, "full", epochs=3), progress=False, data=fashion)
    train(_cfg(tmp_path, "part", epochs=1), progress=False, data=fashion)
    resumed = resume(tmp_path / "part", progress=False, epochs=3)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert p.device.type == "cuda", name
        assert torch.equal(p, q), name
    losses = [r["loss"] for r in full.metrics if r["split"] == "test"]
    assert losses == [r["loss"] for r in resumed.metrics if r["split"] == "test"]
    assert losses[-1] < losses[0] - 5  # it learns


def test_cuda_and_cpu_training_reach_the_same_loss(tmp_path, fashion):
    """Same data order and seed; the GPU draws other noise, so the runs differ by Monte-Carlo noise only."""
    gpu = train(_cfg(tmp_path, "gpu", epochs=2), progress=False, data=fashion)
    cpu = train(_cfg(tmp_path, "cpu", epochs=2, device="cpu"), progress=False, data=fashion)
    assert gpu.last("test")["loss"] == pytest.approx(cpu.last("test")["loss"], abs=3.0)


def test_bf16_on_cuda_keeps_the_elbo(tmp_path, fashion):
    fp32 = train(_cfg(tmp_path, "fp32", epochs=2), progress=False, data=fashion)
    bf16 = train(_cfg(tmp_path, "bf16", epochs=2, precision="bf16"), progress=False, data=fashion)
    assert bf16.last("test")["loss"] == pytest.approx(fp32.last("test")["loss"], abs=3.0)


def test_eval_on_cuda_agrees_with_cpu(tmp_path, fashion):
    from vaelab import api

    run = train(_cfg(tmp_path, "run", epochs=1, device="cpu"), progress=False, data=fashion)
    on = {d: api.evaluate(run.path, "test", 64, 250, 1000, device=d, progress=False) for d in ("cpu", "cuda")}
    for key in ("elbo", "log_px"):
        assert on["cuda"][key] == pytest.approx(on["cpu"][key], abs=0.5), key
    assert on["cuda"]["log_px"] >= on["cuda"]["elbo"] - 0.1  # the IWAE bound is at least the ELBO


def _spy_on_graph(monkeypatch) -> list[bool]:
    """Record each full-size CUDAGraphStep call (True once it replays)."""
    calls = []
    original = cudagraph.CUDAGraphStep.__call__

    def spy(self, idx, beta):
        if len(idx) == self.batch_size:
            calls.append(self.graph is not None)
        return original(self, idx, beta)

    monkeypatch.setattr(cudagraph.CUDAGraphStep, "__call__", spy)
    return calls


@pytest.mark.parametrize(("lik", "sigma", "extra"), [
    ("bernoulli", "0.1", {}), ("gaussian", "0.1", {}), ("gaussian", "learned", {}), ("gaussian", "optimal", {}),
    ("laplace", "learned", {}), ("laplace", "0.1", {}),
    ("bernoulli", "0.1", {"precision": "bf16"}),  # autograd under autocast, captured
    ("bernoulli", "0.1", {"arch": "conv", "hidden": [8, 16]}),  # autograd through convolutions, captured
    ("bernoulli", "0.1", {"free_bits": 0.1}),  # the objective's batch statistic, captured
    ("bernoulli", "0.1", {"objective": toy_objective.ReconstructionOnly.name}),  # registered through the public API
    ("bernoulli", "0.1", {"objective": "iwae", "iw_train": 4}),  # K draws of z per image
    ("bernoulli", "0.1", {"ema": 0.99, "grad_clip": 30.0, "skip_threshold": 2.0}),  # the guards and EMA, captured
])
def test_cuda_graph_replays_equal_eager_steps(tmp_path, fashion, monkeypatch, lik, sigma, extra):
    """The trainer replays full-size steps as a CUDA graph (one eager step, then replays; the short last batch
    runs eagerly) and reaches the weights of the same run launched kernel by kernel."""
    calls = _spy_on_graph(monkeypatch)
    # cuDNN picks convolution algorithms per call, some of them summing in a run-dependent order: for the conv
    # case both runs must use the deterministic ones to be comparable step by step
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    kw = dict(epochs=1, limit=3050, likelihood=lik, sigma=sigma, binarize="dynamic" if lik == "bernoulli" else "none",
              **extra)
    graphed = train(_cfg(tmp_path, "graph", **kw), progress=False, data=fashion)
    assert calls == [False] + [True] * 29  # 30 full batches of 100; the last 50 images are a short eager step
    eager = train(_cfg(tmp_path, "eager", cuda_graph=False, **kw), progress=False, data=fashion)
    assert len(calls) == 30
    for (name, p), q in zip(graphed.model.state_dict().items(), eager.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert graphed.last("test")["loss"] == pytest.approx(eager.last("test")["loss"], rel=1e-5)


def test_a_module_hook_keeps_the_step_out_of_the_graph(tmp_path, fashion, monkeypatch):
    """A hook is Python that would run once, at capture, and never on replay: such a model trains eagerly."""
    from torch.nn.modules.module import register_module_forward_hook

    calls = _spy_on_graph(monkeypatch)
    seen = []
    handle = register_module_forward_hook(lambda module, args, out: seen.append(1))
    try:
        train(_cfg(tmp_path, "hooked", epochs=1, limit=500), progress=False, data=fashion)
    finally:
        handle.remove()
    assert calls == []
    assert len(seen) > 5 * 2  # no graph; the hook ran on every step's forward


def test_a_poisoned_replay_of_the_graph_changes_nothing_and_is_counted():
    """The guard decides on the GPU inside the recorded step: a replay whose loss is non-finite, or whose gradient
    norm passes the threshold, leaves weights, moments and step count alone and is counted; the next replay
    trains again. Nothing reads the decision on the host."""
    from vaelab.training.ema import EMA
    from vaelab.training.step import Guards

    cfg = TrainConfig(likelihood="gaussian", sigma="0.1", hidden=[64], latent_dim=4)
    model = VAE.from_config(cfg, (1, 28, 28)).to(CUDA)
    optimizer = make_optimizer(cfg, model)
    data = torch.rand(512, 1, 28, 28, device=CUDA)
    scale = torch.ones((), device=CUDA)  # read by every replay: the poison goes in here
    ema = EMA(model, 0.9)
    step = Step(model, optimizer, ELBO(ObjectiveSettings()), local_inputs(lambda idx: data[idx] * scale),
                guards=Guards(skip_threshold=100.0), ema=ema)  # the threshold is recorded with the graph
    graphed = cudagraph.CUDAGraphStep(step, 128, 1.0, CUDA)
    idx = torch.arange(128, device=CUDA)
    for _ in range(12):  # the usual gradient norm settles over the first updates
        graphed(idx, 1.0)
    assert graphed.graph is not None
    counts = step.guard.take()
    assert counts["skipped_updates"] == 0
    assert counts["grad_norm_max"] < 3 * counts["grad_norm_usual"]  # 1e4 x the pixels: a norm far above 100x
    for poison, counted in ((float("nan"), "nonfinite_steps"), (1e4, "skipped_updates")):
        before = [p.detach().clone() for p in model.parameters()]
        moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
        steps = [s["step"].clone() for s in optimizer.state.values()]
        scale.fill_(poison)
        graphed(idx, 1.0)
        scale.fill_(1.0)
        torch.cuda.synchronize()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)), counted
        assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, optimizer.state.values(), strict=True))
        assert all(torch.equal(t, s["step"]) for t, s in zip(steps, optimizer.state.values(), strict=True))
        assert step.guard.take()[counted] == 1
        assert ema.updates.item() > 0
        graphed(idx, 1.0)
        assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
