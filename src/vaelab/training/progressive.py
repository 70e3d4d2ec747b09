"""--progressive: a hierarchy's latent resolutions open to x one at a time, top first, --progressive epochs apart
(progressive learning of hierarchical representations, Li et al. 2020). Which groups are open is a pure function
of how far the run has gone, set before every step, so a run resumed mid-epoch opens them where a run that never
stopped does. A group not yet open is drawn from its prior (HierarchicalVAE.open_resolutions): it holds nothing
of x and costs no KL, so while the lower resolutions are closed the groups above must hold the image's layout.
"""

from __future__ import annotations

from ..config import TrainConfig
from ..errors import ConfigError
from ..models.hierarchical import HierarchicalVAE, latent_resolutions
from ..models.vae import VAE


def open_at(config: TrainConfig, model: VAE, epoch_progress: float) -> None:
    """--progressive E: the hierarchy's top 1 + ⌊epochs / E⌋ latent resolutions learn from x at this point of
    the run; nothing to do otherwise."""
    if config.optim.progressive > 0:
        assert isinstance(model, HierarchicalVAE), "--progressive is checked to come with --arch hierarchical"
        model.open_resolutions(1 + int(epoch_progress // config.optim.progressive))


def check_progressive(config: TrainConfig, shape: tuple[int, int, int]) -> None:
    """--progressive opens the last latent resolution of `shape`'s hierarchy before the run's last epoch ends."""
    every = config.optim.progressive
    if every <= 0:
        return
    sizes = latent_resolutions(shape, config.model.groups)
    last = every * (len(sizes) - 1)
    if last >= config.optim.epochs:
        names = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise ConfigError(f"--progressive {every:g} opens the last of the {len(sizes)} latent resolutions ({names}) "
                          f"after {last:g} epochs, but the run has --epochs {config.optim.epochs}: give more "
                          "--epochs or a smaller --progressive")
