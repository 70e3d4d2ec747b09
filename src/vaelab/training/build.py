"""What a run trains with, chosen once from its config: the device, the optimizer, the precision of the forward
pass, the objective and the training step (Step; a CUDA graph of it on a GPU; Step on this process's rows of each
batch under DistributedDataParallel when several processes train one model)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..config import TrainConfig
from ..data import Prepared, load_dataset
from ..errors import ConfigError
from ..models.hierarchical import group_counts
from ..models.objective import Objective, make_objective
from ..models.vae import VAE
from .cudagraph import CUDAGraphStep, GuardedStep, capturable
from .distributed import SINGLE, World, shard_inputs, wrap
from .ema import EMA
from .progressive import check_progressive
from .step import Guards, Step, local_inputs


def make_objective_for(config: TrainConfig, dataset_size: int = 0) -> Objective:
    """The run's objective; `dataset_size`: the training images, for objectives that estimate q(z) over them."""
    settings = dataclasses.replace(config.optim.objective_settings(), dataset_size=dataset_size)
    return make_objective(config.optim.objective, settings)


def make_step(config: TrainConfig, model: VAE, optimizer: torch.optim.Optimizer, objective: Objective,
              prep: Prepared, device: torch.device, world: World = SINGLE, ema: EMA | None = None,
              scheduled: bool = False) -> GuardedStep:
    """The training step for this run, chosen once: Step; on a GPU, a CUDA graph of it where replaying is exact
    (not where the learning rate is `scheduled`: a recording keeps the rate it was recorded with); with several
    processes, Step on this process's share of each batch under DistributedDataParallel. Its guard follows the
    config (--skip-threshold, --clip-threshold, --grad-clip); `ema` is updated after each step."""
    guards = Guards.of(config.optim)
    if world.size > 1:
        inputs = shard_inputs(prep, world, model.latent_dim, fresh_inputs=config.data.binarize == "dynamic",
                              samples=objective.samples)
        return Step(wrap(model, world, device), optimizer, objective, inputs, autocast(config, device),
                    world.all_sum, world.size, guards, ema)
    # a recording replays one β and one set of open groups: not with --kl-warmup or --progressive
    static = config.optim.kl_warmup <= 0 and config.optim.progressive <= 0 and not scheduled
    graph = config.runtime.cuda_graph and prep.batches.resident and capturable(model, optimizer, device, static=static)
    inputs = local_inputs(lambda idx: prep.prepare_train(prep.batches(idx)))
    step = Step(model, optimizer, objective, inputs, autocast(config, device, cache=not graph), guards=guards, ema=ema)
    return CUDAGraphStep(step, config.batch_size, config.optim.beta, device) if graph else step


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch.cuda.is_available() is False; use cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_optimizer(config: TrainConfig, model: VAE) -> torch.optim.Optimizer:
    """Adam runs as one fused kernel over all parameters on CPU and CUDA (the same update as the per-parameter
    loop, in one pass over memory; deterministic). A resumed run keeps whatever implementation its checkpoint's
    param_groups name, so it continues exactly as it started. The model names the parameter groups (a learned σ
    has a step size of its own)."""
    groups = model.param_groups(config.optim.optimizer, config.lr)
    for group in groups:  # each group's own rate, which a schedule (--lr-schedule, --lr-warmup) multiplies
        group["initial_lr"] = group.get("lr", config.lr)
    if config.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    # capturable: the step count lives on the GPU, so the update can be replayed inside a CUDA graph
    on_gpu = fused and all(p.device.type == "cuda" for p in params)
    return torch.optim.Adam(groups, lr=config.lr, fused=fused or None, capturable=on_gpu)


def autocast(config: TrainConfig, device: torch.device, cache: bool = True) -> Callable[[], AbstractContextManager]:
    """The context the training step's forward pass runs in: bfloat16 autocast for --precision bf16.

    Only the encoder's and decoder's matmuls/convolutions run in bfloat16; the model casts their outputs back,
    so the reparameterized z, the KL and the likelihood are float32, as are the weights, gradients and Adam's
    state. Evaluation (metrics.jsonl, eval, report) never uses it: every reported number is float32.
    cache=False turns off autocast's cache of cast weights, which a CUDA graph capture cannot hold.
    """
    if config.runtime.precision != "bf16":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, cache_enabled=cache)


def check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.runtime.precision != "bf16":
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


def check_hierarchies(configs: list[TrainConfig]) -> None:
    """Each hierarchy whose --groups gives a count per resolution has as many as its images have latent
    resolutions, and each --progressive run opens its last resolution before its last epoch. The image size is
    known once the data is loaded: a sweep checks every run's config before the first one trains, not when that
    run's turn comes."""
    shapes: dict[tuple, tuple[int, int, int]] = {}
    for config in configs:
        m, d = config.model, config.data
        if m.arch != "hierarchical" or not (isinstance(m.groups, list) or config.optim.progressive > 0):
            continue
        key = (d.dataset, d.data_dir, d.image_size, d.center_crop)
        if key not in shapes:
            shapes[key] = load_dataset(d.dataset, d.data_dir, image_size=d.image_size, center_crop=d.center_crop,
                                       background=d.background, skip_bad_images=d.skip_bad_images).shape
        group_counts(shapes[key], m.groups)  # a count per resolution: as many as the images have
        check_progressive(config, shapes[key])
