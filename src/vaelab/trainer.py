"""The training loop. It knows nothing about likelihoods or networks: it optimizes `objective(model.terms(x))`,
whose gradients `fused.loss_and_grads` computes (by hand for MLP networks, else by autograd).

The training set stays resident as one tensor (uint8 where the data is 8-bit) and each batch is gathered
and scaled on the fly. The loop makes no host sync except to read the loss of every 25th batch (progress bar
and non-finite check); the steps between compute gradients only. On a GPU, a full-size training step
(batch gather, scaling, loss and gradients, Adam) is captured once as a CUDA graph and replayed: the step's
~100 small kernels are then one launch (set CUDA_GRAPHS = False to turn it off).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.adam import adam as adam_update

from .config import TrainConfig
from .data import ImageData, Prepared, prepare_data
from .errors import ConfigError, RunError, TrainingError
from .fused import hooked, loss_and_grads
from .metrics import elbo_metrics
from .model import VAE
from .runs import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    WEIGHTS,
    Run,
    checkpoint_epoch,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    save_weights,
    write_metrics,
)

PROGRESS_EVERY = 25  # steps between progress-bar refreshes (each one reads the loss back to the host)
FUNCTIONAL_ADAM = True  # Adam's update through torch.optim.adam.adam on cached lists (AdamStep), on the CPU
CUDA_GRAPHS = True  # replay full-size training steps on a GPU as one CUDA graph, where GraphStep.usable says so
EVAL_SEED = 12345


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch.cuda.is_available() is False; use cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def default_out(config: TrainConfig) -> Path:
    if config.out:
        return Path(config.out)
    stem = Path(config.dataset).stem if config.dataset not in ("mnist", "fashion-mnist") else config.dataset
    name = config.name or f"{stem}-{config.likelihood}-{config.sigma}-z{config.latent_dim}".replace("/", "_")
    return Path("runs") / name


def make_optimizer(config: TrainConfig, model: VAE) -> torch.optim.Optimizer:
    """Adam runs as one fused kernel over all parameters on CPU and CUDA (same update, deterministic);
    the per-parameter loop it replaces took 1.8 of 8.2 ms per step of the 784-400-20 MLP on one CPU thread
    (0.5 ms fused). A resumed run keeps whatever implementation its checkpoint's param_groups name, so it
    continues exactly as it started."""
    groups = model.param_groups(config.optimizer, config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    # capturable: the step count lives on the GPU, so the update can be replayed inside a CUDA graph
    capturable = fused and all(p.device.type == "cuda" for p in params)
    return torch.optim.Adam(groups, lr=config.lr, fused=fused or None, capturable=capturable)


def autocast(config: TrainConfig, device: torch.device):
    """The context the training step's forward pass runs in: bfloat16 autocast for --precision bf16.

    Only the encoder's and decoder's matmuls/convolutions run in bfloat16; the model casts their outputs back,
    so the reparameterized z, the KL and the likelihood are float32, as are the weights, gradients and Adam's
    state. Evaluation (metrics.jsonl, eval, report) never uses it: every reported number is float32.
    """
    if config.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
                          "has none: use --precision fp32")
    if device.type == "cpu" and not _cpu_has_bf16():
        warnings.warn("this CPU has no native bfloat16 matmul (AVX-512-BF16 or AMX), so --precision bf16 is "
                      "emulated and slower than fp32", RuntimeWarning, stacklevel=3)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _rng_state(shuffle_state: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state(), "shuffle": shuffle_state}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def train(config: TrainConfig | dict, progress: bool = True, data: ImageData | None = None,
          resume: bool = False) -> Run:
    """Train a VAE as `config` says and return the finished Run (also written to its run directory).

    With resume=True the run directory's checkpoint is loaded and training continues to config.epochs;
    on CPU the result is bit-identical to an uninterrupted run. `data` (already loaded, e.g. to train many
    models on one dataset) replaces the load of config.dataset; config.limit still applies to it.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    out = default_out(config)
    if not resume and (out / CONFIG).exists():
        raise RunError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    device = resolve_device(config.device)
    check_precision(config, device)
    # training draws from torch's global generators (initialisation, z); the caller's streams are put back after
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        return _train(config, out, device, progress, data, resume)


