"""vaelab: train and understand Variational Autoencoders with exact observation models.

One function per command of the CLI: train, resume, evaluate, report, plot, sigma_study, demo, explore; load_run
rebuilds a trained run from its directory.
"""

__version__ = "0.1.0"

from .api import demo, evaluate, explore, plot, report, sigma_study  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .runs import Run, load_run  # noqa: E402
from .trainer import resume, train  # noqa: E402

__all__ = ["TrainConfig", "Run", "train", "resume", "evaluate", "report", "plot", "sigma_study", "demo", "explore",
           "load_run", "__version__"]
