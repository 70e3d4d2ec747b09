"""Data-parallel training: one model trained by several processes started by torchrun, the same model whatever
their number.

    torchrun --nproc-per-node 2 -m vaelab train ...      # gloo on CPUs, NCCL on GPUs (cuda:LOCAL_RANK)

The training loop and step stay those of one process (vaelab.training.trainer, vaelab.training.step);
this module supplies what changes when a process holds only part of each batch:
  World        who this process is (rank, world size), its collectives, and the rule for who reports an error.
  shard_inputs this process's rows of the global batch: the inputs and the noise of the whole batch are drawn on
               every process from the same generator (so rank r's rows get exactly the random numbers one
               process would give them).
  wrap         the model under DistributedDataParallel.
The step is vaelab.training.step.Step, as on one process; the objective's batch statistics (free bits'
batch-mean KL per dimension) and the likelihood's (GaussianOptimal's batch MSE) are summed across the processes
before they are used. Every process holds the same random generator states, so rank 0's checkpoint
resumes any number of processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data import Prepared
from ..errors import ConfigError, TrainingError
from .step import Inputs

# how long a process waits in one collective for the others before it gives up (a peer that vanished without
# closing its connections, e.g. a machine that lost power); the work between two collectives is far shorter
TIMEOUT = datetime.timedelta(minutes=5)


class Stopped(TrainingError):
    """This process stops because another one failed and reports why; the CLI prints nothing for it."""

    report = False


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one model; World() is a single process."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: this process's GPU)
    owns_group: bool = False  # vaelab started the process group and ends it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch of n examples: contiguous, sizes differing by at most one."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def all_sum(self, t: Tensor) -> Tensor:
        """t summed over the processes, in place (and returned)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def report(self, loss: Tensor, stop_requested: bool, planned: float = 0.0) -> tuple[float, bool, float]:
        """(the global loss from every process's share, whether any process was asked to stop, the sum of `planned`
        (rank 0's planned stop for the time limit; 0 from the others)): one collective, at the same steps on every
        process, so all of them stop at the same step."""
        if self.size == 1:
            return loss.item(), stop_requested, planned
        t = torch.tensor([0.0, float(stop_requested), planned], dtype=torch.float64, device=loss.device)
        t[0] = loss.detach()
        self.all_sum(t)
        value, stops, planned = t.tolist()
        return value, stops > 0, planned

    def agree(self, fn: Callable[[], object]):
        """fn() on every process; if it fails on any, all stop: the lowest failing rank raises its own error
        (reported as one line), the others raise Stopped (silent)."""
        error: Exception | None = None
        result = None
        try:
            result = fn()
        except Exception as e:  # every process must learn of any failure, whatever its kind
            error = e
        if self.size > 1:
            failed = torch.zeros(self.size, device=self.device)
            failed[self.rank] = float(error is not None)
            first = self.all_sum(failed).nonzero()
            if first.numel():
                failed_rank = int(first[0])
                if error is not None and failed_rank == self.rank:
                    error.report = True  # type: ignore[attr-defined]
                    raise error
                raise Stopped(f"stopped: process {failed_rank} failed") from error
        if error is not None:
            raise error
        return result

    @contextlib.contextmanager
    def watch(self, after: Callable[[], str]) -> Iterator[None]:
        """Turns a failed collective (another process died or cannot be reached) into one line that says so and
        what to do `after`; the process's files are left as its last complete epoch wrote them."""
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            if self.size == 1 or not _lost_peer(e):
                raise
            error = TrainingError(f"process {self.rank} of {self.size} lost contact with another training process "
                                  f"({_reason(e)}); {after()}")
            error.report = True  # type: ignore[attr-defined]
            raise error from e

    def close(self, wait: bool = False) -> None:
        """Ends the process group vaelab started. `wait`: every process comes here at the end of its work, so they
        first wait for one another and none closes its connections while another still uses them (not after a
        failure: a process may be gone)."""
        if not (self.owns_group and dist.is_initialized()):
            return
        try:
            if wait and self.size > 1:
                dist.barrier()
        finally:
            dist.destroy_process_group()


SINGLE = World()  # one process, no process group


def _lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection", "timed out",
                                                                      "broken pipe", "socket"))


