"""Arrays from a trained model for the figures: decoded grids, reconstructions, samples (no plotting here)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch

from ..models.hierarchical import HierarchicalVAE
from ..models.vae import VAE


def gaussian_quantiles(n: int, tail: float = 0.05) -> np.ndarray:
    """n points at evenly spaced quantiles of N(0, 1), `tail` to 1 - `tail`: the grid covers the prior."""
    return np.array([NormalDist().inv_cdf(p) for p in np.linspace(tail, 1 - tail, n)])


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


@torch.no_grad()
def decode_images(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """Codes z (N, L) as displayable images: the decoder mean f(z) clipped to [0, 1], (N, C, H, W), on the
    model's device, as every figure shows them.

    model.decode_mean(z) is f(z) itself, in pixel units: a Gaussian or Laplace mean is not clipped and can leave
    [0, 1] (a Bernoulli's or a continuous Bernoulli's stays inside).
    """
    device = next(model.parameters()).device
    return model.decode_mean(z.to(device)).clamp(0, 1)


@torch.no_grad()
def latent_plane(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """Posterior means of x, and the plane to draw them in: (codes (N, L), centre (L,), axes (2, L)).

    For L = 2 the plane is the latent space itself; for L > 2 it is spanned by the first two principal
    components of the posterior means, centred on their mean.
    """
    model.eval()
    codes = torch.cat([model.encode(x[i:i + batch_size]).mean for i in range(0, len(x), batch_size)])
    codes_np = _as_numpy(codes)
    if codes_np.shape[1] == 2:
        return codes_np, np.zeros(2), np.eye(2)
    centre = codes_np.mean(0)
    _, _, vt = np.linalg.svd(codes_np - centre, full_matrices=False)
    return codes_np, centre, vt[:2]


@torch.no_grad()
def manifold_grid(model: VAE, n: int = 20, centre: np.ndarray | None = None,
                  axes: np.ndarray | None = None, spread: tuple[float, float] = (1.0, 1.0)):
    """Decoder means over an n x n grid placed at Gaussian quantiles along two latent directions.

    Returns (images (n*n, C, H, W) in [0, 1], coords along axis 1, coords along axis 2); row 0 is the largest
    coordinate on axis 2 so the picture reads like a plot. `spread` scales the quantiles (e.g. the standard
    deviation of the codes along each principal axis).
    """
    model.eval()
    dim = model.latent_dim
    centre = np.zeros(dim) if centre is None else centre
    axes = np.eye(dim)[:2] if axes is None else axes
    q = gaussian_quantiles(n)
    c1, c2 = q * spread[0], q[::-1] * spread[1]
    zs = np.array([centre + a * axes[0] + b * axes[1] for b in c2 for a in c1], dtype=np.float32)
    return _as_numpy(decode_images(model, torch.from_numpy(zs))), c1, c2


@torch.no_grad()
def reconstructions(model: VAE, x: torch.Tensor, n_samples: int = 3) -> list[tuple[str, np.ndarray]]:
    """Rows: input | decoder mean at the posterior mean | decoder means at `n_samples` draws z ~ q(z|x) (for a
    hierarchical model every group's, each given the draws above it: its encode(x) is the top group's alone)."""
    model.eval()
    rows = [("input", _as_numpy(x)), ("f(mean z)", _as_numpy(model.reconstruct(x).clamp(0, 1)))]
    if isinstance(model, HierarchicalVAE):
        draws = [model.reconstruct_draw(x).clamp(0, 1) for _ in range(n_samples)]
    else:
        q = model.encode(x)
        draws = [decode_images(model, q.sample()) for _ in range(n_samples)]
    return rows + [(f"f(z), z~q #{i + 1}", _as_numpy(d)) for i, d in enumerate(draws)]


@torch.no_grad()
def posterior_mean_params(model: VAE, x: torch.Tensor) -> list[torch.Tensor]:
    """The decoder's parameter maps at the posterior mean of each image x (a hierarchical model's every group at
    its posterior mean, each given the means above it: decoding its top code alone would put the other groups at
    their prior means)."""
    model.eval()
    if isinstance(model, HierarchicalVAE):
        return model.decode_posterior(x, torch.zeros(x.shape[0], model.latent_dim, dtype=x.dtype,
                                                     device=x.device))
    return model.decode(model.encode(x).mean)


def plane_coords(codes: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Codes (N, L) along the plane's two axes, measured from the origin (so radius circles keep meaning)."""
    return codes @ axes.T  # (N, 2)


