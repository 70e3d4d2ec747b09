"""The aggregate posterior q(z) = E_x q(z|x), modelled by a Gaussian mixture fitted to the training codes
("ex-post density estimation", Ghosh et al. 2020), and the codes that pictures of samples are drawn from.

    fit_mixture(codes, k)            EM for a mixture of k Gaussians (full or diagonal covariance)
    choose_mixture(codes)            k from COMPONENTS by held-out log-likelihood, then refit on every code
    aggregate_mixture(run)           that fit for a run's training codes, cached in the run directory
    draw_codes(run, n, source, ...)  z from the prior p(z) or from the aggregate mixture

Codes are the posterior means of the training images. The fit is cached as aggregate.safetensors beside the
weights, keyed by the weights' hash and the fit's settings, so a retrained or resumed run is refitted.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from ..data import ImageData, Prepared, load_dataset, prepare_data
from ..errors import ConfigError, NotNormalizedWarning
from ..runs import WEIGHTS, Run, atomic_write
from .plots import tile
from .views import decode_images

SOURCES = ("prior", "aggregate")
COMPONENTS = (1, 2, 5, 10, 20)  # the mixture sizes tried; the best on held-out codes is kept
HELD_OUT = 0.2  # share of the codes held out to choose the mixture size
MAX_CODES = 10000  # training codes fitted (the first ones of the training split)
COVARIANCE = "full"
MAX_ITER, TOL = 100, 1e-4  # EM stops when the mean log-likelihood per code gains less than TOL nats
CACHE_FILE = "aggregate.safetensors"
FIT_VERSION = 1
LOG_2PI = math.log(2 * math.pi)


@dataclass
class Mixture:
    """A mixture of Gaussians: weights (K,), means (K, L), Cholesky factors of the covariances (K, L, L)
    (diagonal covariance: diagonal factors). float64."""

    weights: Tensor
    means: Tensor
    chol: Tensor

    @property
    def k(self) -> int:
        return int(self.weights.shape[0])

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x | mean_k, Σ_k), (N, K), for x (N, L)."""
        n, dim = x.shape
        eye = torch.eye(dim, dtype=self.chol.dtype).expand_as(self.chol)
        prec = torch.linalg.solve_triangular(self.chol, eye, upper=False)  # (K, L, L): L_k⁻¹
        # L_k⁻¹ (x − mean_k) for every k in one matrix product
        white = (x.to(self.means) @ prec.permute(2, 0, 1).reshape(dim, -1)).view(n, self.k, dim)  # (N, K, L)
        white = white - (prec @ self.means[:, :, None])[..., 0]  # (N, K, L)
        logdet = 2 * torch.log(torch.diagonal(self.chol, dim1=1, dim2=2)).sum(1)  # (K,)
        return torch.log(self.weights) - 0.5 * (white.square().sum(2) + logdet + dim * LOG_2PI)

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) under the mixture, (N,) nats."""
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n draws (n, L) float64 on the CPU: a component by its weight, then its mean plus `temperature` times
        a draw of its Gaussian's spread (temperature 0 gives the component means)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.means.shape[1], 1, dtype=torch.float64, generator=generator)  # (n, L, 1)
        return self.means[comp] + temperature * (self.chol[comp] @ eps)[..., 0]

    def tensors(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "means": self.means, "chol": self.chol}


def _init_means(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn in proportion to the squared distance to the nearest one."""
    centres = [x[torch.randint(len(x), (1,), generator=gen)]]
    d2 = (x - centres[0]).square().sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / len(d2))
        centres.append(x[torch.multinomial(p, 1, generator=gen)])
        d2 = torch.minimum(d2, (x - centres[-1]).square().sum(1))
    return torch.cat(centres)  # (k, L)


def _m_step(x: Tensor, resp: Tensor, covariance: str, reg: Tensor) -> Mixture:
    """Weights, means and covariances from responsibilities (N, K); `reg` (L,) is added to every variance."""
    nk = resp.sum(0) + 1e-12  # (K,)
    means = resp.T @ x / nk[:, None]  # (K, L)
    if covariance == "diag":
        var = resp.T @ x.square() / nk[:, None] - means.square()  # (K, L)
        chol = torch.diag_embed(torch.sqrt(var.clamp_min(0) + reg))
    else:
        diff = x[None] - means[:, None]  # (K, N, L)
        cov = (resp.T[:, :, None] * diff).transpose(1, 2) @ diff / nk[:, None, None]  # (K, L, L)
        chol, info = torch.linalg.cholesky_ex(cov + torch.diag(reg))
        if bool((info > 0).any()):  # rounding left a component's covariance not quite positive definite
            chol = torch.linalg.cholesky(cov + torch.diag(1e3 * reg + 1e-9))
    return Mixture(nk / nk.sum(), means, chol)


