"""Sample quality: how close generated images lie to real ones in the features of a judge network (judge.py).

    frechet_distance   ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½) between Gaussian fits of two feature sets (the
                       formula of FID; lower is better, 0 for equal fits)
    precision_recall   k-NN manifold coverage (Kynkäänniemi et al. 2019): precision is the share of generated images
                       inside the real images' manifold (a ball around each real feature reaching its k-th nearest
                       real neighbour), recall the share of real images inside the generated ones' manifold

The judge is trained on the run's own dataset, so the numbers compare models on one dataset; they are not
Inception FID and do not compare across datasets. The Fréchet distance shrinks as more images are compared, so
compare runs at the same image count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import NAMES, ImageData
from ..errors import ConfigError
from ..runs import Run
from .aggregate import aggregate_mixture, run_data, sample_images
from .judge import judge_features, judge_for

N_SCORE = 2000  # images of each kind compared (at most the test split)
K_NN = 3
SCORED = ("data", "reconstructions", "prior", "aggregate")  # the "data" row: training images, the floor


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False, bias=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """The squared 2-Wasserstein (Fréchet) distance between N(mean1, cov1) and N(mean2, cov2).

    tr((Σ₁ Σ₂)^½) is computed as the sum of the square roots of the eigenvalues of the symmetric Σ₁^½ Σ₂ Σ₁^½,
    which share them, so no complex matrix square root is needed."""
    s1 = _psd_sqrt(np.asarray(cov1, dtype=np.float64))
    m = s1 @ np.asarray(cov2, dtype=np.float64) @ s1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = np.asarray(mean1, dtype=np.float64) - np.asarray(mean2, dtype=np.float64)
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * cross, 0.0))


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """frechet_distance between the Gaussian fits of feature sets a (N, D) and b (M, D)."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


def knn_radii(points: np.ndarray, k: int = K_NN, block: int = 1024) -> np.ndarray:
    """Distance from each point (N, D) to its k-th nearest other point, (N,)."""
    if len(points) <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {len(points)}")
    x = torch.as_tensor(np.asarray(points, dtype=np.float64))
    out = []
    for start in range(0, len(x), block):
        d = torch.cdist(x[start:start + block], x)  # (b, N)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = torch.inf  # a point is not its own neighbour
        out.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out).numpy()


def coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray, block: int = 1024) -> float:
    """Share of points (N, D) within radii[j] of some manifold point j, (M, D) and (M,) (boundary included)."""
    x = torch.as_tensor(np.asarray(points, dtype=np.float64))
    m = torch.as_tensor(np.asarray(manifold, dtype=np.float64))
    r = torch.as_tensor(np.asarray(radii, dtype=np.float64))
    inside = sum(int((torch.cdist(x[i:i + block], m) <= r).any(1).sum()) for i in range(0, len(x), block))
    return inside / len(x)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NN) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` against real features `real` by k-NN manifolds."""
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def scores(real: np.ndarray, fake: np.ndarray, k: int = K_NN) -> dict[str, float]:
    """{"fd", "precision", "recall"} of features `fake` against `real`."""
    precision, recall = precision_recall(real, fake, k)
    return {"fd": feature_distance(real, fake), "precision": precision, "recall": recall}


def dataset_identity(config) -> dict:
    """What names a run's images for the judge's cache: the dataset's name (or its resolved path) and the options
    that change its pixels; the training --limit is not part of it (the judge learns from the full split)."""
    d = config.data
    source = d.dataset if d.dataset in NAMES else str(Path(d.dataset).expanduser().resolve())
    return {"dataset": source, "image_size": d.image_size, "center_crop": d.center_crop, "background": d.background}


def check_temperatures(temperatures: str | Sequence[float]) -> tuple[float, ...]:
    """The temperatures `--temperatures` names ("1,0.8,0.6", or numbers), each once, in order; a ConfigError
    naming the bad value otherwise."""
    items = temperatures.split(",") if isinstance(temperatures, str) else list(temperatures)
    out: list[float] = []
    for t in items:
        try:
            value = float(t)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(t, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--temperatures must be numbers > 0 separated by commas, such as 1,0.8,0.6; got {t!r}")
        out.append(value)
    if not out:
        raise ConfigError("--temperatures must name at least one temperature, such as 1,0.8,0.6")
    return tuple(dict.fromkeys(out))


@torch.no_grad()
def sample_quality(run: Run, n: int = N_SCORE, seed: int = 0, k: int = K_NN, progress: bool = False,
                   temperatures: Sequence[float] = (1.0,)) -> dict | None:
    """Fréchet distance, precision and recall against the run's first n test images (at most N_SCORE), in the
    judge's features, for: its training images (the floor a perfect model would reach), reconstructions
    f(posterior mean) of the test images, and decoder means of n draws from the prior and from the aggregate
    posterior (the fitted mixture). Each image set is seeded by `seed` alone. Prior draws at each of
    `temperatures` other than 1 are scored too, under "prior_temperature" ({"0.8": scores, ...}: the same seed,
    every draw's spread scaled by T). None when there are k or fewer images to compare (no k-th neighbour)."""
    temperatures = check_temperatures(temperatures)
    if n <= k:
        return None
    data, prep = run_data(run)
    n = min(n, len(data.test), len(data.train))
    if n <= k:
        return None
    judge = judge_for(data, dataset_identity(run.config), progress)
    real = judge_features(judge, data.test[:n])
    run.model.eval()
    x = prep.test[:n]
    recon = torch.cat([run.model.reconstruct(prep.prepare(x[i:i + 500])).clamp(0, 1) for i in range(0, n, 500)])
    images: dict[str, torch.Tensor | np.ndarray] = {
        "data": _train_rows(data, n, seed), "reconstructions": recon,
        "prior": sample_images(run, n, "prior", 1.0, seed), "aggregate": sample_images(run, n, "aggregate", 1.0, seed),
    }
    out: dict = {name: scores(real, judge_features(judge, images[name]), k) for name in SCORED}
    cooled = [t for t in temperatures if t != 1.0]
    if cooled:
        out["prior_temperature"] = {f"{t:g}": scores(real, judge_features(judge, sample_images(run, n, "prior", t,
                                                                                              seed)), k)
                                    for t in cooled}
    mix, info = aggregate_mixture(run)
    out.update(n_images=n, k=k, judge=judge.kind, aggregate_components=mix.k,
               aggregate_held_out=info["held_out_log_lik"])
    return out


def _train_rows(data: ImageData, n: int, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(len(data.train), n, replace=False))
    return np.take(data.train, rows, axis=0)


def quality_rows(numbers: dict) -> list[tuple[str, str]]:
    """The rows of `vaelab eval`'s table for its "sample_quality" key, [] where it was not computed."""
    if "sample_quality" not in numbers:
        return []
    sq = numbers["sample_quality"]
    if sq is None:
        return [("sample quality", f"n/a (needs more than k = {K_NN} test images)")]
    names = {"data": "training images (floor)", "reconstructions": "reconstructions", "prior": "prior samples",
             "aggregate": f"aggregate samples (K = {sq['aggregate_components']})"}
    rows = [("sample quality (FD / precision / recall)",
             f"judge: {sq['judge']} trained on this dataset; {sq['n_images']} images each, k = {sq['k']}; lower FD "
             "is better; compares models on one dataset only, not Inception FID")]
    rows += [(f"  {names[key]}", _fpr(sq[key])) for key in SCORED if key in sq]
    rows += [(f"  prior samples, T = {t}", _fpr(s)) for t, s in sq.get("prior_temperature", {}).items()]
    return rows


def _fpr(s: dict) -> str:
    return f"{s['fd']:.3f} / {s['precision']:.1%} / {s['recall']:.1%}"