def _train(config: TrainConfig, out: Path, device: torch.device, progress: bool, data: ImageData | None,
           resume: bool) -> Run:
    torch.manual_seed(config.seed)
    prep = prepare_data(config, device, data)
    config.data_shape = list(prep.data.shape)
    config.out = str(out)
    model = VAE.from_config(config, prep.data.shape).to(device)
    optimizer = make_optimizer(config, model)
    shuffle = torch.Generator().manual_seed(config.seed)

    epoch, start_step = 0, 0
    metrics: list[dict] = []
    if resume:
        meta, rng = load_checkpoint(out / CHECKPOINT, model, optimizer)
        epoch, start_step = meta["epoch"], meta["step"]
        torch.set_rng_state(rng["cpu"])
        shuffle.set_state(rng["shuffle"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        metrics = [r for r in read_metrics(out / METRICS) if r["epoch"] <= epoch]
    else:
        model.init_from_data(prep.prepare(prep.train[:config.batch_size]))
        out.mkdir(parents=True, exist_ok=True)
    config.save(out / CONFIG)

    n = prep.train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    graph = GraphStep(config, model, optimizer, prep) if GraphStep.usable(config, model, optimizer, prep) else None
    adam_step = AdamStep(optimizer)
    with _StopFlag() as stop:
        while epoch < config.epochs:
            shuffle_state = shuffle.get_state()  # lets a mid-epoch checkpoint rebuild this epoch's order
            order = torch.randperm(n, generator=shuffle).to(device)
            t0 = time.perf_counter()
            step = _run_epoch(config, model, adam_step, prep, order, epoch, start_step, steps_per_epoch,
                              stop, progress, graph)
            train_seconds = time.perf_counter() - t0
            if step < steps_per_epoch:  # stopped by Ctrl-C mid-epoch
                save_checkpoint(out / CHECKPOINT, model, optimizer,
                                {"epoch": epoch, "step": step}, _rng_state(shuffle_state, device))
                print(f"\ninterrupted: checkpoint saved at epoch {epoch + 1}, step {step}/{steps_per_epoch}; "
                      f"continue with: vaelab train --resume {out}", file=sys.stderr)
                raise KeyboardInterrupt
            start_step = 0
            epoch += 1
            metrics += _epoch_metrics(config, model, prep, epoch, train_seconds)
            write_metrics(out / METRICS, metrics)
            save_weights(model, out / WEIGHTS)
            save_checkpoint(out / CHECKPOINT, model, optimizer, {"epoch": epoch, "step": 0},
                            _rng_state(shuffle.get_state(), device))
            if progress:
                test = metrics[-1]
                print(f"epoch {epoch}/{config.epochs}: test loss {test['loss']:.2f} nats "
                      f"(rec {test['rec']:.2f}, kl {test['kl']:.2f}), {train_seconds:.1f}s", file=sys.stderr)
    model.eval()
    return Run(out, config, model, metrics)


def resume(path: str | Path, progress: bool = True, epochs: int | None = None, device: str | None = None) -> Run:
    """Continue the run in `path` from its checkpoint, up to `epochs` in total (default: its own setting)."""
    path = Path(path)
    if not (path / CHECKPOINT).is_file():
        raise RunError(f"{path}: no {CHECKPOINT} to resume from (give a run directory that trained at least "
                       "part of an epoch)")
    config = TrainConfig.load(path / CONFIG)
    config.out = str(path)
    if epochs is not None:
        done = checkpoint_epoch(path / CHECKPOINT)
        if epochs <= done:
            raise ConfigError(f"--epochs is the new total and must exceed the {done} epochs already trained; "
                              f"got {epochs}")
        config.epochs = epochs
    if device is not None:
        config.device = device
    config.validate()
    return train(config, progress=progress, resume=True)


def beta_at(config: TrainConfig, epoch_progress: float) -> float:
    if config.kl_warmup <= 0:
        return config.beta
    return config.beta * min(1.0, epoch_progress / config.kl_warmup)


def _run_epoch(config, model, optimizer_step, prep, order, epoch, start_step, steps_per_epoch, stop, progress,
               graph: GraphStep | None = None) -> int:
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{config.epochs}",
                   unit="step", leave=False, dynamic_ncols=True)
    precision = autocast(config, order.device)
    count = 0
    step = start_step
    try:
        for step in range(start_step, steps_per_epoch):
            if stop.requested:
                return step
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            beta = beta_at(config, epoch + step / steps_per_epoch)
            # the loss of every PROGRESS_EVERY-th batch (and the last) is read back, shown and checked; the steps
            # between need only gradients (the hand-written step then skips the objective's value)
            report = count + 1 == PROGRESS_EVERY or step == steps_per_epoch - 1
            if graph is not None and not graph.disabled and len(idx) == config.batch_size:
                loss = graph(idx)
            else:
                loss = _step(config, model, optimizer_step, prep, idx, beta, precision, value=report)
            count += 1
            if report:
                value = loss.item()
                if not math.isfinite(value):  # non-finite weights make every later loss non-finite too
                    raise TrainingError(_nonfinite_message(config, epoch, step))
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.2f}", beta=f"{beta:.2f}")
                    bar.update(count)
                count = 0
        return steps_per_epoch
    finally:
        if bar is not None:
            bar.close()