def fit_mixture(codes: Tensor | np.ndarray, k: int, covariance: str = COVARIANCE, seed: int = 0,
                max_iter: int = MAX_ITER, tol: float = TOL) -> Mixture:
    """A mixture of k Gaussians fitted to codes (N, L) by EM (float64), seeded by k-means++ (`seed`).

    Each variance gets 1e-6 of that dimension's variance over the codes (and 1e-12) added, so a component on a
    few points, or a dimension the encoder does not use, keeps a finite density."""
    if covariance not in ("full", "diag"):
        raise ConfigError(f"covariance must be full or diag; got {covariance!r}")
    x = torch.as_tensor(codes).double().cpu()  # (N, L)
    if k < 1 or len(x) < k:
        raise ConfigError(f"a mixture of {k} components needs k >= 1 and at least k codes; got {len(x)} codes")
    gen = torch.Generator().manual_seed(seed)
    reg = 1e-6 * x.var(0, unbiased=False) + 1e-12  # (L,)
    nearest = torch.cdist(x, _init_means(x, k, gen)).argmin(1)  # (N,)
    mix = _m_step(x, torch.nn.functional.one_hot(nearest, k).double(), covariance, reg)
    last = -math.inf
    for _ in range(max_iter):
        lp = mix.component_log_prob(x)  # (N, K)
        total = torch.logsumexp(lp, dim=1, keepdim=True)  # (N, 1)
        mean_ll = float(total.mean())
        if mean_ll - last < tol:
            break
        last = mean_ll
        mix = _m_step(x, torch.exp(lp - total), covariance, reg)
    return mix


def choose_mixture(codes: Tensor | np.ndarray, components: tuple[int, ...] = COMPONENTS,
                   covariance: str = COVARIANCE, seed: int = 0) -> tuple[Mixture, dict[int, float]]:
    """The mixture size of `components` whose fit to a random (1 - HELD_OUT) share of the codes gives the held-out
    codes the highest mean log-likelihood, refitted on all codes; with {k: held-out nats per code}."""
    x = torch.as_tensor(codes).double().cpu()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(len(x) * HELD_OUT))
    held, fit = x[order[:n_held]], x[order[n_held:]]
    scores = {k: float(fit_mixture(fit, k, covariance, seed).log_prob(held).mean())
              for k in components if k <= len(fit)}
    if not scores:
        raise ConfigError(f"too few codes ({len(x)}) to fit a mixture of any of {components} components")
    best = max(scores, key=lambda k: scores[k])
    return fit_mixture(x, best, covariance, seed), scores


# ------------------------------------------------------------------------------------------------ for a run
def run_data(run: Run) -> tuple[ImageData, Prepared]:
    """The run's dataset, whole (no --limit, which applies to the training split the trainer read), and the
    splits as the trainer read them (that limit, the same binarization), placed on the model's device."""
    d = run.config.data
    data = load_dataset(d.dataset, d.data_dir, None, image_size=d.image_size, center_crop=d.center_crop,
                        background=d.background, skip_bad_images=d.skip_bad_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotNormalizedWarning)
        return data, prepare_data(run.config, next(run.model.parameters()).device, data=data)


@torch.no_grad()
def training_codes(run: Run, limit: int = MAX_CODES, batch_size: int = 500) -> Tensor:
    """Posterior means (N, L) of the run's first `limit` training images, as the trainer read them."""
    _, prep = run_data(run)
    x = prep.train_eval
    n = min(limit, len(x))
    run.model.eval()
    return torch.cat([run.model.encode(prep.prepare(x[i:min(i + batch_size, n)])).mean.double().cpu()
                      for i in range(0, n, batch_size)])


