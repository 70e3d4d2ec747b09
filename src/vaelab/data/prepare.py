"""The data as the training loop and the evaluation use it (`Prepared`), from a config and an ImageData.

Data already in memory (IDX files, .npz arrays) becomes tensors that share its memory. Memory-mapped data
(the decoded cache, .npy files) stays mapped: it is read in batches (StoredImages), never copied whole into
the process, except onto a GPU where it fits, where it is uploaded a chunk at a time and stays resident.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NotNormalizedWarning
from .batches import BatchSource, StoredImages, resident
from .core import ImageData, binarize_static, to_unit
from .load import load_dataset

GPU_RESIDENT_SHARE = 0.5  # mapped data moves onto a GPU whole when it takes at most this share of free memory


@dataclass
class Prepared:
    """Splits as stored (resident tensors or StoredImages), the training batches, and the functions that turn
    a stored batch into the model's input x in [0, 1]."""

    data: ImageData
    train: torch.Tensor | StoredImages
    test: torch.Tensor | StoredImages
    train_eval: torch.Tensor | StoredImages
    prepare: Callable[[torch.Tensor | StoredImages], torch.Tensor]
    prepare_train: Callable[[torch.Tensor | StoredImages], torch.Tensor]
    normalized: bool
    batches: BatchSource


def place(array: np.ndarray, device: torch.device) -> torch.Tensor | StoredImages:
    """Where a split lives while training: see the module's docstring."""
    if not isinstance(array, np.memmap):
        return resident(array, device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if array.nbytes <= GPU_RESIDENT_SHARE * free:
            return resident(array, device)
    return StoredImages(array, device)


def prepare_data(config, device: torch.device, data: ImageData | None = None, progress: bool = False,
                 binary_only: bool = False) -> Prepared:
    """The run's splits placed for training and evaluation. `binary_only`: the likelihood is normalized only on
    binary pixels (Likelihood.binary_only), so non-binary data left unbinarized gets a NotNormalizedWarning."""
    if data is None:
        d = config.data
        data = load_dataset(d.dataset, d.data_dir, d.limit, image_size=d.image_size, center_crop=d.center_crop,
                            background=d.background, skip_bad_images=d.skip_bad_images, progress=progress)
    else:  # data the caller loaded once (tests, studies): --limit still applies, as it would on reload/resume
        data = data.limited(config.data.limit)
    train, test = data.train, data.test
    if config.data.binarize == "static":  # one fixed draw per pixel, held in memory
        train, test = binarize_static(train, config.optim.seed), binarize_static(test, config.optim.seed + 1)
    train_t, test_t = place(train, device), place(test, device)
    train_eval = train_t
    if config.data.binarize == "dynamic":  # evaluate on one fixed binarization; train on a fresh one every step
        test_t = place(binarize_static(test, config.optim.seed + 1), device)
        train_eval = place(binarize_static(train, config.optim.seed), device)

    def prepare(xb: torch.Tensor | StoredImages) -> torch.Tensor:
        return to_unit(xb)

    def prepare_train(xb: torch.Tensor | StoredImages) -> torch.Tensor:
        x = to_unit(xb)
        return torch.bernoulli(x) if config.data.binarize == "dynamic" else x

    normalized = True
    if binary_only and config.data.binarize == "none" and not data.is_binary:
        normalized = False
        warnings.warn("a likelihood for binary pixels (Bernoulli) on non-binary pixels is not a normalized "
                      "density: its 'loss' is a cross-entropy, not a negative log-likelihood (use --binarize "
                      "dynamic or static, or a continuous likelihood such as continuous-bernoulli)",
                      NotNormalizedWarning, stacklevel=3)
    return Prepared(data, train_t, test_t, train_eval, prepare, prepare_train, normalized,
                    BatchSource(train_t, config.batch_size))
