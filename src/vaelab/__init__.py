"""vaelab: train and understand Variational Autoencoders with exact observation models.

One function per command of the CLI: train, resume, info, evaluate, report, plot, sample, sigma_study, sweep, demo,
explore, cache_list, cache_clear; load_run rebuilds a trained run from its directory. A run's settings are a
TrainConfig, made of one config per role (DataConfig, ModelConfig, OptimConfig, RuntimeConfig). A new training
objective is an Objective subclass made available with register_objective (then `--objective NAME`).
"""

__version__ = "0.1.0"

from .analysis.factors import factor_scores
from .api import cache_clear, cache_list, demo, evaluate, explore, info, plot, report, sample, sigma_study, sweep
from .config import DataConfig, ModelConfig, OptimConfig, RuntimeConfig, TrainConfig
from .models.objective import Batch, Loss, Objective, ObjectiveSettings, register_objective
from .runs import Run, load_run
from .training.trainer import resume, train

__all__ = [
           "Batch",
           "DataConfig",
           "Loss",
           "ModelConfig",
           "Objective",
           "ObjectiveSettings",
           "OptimConfig",
           "Run",
           "RuntimeConfig",
           "TrainConfig",
           "__version__",
           "cache_clear",
           "cache_list",
           "demo",
           "evaluate",
           "explore",
           "factor_scores",
           "info",
           "load_run",
           "plot",
           "register_objective",
           "report",
           "resume",
           "sample",
           "sigma_study",
           "sweep",
           "train",
]