def _fit_key(run: Run) -> dict:
    digest = hashlib.sha256((Path(run.path) / WEIGHTS).read_bytes()).hexdigest()
    return {"version": FIT_VERSION, "weights_sha256": digest, "components": list(COMPONENTS),
            "covariance": COVARIANCE, "max_codes": MAX_CODES, "held_out": HELD_OUT}


def aggregate_mixture(run: Run) -> tuple[Mixture, dict]:
    """The run's aggregate-posterior mixture and what describes it (the key, held-out scores, code count), from
    <run>/aggregate.safetensors when its key matches the weights, else fitted now and cached there."""
    key = _fit_key(run)
    path = Path(run.path) / CACHE_FILE
    cached = _read_cached(path, key)
    if cached is not None:
        return cached
    codes = training_codes(run)
    mix, scores = choose_mixture(codes)
    info = {**key, "chosen": mix.k, "n_codes": len(codes), "held_out_log_lik": {str(k): v for k, v in scores.items()}}
    try:
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in mix.tensors().items()}, tmp,
                                                 metadata={"info": json.dumps(info)}))
    except OSError as e:  # a read-only run folder: the fit is used, not cached
        warnings.warn(f"cannot cache the aggregate-posterior fit in {path} ({e.strerror or e})", stacklevel=2)
    return mix, info


def _read_cached(path: Path, key: dict) -> tuple[Mixture, dict] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as fh:
            info = json.loads(fh.metadata()["info"])
        if any(info.get(k) != v for k, v in key.items()):
            return None
        t = load_file(path)
        return Mixture(t["weights"], t["means"], t["chol"]), info
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # unreadable or from another version: fitted again


def check_sample_args(n: int, source: str, temperature: float, seed: int = 0) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"-n must be an integer >= 1; got {n!r}")
    if source not in SOURCES:
        raise ConfigError(f"--from must be one of {', '.join(SOURCES)}; got {source!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"--temperature must be a finite number > 0; got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0; got {seed!r}")


@torch.no_grad()
def draw_codes(run: Run, n: int, source: str = "prior", temperature: float = 1.0, seed: int = 0) -> Tensor:
    """n codes (n, L) on the model's device: z ~ p(z), or z from the aggregate-posterior mixture, each with its
    spread scaled by `temperature`; seeded by `seed` alone (drawn on the CPU, so the same on every device).
    A hierarchical model's aggregate draw is its top group's code from the mixture, then the lower groups'
    standardized noise u ~ N(0, T² I), as in a prior draw: the lower groups come from p(z_i | z_<i) (at their prior
    means they would decode every code to the same blur of its layout)."""
    check_sample_args(n, source, temperature, seed)
    gen = torch.Generator().manual_seed(seed)
    if source == "prior":
        return run.model.sample_prior(n, gen, temperature)
    mix, _ = aggregate_mixture(run)
    param = next(run.model.parameters())
    z = mix.sample(n, gen, temperature)
    lower = run.model.latent_dim - z.shape[1]  # 0 but for a hierarchy's lower groups
    if lower > 0:
        z = torch.cat([z, temperature * torch.randn(n, lower, generator=gen, dtype=z.dtype)], dim=1)
    return z.to(param.device, param.dtype)


@torch.no_grad()
def sample_images(run: Run, n: int, source: str = "prior", temperature: float = 1.0, seed: int = 0,
                  batch_size: int = 500) -> np.ndarray:
    """Decoder means f(z) for n codes of draw_codes, clamped to [0, 1] for display: (n, C, H, W) float32."""
    run.model.eval()
    z = draw_codes(run, n, source, temperature, seed)
    return torch.cat([decode_images(run.model, z[i:i + batch_size]).float().cpu()
                      for i in range(0, n, batch_size)]).numpy()


def write_images(images: np.ndarray, path: Path) -> Path:
    """Images (N, C, H, W) in [0, 1] as a PNG grid at their own resolution (about √N per row, a one-pixel white
    gap) for a .png path, or as the float32 array for a .npy path; written atomically."""
    if path.suffix.lower() == ".npy":
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.save would add .npy to the temporary name
                np.save(fh, images.astype(np.float32), allow_pickle=False)

        atomic_write(path, write)
        return path
    grid = tile(images, math.ceil(math.sqrt(len(images))))  # (H', W', C)
    pixels = np.round(grid * 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
