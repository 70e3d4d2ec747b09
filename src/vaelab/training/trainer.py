"""The training loop. It knows nothing about likelihoods, networks or objectives: each step minimises the run's
objective (vaelab.models.objective) by autograd and the optimizer (vaelab.training.step.Step).

Each batch is gathered from the training set as stored (uint8 where the data is 8-bit) and scaled on the fly:
from one resident tensor, or, for memory-mapped data, by a background thread one batch ahead (data.BatchSource).
The loop makes no host sync except to read the loss of every PROGRESS_EVERY-th batch
(progress bar and non-finite check). On a GPU the step is replayed as one CUDA graph where that is exact
(vaelab.training.cudagraph; --no-cuda-graph turns it off).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import Device, TrainConfig
from ..data import ImageData, Prepared, prepare_data
from ..errors import ConfigError, RunError, TrainingError
from ..models.hierarchical import HierarchicalVAE
from ..models.likelihoods import LIKELIHOODS
from ..models.objective import Objective
from ..models.vae import VAE
from ..runs import (
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
from .budget import Budget
from .build import check_precision, make_objective_for, make_optimizer, make_step, resolve_device
from .cudagraph import GuardedStep
from .distributed import SINGLE, World, check_batch, join
from .ema import EMA
from .evaluation import NEGATIVE_NOTE, Scored, elbo_metrics, loss_text
from .monitor import TensorBoard
from .progressive import check_progressive, open_at
from .schedule import LRSchedule, make_schedule, stopped_note
from .stopping import NONFINITE_STOP, StopFlag, nonfinite_message

PROGRESS_EVERY = 25  # steps between progress-bar refreshes (each one reads the loss back to the host)
EVAL_SEED = 12345


def default_out(config: TrainConfig) -> Path:
    if config.runtime.out:
        return Path(config.runtime.out)
    data, model = config.data, config.model
    stem = Path(data.dataset).stem if data.dataset not in ("mnist", "fashion-mnist") else data.dataset
    name = config.runtime.name or f"{stem}-{model.likelihood}-{model.sigma}-z{model.latent_dim}".replace("/", "_")
    return Path("runs") / name


def _rng_state(shuffle_state: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state(), "shuffle": shuffle_state}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def train(config: TrainConfig | dict, progress: bool = True, data: ImageData | None = None) -> Run:
    """Train a VAE as `config` says and return the finished Run (also written to its run directory).

    `config` is a TrainConfig or its settings as a dict (flat or by role). `data` (already loaded, e.g. to train
    many models on one dataset) replaces the load of the config's dataset; its limit still applies to it.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return _start(config, progress, data, continuing=False)


def resume(path: str | Path, progress: bool = True, epochs: int | None = None, device: Device | None = None,
           time_limit: float | None = None) -> Run:
    """Continue the run in `path` from its checkpoint, up to `epochs` in total (default: its own setting), within
    `time_limit` minutes (default: none, whatever limit the run had before). On a CPU the result is bit-identical
    to an uninterrupted run."""
    path = Path(path)
    if not (path / CHECKPOINT).is_file():
        raise RunError(f"{path}: no {CHECKPOINT} to resume from (give a run directory that trained at least "
                       "part of an epoch)")
    config = TrainConfig.load(path / CONFIG).replace(out=str(path), time_limit=time_limit)
    if epochs is not None:
        done = checkpoint_epoch(path / CHECKPOINT)
        if epochs <= done:
            raise ConfigError(f"--epochs is the new total and must exceed the {done} epochs already trained; "
                              f"got {epochs}")
        config = config.replace(epochs=epochs)
    if device is not None:
        config = config.replace(device=device)
    return _start(config, progress, None, continuing=True)


def _start(config: TrainConfig, progress: bool, data: ImageData | None, continuing: bool) -> Run:
    budget = Budget(config.runtime.time_limit, PROGRESS_EVERY)  # the clock starts now
    out = default_out(config)
    # under torchrun: this process's rank and device; a single process otherwise (World())
    world, device = join(resolve_device(config.runtime.device))
    try:
        check_batch(config.batch_size, world)
        make_objective_for(config).check_processes(world.size)

        def check_out():
            if not continuing and (out / CONFIG).exists():
                raise RunError(f"{out} already holds a run; pass --resume {out} to continue it or choose another "
                               "--out")

        world.agree(check_out)  # every process looks before rank 0 writes there
        check_precision(config, device)
        # training draws from torch's global generators (initialisation, z); the caller's streams are put back after
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(config.optim.seed)
            shuffle = torch.Generator().manual_seed(config.optim.seed)
            state = world.agree(lambda: setup_run(config, out, device, data, continuing, shuffle,
                                               progress and world.main, world))  # one fails: all stop
            run = _loop(state, device, shuffle, progress and world.main, world, budget)
    except BaseException:
        world.close()  # another process may be gone: none waits for the others
        raise
    world.close(wait=True)  # every process trained to the same end
    return run


