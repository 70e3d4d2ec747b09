"""vaelab: train and understand Variational Autoencoders with exact observation models."""

__version__ = "0.1.0"

from .api import demo, load_run, resume, train  # noqa: E402
from .config import TrainConfig  # noqa: E402

__all__ = ["TrainConfig", "train", "resume", "load_run", "demo", "__version__"]