def _step(config, model, optimizer_step: Callable[[], object], prep, idx, beta, precision,
          value: bool = True) -> torch.Tensor | None:
    """One training step on the examples `idx` of the training set; returns the loss (a 0-dim tensor), or
    possibly None with value=False (see fused.loss_and_grads)."""
    # index_select copies whole rows; plain indexing (train[idx]) gathers byte by byte, ~20x slower
    x = prep.prepare_train(prep.train.index_select(0, idx))  # (B, C, H, W) in [0, 1]
    loss = loss_and_grads(model, x, beta, config.free_bits, forward_context=precision, value=value)
    optimizer_step()
    return loss


class AdamStep:
    """optimizer.step(), or, for vaelab's own fused Adam on the CPU, the function Adam.step ends in
    (torch.optim.adam.adam, Adam's public functional form) on parameter and state lists gathered once.

    Same kernel, same arguments, same update: tests/test_train.py checks the trained weights bit for bit. What it
    skips is Adam.step's per-call bookkeeping (hooks, profiler scope, rebuilding the lists), ~100 µs, about 3 % of
    a 784-400-20 step on 2 CPU cores. Anything unusual takes optimizer.step(): a GPU (where the step is a CUDA
    graph), several parameter groups, AMSGrad, maximize, decoupled weight decay, a parameter without a gradient,
    an optimizer step hook, or FUNCTIONAL_ADAM = False."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.lists: tuple[list, list, list, list] | None = None  # params, exp_avgs, exp_avg_sqs, steps
        groups = optimizer.param_groups
        g = groups[0]
        self.direct = (type(optimizer) is torch.optim.Adam and len(groups) == 1 and bool(g.get("fused"))
                       and not (g["amsgrad"] or g["maximize"] or g.get("decoupled_weight_decay")
                                or g.get("capturable") or g.get("differentiable"))
                       and all(p.device.type == "cpu" for p in g["params"]))

    def _gather(self):
        params = self.optimizer.param_groups[0]["params"]
        states = [self.optimizer.state.get(p, {}) for p in params]
        if not all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in states):
            return None  # no state yet (the first step creates it)
        return (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states])

    def _hooked(self) -> bool:
        """Whether a step hook is registered (on this optimizer or globally): optimizer.step() runs those."""
        from torch.optim import optimizer as o

        names = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
        return any(getattr(self.optimizer, n, None) for n in names) or any(
            getattr(o, n, None) for n in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))

    def __call__(self) -> None:
        if FUNCTIONAL_ADAM and self.direct and self.lists is None:
            self.lists = self._gather()
        if not FUNCTIONAL_ADAM or self.lists is None or self._hooked():
            self.optimizer.step()
            return
        params, exp_avgs, exp_avg_sqs, steps = self.lists
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            self.optimizer.step()
            return
        g = self.optimizer.param_groups[0]
        adam_update(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False,
                    beta1=g["betas"][0], beta2=g["betas"][1], lr=g["lr"], weight_decay=g["weight_decay"],
                    eps=g["eps"], maximize=False)


class GraphStep:
    """A full-size training step on a GPU, captured once as a CUDA graph and replayed for every later batch.

    The first call runs the step eagerly (on a side stream, as capture requires: it initialises the optimizer's
    state and the libraries' per-stream handles) and then records it; each later call copies the batch's indices
    into the graph's input and replays it. Replays run the same kernels on the same tensors, and the graph's
    random draws advance the CUDA generator as eager ones do. The step may be the hand-written MLP step or
    autograd's (conv networks, --precision bf16). Used only where nothing in the step changes from one batch to
    the next or needs the host: a constant β (no --kl-warmup), Adam with its step count on the GPU (capturable)
    and no module hooks."""

    def __init__(self, config: TrainConfig, model: VAE, optimizer: torch.optim.Optimizer, prep: Prepared):
        self.config, self.model, self.optimizer, self.prep = config, model, optimizer, prep
        self.idx = torch.zeros(config.batch_size, dtype=torch.long, device=prep.train.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.disabled = False

    @staticmethod
    def usable(config: TrainConfig, model: VAE, optimizer: torch.optim.Optimizer, prep: Prepared) -> bool:
        if not CUDA_GRAPHS or prep.train.device.type != "cuda" or config.kl_warmup > 0:
            return False
        if not all(g.get("capturable") and g.get("fused") for g in optimizer.param_groups):
            return False  # e.g. SGD, or a checkpoint written without a GPU-resident step count
        return not hooked(model)  # a hook's Python would run once, at capture, and never on replay

    def _step(self) -> torch.Tensor:
        # autocast's cast cache must be off inside a graph capture (the casts are recorded like any other op)
        precision = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
                     if self.config.precision == "bf16" else None)
        return _step(self.config, self.model, self.optimizer.step, self.prep, self.idx, self.config.beta,
                     precision)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(idx)
        if self.graph is not None:
            self.graph.replay()
            return self.loss  # overwritten by the next replay: the caller reads it before then (stream order)
        side = torch.cuda.Stream(self.idx.device)
        side.wait_stream(torch.cuda.current_stream(self.idx.device))
        with torch.cuda.stream(side):
            loss = self._step()  # the real step for this batch
        torch.cuda.current_stream(self.idx.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records; runs nothing
                self.loss = self._step()
        except RuntimeError as e:  # something in the step cannot be captured: go on kernel by kernel
            warnings.warn(f"CUDA graph capture of the training step failed ({e}); training goes on without it",
                          RuntimeWarning, stacklevel=2)
            self.disabled = True
            return loss
        self.graph = graph
        return loss


def _nonfinite_message(config: TrainConfig, epoch: int, step: int) -> str:
    causes = [f"the learning rate is too high (--lr {config.lr:g}; try {config.lr / 10:g})"]
    if config.likelihood in ("gaussian", "laplace"):
        causes.append(f"σ is very small or learned σ collapsed (--sigma {config.sigma})")
    if config.beta != 1.0:
        causes.append(f"--beta {config.beta:g}")
    return (f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}; likely cause: "
            + "; or ".join(causes) + "."
            + (" The last checkpoint (previous epoch) is kept." if epoch > 0 else " No checkpoint was written."))


def _epoch_metrics(config, model, prep, epoch, train_seconds) -> list[dict]:
    rows = []
    for split, x in (("train", prep.train_eval), ("test", prep.test)):
        m = elbo_metrics(model, x, max(config.batch_size, 1000), prep.prepare, seed=EVAL_SEED + epoch)
        row = {"epoch": epoch, "split": split, **m}
        if config.beta != 1.0 or config.kl_warmup > 0 or config.free_bits > 0:
            row["objective"] = _objective_value(config, m, epoch)
        if not prep.normalized:
            row["normalized"] = False
        if split == "train":
            row["seconds"] = train_seconds
        rows.append(row)
    return rows


def _objective_value(config: TrainConfig, m: dict, epoch: int) -> float:
    """The training objective at the end of `epoch` on this split (free bits applied to the mean KL per dim)."""
    kl = sum(max(k, config.free_bits) for k in m["kl_per_dim"])
    return m["rec"] + beta_at(config, float(epoch)) * kl
