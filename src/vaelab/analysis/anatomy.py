"""The ELBO's anatomy (ELBO surgery, Hoffman & Johnson 2016): the average KL(q(z|x) ‖ p(z)) over a split's N
images is I(x; z) + KL(q(z) ‖ p(z)).

I(x; z) is the information the code carries about which image it came from (at most log N); the marginal KL
is the gap between the aggregate posterior q(z) = (1/N) Σ_n q(z|x_n) and the prior p(z) (the model's: N(0, I)
or a learned one, whose log-density it reads).

Estimator: M draws z ~ q(z|x_i) for each image i; log q(z) = logsumexp_n log q(z|x_n) − log N, exact against
all N posteriors (a matrix product in float64, in blocks of bounded size, with the entries its rounding could
spoil recomputed term by term); then
    marginal KL = mean[log q(z) − log p(z)],    I = mean[log q(z|x_i) − log q(z)].
Their sum is a Monte-Carlo estimate of the average KL, whose closed form is known for N(0, I): the identity
check. A learned prior has no closed form: the average KL it is checked against is then itself estimated, with
KL_DRAWS draws per image independent of the M above.
q(z) is the empirical aggregate posterior of these N images, not that of the data distribution: I ≤ log N
holds for every draw, and a small split caps I well below what the encoder could carry. Standard errors are
over images, as for log p(x). The work is M·N²·L: for the 10,000 test images of Fashion-MNIST at L = 20, M = 1,
about a second on two CPU cores, a fraction of the IWAE bound's time at K = 100.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data import StoredImages
from ..models.priors import Prior, StandardPrior
from ..models.vae import LOG_2PI, VAE, DiagonalGaussian

ANATOMY_DRAWS = 1  # M: z's drawn from q(z|x_i) per image
KL_DRAWS = 10  # a learned prior: z's per image of the independent estimate of the average KL
ANATOMY_MAX_IMAGES = 10_000  # a larger split's mixture is a random subset of this many images (N² work)
BLOCK_ELEMENTS = 1 << 21  # entries of one (queries x components) block of log q(z|x_n): 16 MiB in float64
FLOOR = -200.0  # log q(z|x_n) − max_n log q(z|x_n) below this counts as this
TOLERANCE = 1e-6  # nats: the largest rounding error let through in an entry of log q(z|x_n) that counts


@torch.no_grad()
def posteriors(model: VAE, x: Tensor | StoredImages, batch_size: int, prepare) -> tuple[Tensor, Tensor]:
    """(mean, logvar) of q(z|x) for every image of `x`, each (N, L) in float64 on the model's device."""
    parts = [model.encode(prepare(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return (torch.cat([q.mean for q in parts]).double(), torch.cat([q.logvar for q in parts]).double())


class Mixture:
    """q(z) = (1/N) Σ_n q(z|x_n) for N diagonal Gaussian posteriors (mean, logvar), each (N, L) in float64.

    log q(z|x_n) = −½ Σ_l [(z_l − μ_nl)²/σ²_nl + log σ²_nl + log 2π] expands into one matrix product of
    [z², z, 1] with [−1/2σ², μ/σ², −½ c_n]: N·L work per query, with no (Q, N, L) tensor. The expansion cancels:
    its rounding error reaches (2L + 3)·u times the same product of absolute values, tens of nats for σ ≈ 1e-9
    (log σ² = −40, which an encoder trained with a small decoder σ does reach). A second product (in float32: it
    is only a bound) bounds that error, and the entries where it exceeds TOLERANCE and that may lie within −FLOOR
    nats of the top of their row are recomputed term by term.
    """

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean, self.logvar = mean, logvar
        dim = mean.shape[1]
        precision = torch.exp(-logvar)  # (N, L)
        fit = (mean.square() * precision).sum(1)  # (N,)
        const = fit + logvar.sum(1) + dim * LOG_2PI  # (N,)
        self.weights = torch.cat([-0.5 * precision, mean * precision, -0.5 * const[:, None]], 1)  # (N, 2L + 1)
        sizes = torch.cat([0.5 * precision, (mean * precision).abs(),
                           0.5 * (fit + logvar.abs().sum(1) + dim * LOG_2PI)[:, None]], 1)  # (N, 2L + 1)
        self.sizes = (sizes * (8 * (2 * dim + 3) * 2.0**-53)).float()  # |rounding error| ≤ [z², |z|, 1] · sizes
        self.largest = self.sizes.amax(0)  # (2L + 1,)

    def log_components(self, z: Tensor) -> Tensor:
        """log q(z_k|x_n) for queries z (Q, L): (Q, N), within TOLERANCE of exact in every entry that counts
        (within −FLOOR nats of its row's largest); the others stay below that."""
        features = torch.cat([z.square(), z, torch.ones_like(z[:, :1])], 1)  # (Q, 2L + 1)
        rows = features @ self.weights.T  # (Q, N)
        sizes = features.abs().float()
        if (sizes @ self.largest).max() <= TOLERANCE:  # wide posteriors: no entry can be off by more
            return rows
        bound = (sizes @ self.sizes.T).double()  # (Q, N) ≥ |rows − exact|
        # the row's exact top is at least floor − FLOOR, so an entry below floor − bound does not count
        floor = (rows - bound).amax(1, keepdim=True) + FLOOR  # (Q, 1)
        q, n = ((bound > TOLERANCE) & (rows + bound >= floor)).nonzero(as_tuple=True)
        step = max(1, BLOCK_ELEMENTS // z.shape[1])
        for i in range(0, len(q), step):  # (K, L) at a time
            qi, ni = q[i:i + step], n[i:i + step]
            rows[qi, ni] = DiagonalGaussian(self.mean[ni], self.logvar[ni]).log_prob(z[qi])
        return rows

    def log_prob(self, z: Tensor, block_elements: int = BLOCK_ELEMENTS) -> Tensor:
        """log q(z) = logsumexp_n log q(z|x_n) − log N for queries z (Q, L): (Q,), in blocks of bounded size."""
        out = torch.empty(len(z), dtype=z.dtype, device=z.device)
        block = max(1, block_elements // len(self.mean))
        for start in range(0, len(z), block):
            rows = self.log_components(z[start:start + block])  # (b, N)
            top = rows.amax(1, keepdim=True)  # (b, 1)
            # the terms below e^FLOOR of the largest count as e^FLOOR: a CPU exp of inputs as far below as −1e14
            # (narrow posteriors far away) takes a slow path, and N·e^-200 changes no float64 sum
            total = (rows - top).clamp_(min=FLOOR).exp_().sum(1)  # (b,)
            out[start:start + len(rows)] = total.log() + top[:, 0]
        return out - math.log(len(self.mean))


def _mean_and_se(terms: Tensor) -> tuple[float, float | None]:
    """Mean of per-draw terms (M, N) and its standard error over images, as for log p(x): the standard deviation
    of the N per-image means over √N; None for one image."""
    per_image = terms.mean(0)  # (N,)
    n = len(per_image)
    return per_image.mean().item(), (per_image.std().item() / math.sqrt(n) if n > 1 else None)


def _prior_log_prob(prior: Prior, z: Tensor, block_elements: int) -> Tensor:
    """log p(z) for z (Q, L), in z's precision, a block of rows at a time (a mixture prior makes (rows, K, L))."""
    size = sum(p.numel() for p in prior.parameters()) // max(1, z.shape[1]) + 1  # about K for a mixture
    block = max(1, block_elements // (size * z.shape[1]))
    return torch.cat([prior.log_prob(z[i:i + block]) for i in range(0, len(z), block)])


def _average_kl(mean: Tensor, logvar: Tensor, prior: Prior, g: torch.Generator, block_elements: int) -> Tensor:
    """KL(q(z|x_i) ‖ p(z)) per image, (N,): the closed form where the prior has one, else the mean over KL_DRAWS
    fresh draws z ~ q(z|x_i) of log q(z|x_i) − log p(z)."""
    if prior.closed_form_kl:
        kl_per_dim = prior.kl_per_dim(mean, logvar)
        assert kl_per_dim is not None
        return kl_per_dim.sum(1)
    eps = torch.randn(KL_DRAWS, *mean.shape, generator=g, dtype=torch.float64).to(mean.device)  # (D, N, L)
    z = mean + torch.exp(0.5 * logvar) * eps
    log_p = _prior_log_prob(prior, z.view(-1, mean.shape[1]), block_elements).view(KL_DRAWS, -1)
    return (DiagonalGaussian(mean, logvar).log_prob(z) - log_p).mean(0)


@torch.no_grad()
def anatomy(mean: Tensor, logvar: Tensor, draws: int = ANATOMY_DRAWS, seed: int = 0,
            max_images: int = ANATOMY_MAX_IMAGES, block_elements: int = BLOCK_ELEMENTS,
            prior: Prior | None = None) -> dict:
    """I(x; z), KL(q(z) ‖ p(z)) and the identity check for posteriors N(mean, exp(logvar)), each (N, L), and the
    prior p(z) (N(0, I) when None).

    The draws come from a generator of their own (`seed`, on the CPU, so every device draws the same z): the
    caller's random stream is untouched. Above `max_images` the images are a random subset of that size.
    Returns nats per image: mutual_info, marginal_kl, each with its standard error (`_se`), mutual_info_max
    (log N), anatomy_kl (the average KL of the images used: closed form, or estimated), kl_identity_gap (I +
    marginal KL − anatomy_kl, which is 0 up to Monte-Carlo noise) with its standard error, anatomy_images and
    anatomy_draws.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    prior = StandardPrior(mean.shape[1]) if prior is None else prior
    g = torch.Generator().manual_seed(seed)
    if len(mean) > max_images:
        keep = torch.randperm(len(mean), generator=g)[:max_images].sort().values.to(mean.device)
        mean, logvar = mean[keep], logvar[keep]
    mean, logvar = mean.double(), logvar.double()
    n, dim = mean.shape
    eps = torch.randn(draws, n, dim, generator=g, dtype=torch.float64).to(mean.device)  # (M, N, L)
    z = (mean + torch.exp(0.5 * logvar) * eps).reshape(-1, dim)  # (M·N, L): draw j of image i at row j·N + i
    own = DiagonalGaussian(mean, logvar).log_prob(z.view(draws, n, dim)).view(-1)  # (M·N,) log q(z|x_i)
    aggregate = Mixture(mean, logvar).log_prob(z, block_elements)  # (M·N,) log q(z)
    log_prior = _prior_log_prob(prior, z, block_elements)  # (M·N,)
    shape = (draws, n)
    mi, mi_se = _mean_and_se((own - aggregate).view(shape))
    mkl, mkl_se = _mean_and_se((aggregate - log_prior).view(shape))
    kl = _average_kl(mean, logvar, prior, g, block_elements)  # (N,)
    gap, gap_se = _mean_and_se((own - log_prior).view(shape) - kl)
    return {"mutual_info": mi, "mutual_info_se": mi_se, "mutual_info_max": math.log(n),
            "marginal_kl": mkl, "marginal_kl_se": mkl_se, "anatomy_kl": kl.mean().item(),
            "kl_identity_gap": gap, "kl_identity_gap_se": gap_se, "anatomy_images": n, "anatomy_draws": draws}


@torch.no_grad()
def elbo_anatomy(model: VAE, x: Tensor | StoredImages, prepare, batch_size: int = 500, seed: int = 0,
                 draws: int = ANATOMY_DRAWS, max_images: int = ANATOMY_MAX_IMAGES) -> dict:
    """anatomy() of the model's posteriors on the images `x` (stored form; `prepare` maps them to [0, 1])."""
    model.eval()
    mean, logvar = posteriors(model, x, batch_size, prepare)
    return anatomy(mean, logvar, draws, seed, max_images, prior=model.prior)


def anatomy_rows(r: dict) -> list[tuple[str, str]]:
    """The rows of the KL's two parts under the KL row of `vaelab eval`; none for numbers without them."""
    if r.get("mutual_info") is None:
        return []

    def pm(v: float, se: float | None) -> str:
        return f"{v:.2f}" + ("" if se is None else f" ± {se:.2f} s.e.")

    n, m = r["anatomy_images"], r["anatomy_draws"]
    images = f"N = {n}" if n >= r.get("n_images", n) else f"a random N = {n} of the {r['n_images']}"
    return [
        (f"    = I(x; z) (≤ log N = {r['mutual_info_max']:.2f})",
         f"{pm(r['mutual_info'], r['mutual_info_se'])} nats/image"),
        ("    + KL(q(z) ‖ p(z)) (marginal KL)", f"{pm(r['marginal_kl'], r['marginal_kl_se'])} nats/image"),
        ("    I + marginal KL − KL",
         f"{pm(r['kl_identity_gap'], r['kl_identity_gap_se'])} nats/image (0 up to noise; q(z) = the mixture of "
         f"{images} images' q(z|x), {m} draw{'s' if m > 1 else ''} z ~ q(z|x) per image)"),
    ]
