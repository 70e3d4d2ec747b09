"""vaelab: train and understand Variational Autoencoders with exact observation models.

One function per command of the CLI: train, resume, evaluate, report, plot, sigma_study, demo, explore; load_run
rebuilds a trained run from its directory.
"""

__version__ = "0.1.0"

from .api import demo, evaluate, explore, plot, report, sigma_study
from .config import TrainConfig
from .runs import Run, load_run
from .training.trainer import resume, train

__all__ = ["Run", "TrainConfig", "__version__", "demo", "evaluate", "explore", "load_run", "plot", "report", "resume",
           "sigma_study", "train"]