@torch.no_grad()
def stochastic_rows(model: VAE, params: list[torch.Tensor], n_draws: int = 3) -> list[tuple[str, np.ndarray]]:
    """For the same z, given as the decoder's parameter maps at it (model.decode(z), posterior_mean_params): the
    decoder mean f(z), then `n_draws` draws x ~ p(x|z) (for a Gaussian, f(z) + σ·ε).

    Draws are clipped to [0, 1] for display only.
    """
    rows = [("f(z)", _as_numpy(model.likelihood.mean(params).clamp(0, 1)))]
    for i in range(n_draws):
        rows.append((f"x~p(x|z) #{i + 1}", _as_numpy(model.likelihood.sample(params).clamp(0, 1))))
    return rows


@torch.no_grad()
def prior_samples(model: VAE, n: int = 64, seed: int = 0) -> np.ndarray:
    """Decoder means f(z) for n draws z ~ p(z), (n, C, H, W) in [0, 1]."""
    model.eval()
    z = model.sample_prior(n, torch.Generator().manual_seed(seed))  # (n, L)
    return _as_numpy(decode_images(model, z))


@torch.no_grad()
def interpolations(model: VAE, xa: torch.Tensor, xb: torch.Tensor, steps: int = 8
                   ) -> list[tuple[str, np.ndarray]]:
    """One row per pair: x_a | f(z) along the straight line between the posterior means | x_b (for a hierarchical
    model, between the codes of every group: VAE.path_code)."""
    model.eval()
    za, zb = model.path_code(xa), model.path_code(xb)  # (P, L)
    t = torch.linspace(0, 1, steps, device=za.device)[:, None, None]  # (T, 1, 1)
    z = (1 - t) * za + t * zb  # (T, P, L)
    imgs = decode_images(model, z.reshape(-1, za.shape[-1]))
    imgs = imgs.view(steps, xa.shape[0], *imgs.shape[1:]).transpose(0, 1)  # (P, T, C, H, W)
    return [(f"pair {p + 1}", np.concatenate([_as_numpy(xa[p:p + 1]), _as_numpy(imgs[p]),
                                              _as_numpy(xb[p:p + 1])])) for p in range(xa.shape[0])]


@torch.no_grad()
def traversals(model: VAE, dims: list[int], steps: int = 9, base: np.ndarray | None = None
               ) -> list[tuple[str, np.ndarray]]:
    """One row per latent dimension d: f(z) with z_d at Gaussian quantiles, the other dims at `base` (0)."""
    model.eval()
    base = np.zeros(model.latent_dim) if base is None else base
    q = gaussian_quantiles(steps)
    rows = []
    for d in dims:
        z = np.tile(base, (steps, 1)).astype(np.float32)
        z[:, d] = q
        rows.append((f"z{d + 1}", _as_numpy(decode_images(model, torch.from_numpy(z)))))
    return rows


# ------------------------------------------------------------------------------- a hierarchical model's levels
@torch.no_grad()
def temperature_rows(model: VAE, n: int = 10, temperatures: tuple[float, ...] = (1.0, 0.8, 0.6), seed: int = 0
                     ) -> list[tuple[str, np.ndarray]]:
    """One row per temperature T: f(z) for n prior draws with every latent's noise scaled by T (the same draws,
    rescaled, in every row; a learned top prior's draws keep their components and scale their spread)."""
    model.eval()
    return [(f"T = {t:g}", _as_numpy(decode_images(model, model.sample_prior(n, torch.Generator().manual_seed(seed),
                                                                             t))))
            for t in temperatures]


@torch.no_grad()
def level_rows(model, x: torch.Tensor, temperature: float = 1.0, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """What each level of a hierarchical model holds: the input, then one row per k = 0 .. G: f(z) with the top
    k latent groups at their posterior means given x and the other groups drawn from the prior at `temperature`
    (the same prior noise in every row; k = G: every group at its posterior mean). Temperature 0: the other
    groups at their prior means (the top group at 0), as eval's `mse_keeping` decodes them."""
    model.eval()
    device = next(model.parameters()).device
    x = x.to(device)
    u = (model.sample_prior(x.shape[0], torch.Generator().manual_seed(seed), temperature) if temperature > 0
         else torch.zeros(x.shape[0], model.latent_dim, device=device))  # (N, L)
    names = model.group_names()
    sizes = torch.tensor([0, *model.group_sizes]).cumsum(0).tolist()  # group k starts at column sizes[k]
    rows = [("input", _as_numpy(x))]
    for k in range(len(names) + 1):
        noise = u.clone()
        noise[:, :sizes[k]] = 0  # the kept groups at their posterior means
        label = "prior only" if k == 0 else f"q(z|x) down to {names[k - 1]}"
        rows.append((label, _as_numpy(model.likelihood.mean(model.decode_keeping(x, k, noise)).clamp(0, 1))))
    return rows
