"""vaelab: train and understand Variational Autoencoders with exact observation models.

One function per command of the CLI: train, resume, info, evaluate, report, plot, sigma_study, demo, explore,
cache_list, cache_clear; load_run rebuilds a trained run from its directory.
"""

__version__ = "0.1.0"

from .api import cache_clear, cache_list, demo, evaluate, explore, info, plot, report, sigma_study
from .config import TrainConfig
from .runs import Run, load_run
from .training.trainer import resume, train

__all__ = ["Run", "TrainConfig", "__version__", "cache_clear", "cache_list", "demo", "evaluate", "explore", "info",
           "load_run", "plot", "report", "resume", "sigma_study", "train"]