def _reason(e: BaseException) -> str:
    """The first sentence of a backend's error, without the source location it starts with."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". ")[0][:200]


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def env_local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK), 0 without torchrun."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def reports(error: BaseException) -> bool:
    """Whether this process prints `error`: the process that raised it as its own (Stopped: not), else, for the
    errors every process meets alike (a bad setting, a non-finite loss), rank 0 alone."""
    report = getattr(error, "report", None)
    return report if report is not None else env_rank() == 0


_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("vaelab_alone", default=False)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within it, join() gives World() whatever torchrun's environment says and whatever process group runs: the
    runs trained there are single-process runs (each rank of a sweep trains its own runs whole)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def join(device: torch.device, timeout: datetime.timedelta = TIMEOUT) -> tuple[World, torch.device]:
    """This process's World from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and the
    device it trains on: cuda:LOCAL_RANK on GPUs (NCCL), the CPU otherwise (gloo). A single process (no
    WORLD_SIZE, or 1, or inside alone()) gets World() and keeps its device; no process group is started.
    `timeout`: how long a collective of the group it starts waits for the other processes."""
    if _ALONE.get():
        return World(), device
    if dist.is_available() and dist.is_initialized():  # the caller started one: train within it
        rank, size = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda" and size > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        return World(rank, size, device if dist.get_backend() == "nccl" else torch.device("cpu")), device
    size = env_world_size()
    if size <= 1:
        return World(), device
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={size} asks for {size} processes but this PyTorch build has no "
                          "torch.distributed; run one process")
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            error = ConfigError(f"process {rank} is local rank {local} but this machine has {count} CUDA device(s): "
                                f"start at most {count} processes per machine (torchrun --nproc-per-node {count})")
            error.report = local == count  # type: ignore[attr-defined]  # the first process without a GPU says so
            raise error
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # DistributedDataParallel imports torch._dynamo on first use, and modules it pulls in (torch.distributed.nn's
    # collectives, ZeroRedundancyOptimizer, ...) take the default group of the moment as a default argument: imported
    # while a group runs, they keep it (its gloo threads and connections) alive past destroy_process_group, to be torn
    # down during the interpreter's exit, which can abort a process that finished its work. Imported now, they
    # keep None.
    importlib.import_module("torch._dynamo")
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"WORLD_SIZE={size} is set but the {backend} process group did not start ({e}); start "
                          "vaelab with torchrun, e.g. torchrun --nproc-per-node 2 -m vaelab train ...") from e
    return World(rank, size, device if backend == "nccl" else torch.device("cpu"), owns_group=True), device


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        lo = batch_size // world.size * world.size
        hint = f"e.g. {lo} or {lo + world.size}" if lo else f"e.g. {world.size}"
        raise ConfigError(f"--batch-size is the global batch, split across the {world.size} processes, so it must "
                          f"be a multiple of {world.size}; got {batch_size} ({hint})")


def wrap(model: nn.Module, world: World, device: torch.device) -> DistributedDataParallel:
    """The model under DistributedDataParallel, its batch statistics summed across the processes.

    Gradients are views into DDP's communication buckets (no copy), and each bucket is reduced while the backward
    still runs through the earlier layers. Buffers are not broadcast: every process computes the same ones.
    """
    for m in model.modules():
        if hasattr(m, "batch_reduce"):
            # nn.Module.__setattr__ stores any value; its stub admits only tensors and modules
            m.batch_reduce = world.all_sum  # type: ignore[assignment]
    # newer PyTorch names the buffer broadcast before each forward `forward_sync_buffers`
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"
    options: dict[str, Any] = {no_sync: False}
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **options)


_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


def shard_inputs(prep: Prepared, world: World, latent_dim: int, fresh_inputs: bool, samples: int = 1) -> Inputs:
    """(x, ε) for this process's rows of the global batch `idx`: random inputs (dynamic binarization) and the noise
    of z are drawn for the whole batch, in the order one process draws them, and this process keeps its rows, so
    that rank r's rows get exactly the random numbers one process would give them."""
    gather = prep.batches.gather  # rows of the training set, resident or memory-mapped

    def inputs(idx: Tensor) -> tuple[Tensor, Tensor | None]:
        rows = world.rows(len(idx))
        # (B/W, C, H, W): random inputs are drawn for the whole batch, fixed ones gathered for these rows only
        x = prep.prepare_train(gather(idx))[rows] if fresh_inputs else prep.prepare_train(gather(idx[rows]))
        if samples == 1:
            return x, torch.randn((len(idx), latent_dim), dtype=x.dtype, device=x.device)[rows]  # (B/W, L)
        return x, torch.randn((samples, len(idx), latent_dim), dtype=x.dtype, device=x.device)[:, rows]  # (K, B/W, L)

    return inputs
