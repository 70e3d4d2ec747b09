"""The judge network whose features the sample-quality score compares: a small conv classifier (its penultimate
layer) where the data has labels, a small conv autoencoder (its code) where it has none. Trained once per
dataset and image shape, seeded and deterministic for a given thread count, and kept in the decoded cache
(`vaelab cache ls` lists it as a "judge" entry; `vaelab cache clear` removes it like any other).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data import ImageData, to_unit
from ..data import cache as decoded_cache

JUDGE_VERSION = 1
FEATURES = 64  # width of the feature vector the scores compare
JUDGE_IMAGES = 10000  # the first training images the judge learns from
JUDGE_STEPS = 400  # Adam steps of JUDGE_BATCH images, as many passes over those images as that takes ...
JUDGE_PASSES = 10  # ... but at most this many passes (a few hundred images need fewer steps)
JUDGE_BATCH = 64
JUDGE_LR = 2e-3
JUDGE_SEED = 0
JUDGE_SIZE = 32  # larger images are averaged down to at most this many pixels a side first


class Judge(nn.Module):
    """Images averaged down to at most JUDGE_SIZE pixels a side, three stride-2 3x3 convolutions (32, 64, 64
    channels), a 2x2 average pool and a linear map to FEATURES; then a linear classifier (labels), or an MLP
    decoder back to the (averaged) pixels (no labels)."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int | None):
        super().__init__()
        c, h, w = shape[0], min(shape[1], JUDGE_SIZE), min(shape[2], JUDGE_SIZE)
        self.size, self.n_classes = (h, w), n_classes
        self.trunk = nn.Sequential(
            nn.Conv2d(c, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, FEATURES))
        self.head = (nn.Linear(FEATURES, n_classes) if n_classes else
                     nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, c * h * w)))

    @property
    def kind(self) -> str:
        return f"classifier ({self.n_classes} classes)" if self.n_classes else "autoencoder"

    def view(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) as the judge sees it: (B, C, min(H, JUDGE_SIZE), min(W, JUDGE_SIZE)), area-averaged."""
        return x if tuple(x.shape[2:]) == self.size else nn.functional.adaptive_avg_pool2d(x, self.size)

    def features(self, x: Tensor) -> Tensor:
        """(B, FEATURES) for images x (B, C, H, W) in [0, 1]: the classifier's penultimate activations (after
        its ReLU), or the autoencoder's code."""
        f = self.trunk(self.view(x))
        return torch.relu(f) if self.n_classes else f

    def loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        out = self.head(self.features(x))
        if y is not None:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.binary_cross_entropy_with_logits(out, self.view(x).flatten(1))


def train_judge(images: np.ndarray, labels: np.ndarray | None, seed: int = JUDGE_SEED,
                steps: int | None = None, progress: bool = False) -> Judge:
    """A judge trained on images (N, C, H, W) as stored (uint8 or float in [0, 1]) with `steps` Adam steps
    (default JUDGE_STEPS, or JUDGE_PASSES passes over few images) on shuffled passes over them, on the CPU; the
    classifier where `labels` has two classes or more. The caller's RNG stream is untouched; `progress` shows a
    bar."""
    from tqdm.auto import tqdm

    steps = min(JUDGE_STEPS, JUDGE_PASSES * math.ceil(len(images) / JUDGE_BATCH)) if steps is None else steps
    n_classes = int(labels.max()) + 1 if labels is not None and len(np.unique(labels)) > 1 else None
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may run under no_grad
        torch.manual_seed(seed)
        c, h, w = images.shape[1:]
        judge = Judge((c, h, w), n_classes)
        opt = torch.optim.Adam(judge.parameters(), lr=JUDGE_LR)
        gen = torch.Generator().manual_seed(seed)
        y_all = None if n_classes is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        judge.train()
        bar = tqdm(_batches(len(images), steps, gen), desc="sample-quality judge (once per dataset)", unit="step",
                   disable=not progress, leave=False)
        for batch in bar:
            x = to_unit(np.take(images, batch.numpy(), axis=0))
            loss = judge.loss(x, None if y_all is None else y_all[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval()


def _batches(n: int, steps: int, gen: torch.Generator) -> list[Tensor]:
    """`steps` batches of row indices (sorted within a batch), from shuffled passes over n rows."""
    out: list[Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out += [order[i:i + JUDGE_BATCH].sort().values for i in range(0, n, JUDGE_BATCH)]
    return out[:steps]


def _fingerprint(identity: dict, data: ImageData, n_classes: int | None) -> dict:
    return {"kind": "judge", "version": JUDGE_VERSION, "dataset": identity, "shape": list(data.shape),
            "n_train": len(data.train), "classes": n_classes, "images": JUDGE_IMAGES, "steps": JUDGE_STEPS,
            "passes": JUDGE_PASSES, "seed": JUDGE_SEED, "features": FEATURES, "size": JUDGE_SIZE}


def judge_for(data: ImageData, identity: dict, progress: bool = False) -> Judge:
    """The judge of this dataset (`identity` names it: name or path and the options that change its pixels),
    from the cache, or trained now (a few seconds to a minute on a CPU) and cached."""
    labels = data.train_labels
    n_classes = int(labels.max()) + 1 if labels is not None and len(np.unique(labels)) > 1 else None
    fingerprint = _fingerprint(identity, data, n_classes)
    # one entry per dataset and shape: a judge of other settings (a newer vaelab) replaces it
    name = decoded_cache.entry_name(f"judge-{Path(str(identity.get('dataset', data.name))).name}",
                                    {"kind": "judge", "dataset": identity, "shape": list(data.shape)})
    judge = Judge(data.shape, n_classes)
    entry = decoded_cache.lookup(name, fingerprint)
    if entry is not None:
        judge.load_state_dict({k: torch.from_numpy(entry.array(f"w.{k}", mmap=False)) for k in judge.state_dict()})
        return judge.eval()
    n = min(JUDGE_IMAGES, len(data.train))
    judge = train_judge(np.asarray(data.train[:n]), None if labels is None else np.asarray(labels[:n]),
                        progress=progress)
    info = {"source": f"sample-quality judge, {judge.kind}, for {identity.get('dataset', data.name)}",
            "options": "x".join(map(str, data.shape))}
    with decoded_cache.Builder(name, fingerprint, info) as b:
        for k, v in judge.state_dict().items():
            b.save(f"w.{k}", v.detach().cpu().numpy())
        b.commit()
    return judge


@torch.no_grad()
def judge_features(judge: Judge, images: Tensor | np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Features (N, FEATURES) float64 of images (N, C, H, W) in [0, 1] (or uint8), on the CPU."""
    out = [judge.features(to_unit(images[i:i + batch_size]).cpu()).double()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()
