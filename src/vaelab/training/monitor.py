"""Live monitoring in TensorBoard (`--tensorboard DIR`): each epoch's numbers and two image grids, written as the
run goes, so a long run can be watched with `tensorboard --logdir DIR`.

Scalars are grouped by quantity, one curve per split (loss/train, loss/test, rec/..., kl/..., bits_per_dim/...,
mse/..., sigma/..., objective/...), plus time/epoch_seconds and time/samples_per_second. The images are the same
test images and their reconstructions (decoder mean at the posterior mean) and the decoder means of the same prior
draws every epoch, so the grids show the model changing, not the inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..data import StoredImages
from ..errors import ConfigError
from ..models.vae import VAE

SCALARS = ("loss", "rec", "kl", "bits_per_dim", "mse", "sigma", "objective")
N_RECON = 8  # test images shown with their reconstructions
N_PRIOR = 64  # prior draws, an 8 x 8 grid
PRIOR_SEED = 0


def grid(images: Tensor, ncol: int, pad: int = 1) -> Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') image, row-major, `ncol` per row, white between."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    out = images.new_ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[:, y:y + h, x:x + w] = images[i]
    return out


class TensorBoard:
    """Writes one event file in `logdir`; `epoch()` after each epoch, `close()` at the end."""

    def __init__(self, logdir: str | Path, test: Tensor | StoredImages, prepare, n_train: int):
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
        except ImportError as e:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'vaelab[tensorboard]' "
                              "(or pip install tensorboard)") from e
        self.writer = SummaryWriter(str(logdir))
        self.inputs = prepare(test[:N_RECON])  # (8, C, H, W) in [0, 1]
        self.n_train = n_train

    def epoch(self, epoch: int, rows: list[dict], model: VAE) -> None:
        for row in rows:
            for key in SCALARS:
                if key in row:
                    self.writer.add_scalar(f"{key}/{row['split']}", row[key], epoch)
            if row.get("seconds"):
                self.writer.add_scalar("time/epoch_seconds", row["seconds"], epoch)
                self.writer.add_scalar("time/samples_per_second", self.n_train / row["seconds"], epoch)
        recon, prior = self.images(model)
        self.writer.add_image("reconstructions", recon, epoch)
        self.writer.add_image("prior_samples", prior, epoch)
        self.writer.flush()

    @torch.no_grad()
    def images(self, model: VAE) -> tuple[Tensor, Tensor]:
        """(inputs over their reconstructions, prior samples) as (C, H', W') grids in [0, 1]."""
        was_training = model.training
        model.eval()
        x = self.inputs.to(next(model.parameters()).device)
        recon = model.reconstruct(x).clamp(0, 1)  # (8, C, H, W)
        z = model.sample_prior(N_PRIOR, torch.Generator().manual_seed(PRIOR_SEED))
        prior = model.decode_mean(z).clamp(0, 1)  # (64, C, H, W)
        model.train(was_training)
        return grid(torch.cat([x, recon]).cpu(), N_RECON), grid(prior.cpu(), 8)

    def close(self) -> None:
        self.writer.close()