@dataclass
class RunState:
    """A run in training: its config (with the data's shape and its folder), data, model and where it stands."""

    config: TrainConfig
    out: Path
    prep: Prepared
    model: VAE
    optimizer: torch.optim.Optimizer
    board: TensorBoard | None
    epoch: int = 0
    start_step: int = 0
    metrics: list[dict] = field(default_factory=list)
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # the checkpoint's EMA and guard counts


def setup_run(config: TrainConfig, out: Path, device: torch.device, data: ImageData | None, continuing: bool,
              shuffle: torch.Generator, progress: bool, world: World) -> RunState:
    """A run ready to train: its data prepared, its model built (and initialised from the data, or loaded from
    its checkpoint when `continuing`), its optimizer, and its config saved into `out`. Initialisation draws from
    torch's global generator: the caller seeds it."""
    binary_only = LIKELIHOODS[config.model.likelihood].binary_only
    prep = prepare_data(config, device, data, progress=progress, binary_only=binary_only)
    check_progressive(config, prep.data.shape)
    board = None
    if config.runtime.tensorboard and world.main:  # before anything is written: the package may be missing
        board = TensorBoard(config.runtime.tensorboard, prep.test, prep.prepare, prep.train.shape[0])
    config = config.replace(data_shape=list(prep.data.shape), out=str(out))
    model = VAE.from_config(config, prep.data.shape).to(device)
    optimizer = make_optimizer(config, model)
    state = RunState(config, out, prep, model, optimizer, board)
    if continuing:
        meta, rng = load_checkpoint(out / CHECKPOINT, model, optimizer, extra=("ema", "guard"))
        state.epoch, state.start_step, state.saved = meta["epoch"], meta["step"], meta["extra"]
        torch.set_rng_state(rng["cpu"])
        shuffle.set_state(rng["shuffle"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        state.metrics = [r for r in read_metrics(out / METRICS) if r["epoch"] <= state.epoch]
    else:
        model.init_from_data(prep.prepare(prep.train[:config.batch_size]))  # a learned σ starts from the data
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
    if world.main:
        config.save(out / CONFIG)
    return state


def _loop(s: RunState, device: torch.device, shuffle: torch.Generator, progress: bool, world: World,
          budget: Budget) -> Run:
    """Epochs up to the config's total or the time limit; a checkpoint, metrics and weights after each one."""
    config, out = s.config, s.out
    n = s.prep.train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    objective = make_objective_for(config, dataset_size=n)
    ema = EMA(s.model, config.optim.ema) if config.optim.ema > 0 else None
    if ema is not None and "ema" in s.saved:
        ema.load_state_dict(s.saved["ema"])
    schedule = make_schedule(config.optim, s.optimizer)
    train_step = make_step(config, s.model, s.optimizer, objective, s.prep, device, world, ema, schedule is not None)
    guard = train_step.guard
    if "guard" in s.saved:  # the counts of an epoch interrupted part-way
        saved_stats = s.saved["guard"]["stats"]
        guard.stats[:len(saved_stats)].copy_(saved_stats)
    # where the checkpoint on disk stands, for the message if another process dies
    saved = [f"epoch {s.epoch + 1}, step {s.start_step}" if s.start_step else
             f"end of epoch {s.epoch}" if s.epoch else None]

    def lost() -> str:
        if saved[0] is None:
            return "no epoch was completed, so no checkpoint was written"
        return f"the last checkpoint ({saved[0]}) is kept: continue with vaelab train --resume {out}"

    signals = (signal.SIGINT, signal.SIGTERM) if world.size > 1 else (signal.SIGINT,)
    with StopFlag(signals) as stop, world.watch(lost), contextlib.closing(s.board or _Nothing()):
        while s.epoch < config.optim.epochs and not budget.expired(world.size):
            shuffle_state = shuffle.get_state()  # lets a mid-epoch checkpoint rebuild this epoch's order
            order = torch.randperm(n, generator=shuffle).to(device)
            s.prep.batches.plan(order, s.start_step)  # mapped data: the next batch is read while a step runs
            t0 = time.perf_counter()
            step = _run_epoch(config, s.model, train_step, order, s.epoch, s.start_step, steps_per_epoch, stop,
                              progress, world, budget, schedule)
            train_seconds = time.perf_counter() - t0
            extra = {"guard": {"stats": guard.stats.clone()}, **({"ema": ema.state_dict()} if ema else {})}
            if step < steps_per_epoch and not budget.hit:  # stopped by Ctrl-C mid-epoch
                _interrupted(s, step, steps_per_epoch, _rng_state(shuffle_state, device), world, extra)
            counts = guard.take()
            if step < steps_per_epoch:  # the time limit, mid-epoch: the checkpoint resumes at this step
                meta, rng = {"epoch": s.epoch, "step": step}, _rng_state(shuffle_state, device)
                done = round(s.epoch + step / steps_per_epoch, 4)
            else:
                s.start_step, s.epoch = 0, s.epoch + 1
                meta, rng, done = {"epoch": s.epoch, "step": 0}, _rng_state(shuffle.get_state(), device), s.epoch
                extra["guard"] = {"stats": guard.stats.clone()}
            save_epoch(s, objective, ema, done, step < steps_per_epoch, {**counts, "seconds": train_seconds}, world,
                       budget, progress, (meta | {"world_size": world.size}, rng, extra))
            if step < steps_per_epoch:
                saved[0] = f"epoch {s.epoch + 1}, step {step}"
                break
            saved[0] = f"end of epoch {s.epoch}"
        if budget.hit and s.metrics and "stopped" not in s.metrics[-1]:  # stopped between two epochs
            _stopped_on_time(s, world, progress)
    if ema is not None:
        ema.copy_to_model()  # the run's model is the one it evaluated and saved
    if isinstance(s.model, HierarchicalVAE):
        s.model.open_resolutions(None)  # as the saved weights load: every group from q(z|x)
    s.model.eval()
    return Run(out, config, s.model, s.metrics)


def save_epoch(s: RunState, objective: Objective, ema: EMA | None, done: float, partial: bool, train: dict,
               world: World, budget: Budget, progress: bool, checkpoint: tuple[dict, dict, dict]) -> None:
    """After the training of an epoch (or of part of one, stopped by the time limit: `done` epochs in all): the
    metrics of the model it evaluates (the weights' moving average, if kept), its weights, then the checkpoint to
    resume from."""
    with budget.evaluating(), ema.applied() if ema is not None else contextlib.nullcontext():
        rows = _epoch_metrics(s.config, s.model, objective, s.prep, s.epoch + partial, train["seconds"], world,
                              done=done)
        if s.board is not None:
            s.board.epoch(s.epoch + partial, rows, s.model)
        if world.main:
            save_weights(s.model, s.out / WEIGHTS)
    rows[0].update(train, lr=s.optimizer.param_groups[0]["lr"])  # the rate of the epoch's last step
    if partial:
        for row in rows:
            row["stopped"] = "time-limit"
    s.metrics += rows
    if world.main:
        write_metrics(s.out / METRICS, s.metrics)
        meta, rng, extra = checkpoint
        save_checkpoint(s.out / CHECKPOINT, s.model, s.optimizer, meta, rng, extra)
    if progress:
        _print_epoch(s, done, train)


def _print_epoch(s: RunState, done: float, train: dict) -> None:
    test, optim = s.metrics[-1], s.config.optim
    notes = []
    if train["skipped_updates"]:
        notes.append(f"{train['skipped_updates']} updates skipped (gradient norm over {optim.skip_threshold:g}x "
                     "the usual)")
    if train["clipped_updates"]:
        notes.append(f"{train['clipped_updates']} updates clipped (gradient norm over {optim.clip_threshold:g}x the "
                     "usual)")
    if train["nonfinite_steps"]:
        notes.append(f"{train['nonfinite_steps']} non-finite steps skipped")
    if "open_groups" in test:
        notes.append(f"latent groups open to x: the top {test['open_groups']} of {len(test['kl_per_group'])} "
                     "(--progressive)")
    if "stopped" in test:
        notes.append(_stop_text(s, done))
    print(f"epoch {done:g}/{optim.epochs}: test {loss_text(test)}, {train['seconds']:.1f}s"
          + "".join(f"; {n}" for n in notes), file=sys.stderr)
    if test["loss"] < 0 and all(r["loss"] >= 0 for r in s.metrics[:-1] if r["split"] == "test"):
        print(f"  ({NEGATIVE_NOTE})", file=sys.stderr)  # once: the first epoch below 0


def _stop_text(s: RunState, done: float, when: str = "") -> str:
    """What a run stopped by the time limit after `done` epochs tells the user."""
    text = (f"stopped at the {s.config.runtime.time_limit:g}-minute time limit{when}; continue with vaelab train "
            f"--resume {s.out}" + stopped_note(s.config.optim, done))
    if "open_groups" in s.metrics[-1]:
        text += ("; --progressive had not yet opened every latent group, and the weights load with every group "
                 "from q(z|x), whose lower groups have not learned: resume to finish")
    return text


def _stopped_on_time(s: RunState, world: World, progress: bool) -> None:
    """The time limit fell at the end of an epoch: its rows say so."""
    for row in s.metrics[-2:]:
        row["stopped"] = "time-limit"
    if world.main:
        write_metrics(s.out / METRICS, s.metrics)
    if progress:
        print(_stop_text(s, s.epoch, f" after epoch {s.epoch}"), file=sys.stderr)


def _interrupted(s: RunState, step: int, steps_per_epoch: int, rng: dict[str, Tensor], world: World,
                 extra: dict[str, dict[str, Tensor]]) -> None:
    """Ctrl-C mid-epoch: a checkpoint that resumes at this step, then stop."""
    if world.main:
        save_checkpoint(s.out / CHECKPOINT, s.model, s.optimizer,
                        {"epoch": s.epoch, "step": step, "world_size": world.size}, rng, extra)
        print(f"\ninterrupted: checkpoint saved at epoch {s.epoch + 1}, step {step}/{steps_per_epoch}; "
              f"continue with: vaelab train --resume {s.out}", file=sys.stderr)
    raise KeyboardInterrupt


class _Nothing:
    def close(self) -> None:
        pass


def beta_at(config: TrainConfig, epoch_progress: float) -> float:
    if config.optim.kl_warmup <= 0:
        return config.optim.beta
    return config.optim.beta * min(1.0, epoch_progress / config.optim.kl_warmup)


def _run_epoch(config, model, train_step: GuardedStep, order, epoch, start_step, steps_per_epoch, stop,
               progress, world: World = SINGLE, budget: Budget | None = None, schedule: LRSchedule | None = None
               ) -> int:
    """The steps of one epoch from `start_step`; returns the step it stopped before (steps_per_epoch: all done).
    `schedule` sets the learning rate before each step."""
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{config.optim.epochs}",
                   unit="step", leave=False, dynamic_ncols=True)
    budget = budget or Budget(None, PROGRESS_EVERY)
    budget.start_epoch(start_step)
    count = 0
    step = start_step
    try:
        for step in range(start_step, steps_per_epoch):
            if stop.agreed or (stop.requested and world.size == 1) or budget.due(step, world.size):
                return step
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            beta = beta_at(config, epoch + step / steps_per_epoch)
            open_at(config, model, epoch + step / steps_per_epoch)
            if schedule is not None:
                schedule(epoch, step, steps_per_epoch)
            loss = train_step(idx, beta)  # with several processes: this process's share of the loss
            count += 1
            if count == PROGRESS_EVERY or step == steps_per_epoch - 1:  # reading the loss waits for the device
                planned = budget.plan(step) if world.main else 0.0  # the time limit: where all processes stop
                # summed over the processes
                value, stop.agreed, planned = world.report(loss, stop.requested, planned)
                budget.agree(planned)
                skipped, streak, clipped = train_step.guard.peek()  # the same on every process
                if streak >= min(NONFINITE_STOP, step + 1):  # every step in a while: the weights themselves are bad
                    raise TrainingError(nonfinite_message(config, model, epoch, step, streak))
                if bar is not None:
                    shown = {"loss": f"{value:.2f}", "beta": f"{beta:.2f}", **({"skipped": skipped} if skipped else {}),
                             **({"clipped": clipped} if clipped else {}),
                             **({"lr": f"{schedule.optimizer.param_groups[0]['lr']:.2e}"} if schedule else {})}
                    bar.set_postfix(ordered_dict=shown)
                    bar.update(count)
                count = 0
                if stop.agreed and world.size > 1:
                    return step + 1
        return steps_per_epoch
    finally:
        if bar is not None:
            bar.close()


def _epoch_metrics(config, model, objective: Objective, prep, epoch, train_seconds, world: World = SINGLE,
                   done: float | None = None) -> list[dict]:
    """Each split's metrics, the evaluation shared among the processes: the numbers one process reports.
    `epoch` seeds the evaluation's draws; `done` (default `epoch`) is the epochs trained, a fraction for an epoch
    stopped part-way."""
    rows = []
    done = epoch if done is None else done
    # `loss` is always the −ELBO; an objective that differs from it is reported beside it
    differs = not objective.is_elbo(config.optim.beta) or config.optim.kl_warmup > 0
    scored = Scored(objective, beta_at(config, float(done))) if differs else None
    for split, x in (("train", prep.train_eval), ("test", prep.test)):
        m = elbo_metrics(model, x, max(config.batch_size, 1000), prep.prepare, seed=EVAL_SEED + epoch,
                         part=(world.rank, world.size), reduce=world.all_sum if world.size > 1 else None,
                         scored=scored)
        row = {"epoch": done, "split": split, **m, "world_size": world.size}
        if getattr(model, "opened", None) is not None:  # --progressive: the groups below these held nothing of x
            row["open_groups"] = model.opened
        if not prep.normalized:
            row["normalized"] = False
        if split == "train":
            row["seconds"] = train_seconds
        rows.append(row)
    return rows
