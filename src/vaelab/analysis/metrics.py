"""Metrics on a trained model: the negative ELBO and its parts, in nats per image and bits per dimension."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..data import StoredImages, prepare_data
from ..errors import ConfigError, NotNormalizedWarning
from ..models.likelihoods import LIKELIHOODS
from ..models.vae import VAE
from ..training.evaluation import NEGATIVE_NOTE, bits_per_dim, elbo_metrics, eval_rows, rows_within
from ..training.evaluation import widest_activation_bytes as widest_activation_bytes  # re-exported
from .anatomy import anatomy_rows, elbo_anatomy
from .factors import factor_rows, kept_count, kept_rows, split_scores
from .quality import N_SCORE, quality_rows
from .quality import sample_quality as run_sample_quality

# ------------------------------------------------------------------------------ evaluating a saved run
# The numbers below are functions of arrays (codes, labels, images) so each can be checked on inputs whose
# answer is known; evaluate_run() gathers them for a run.

ACTIVE_THRESHOLD = 0.01  # a latent dimension is active when Var_x[E_q(z|x)[z_d]] exceeds this (Burda et al.)
PRIOR_MASS = {"68": 0.68, "95": 0.95, "99.7": 0.997}  # radius_share's keys: the share of N(0, I) within each radius
DEFAULT_IW_SAMPLES = 100  # K of `vaelab eval`, `report`, `demo` and `sigma-study` alike (see _add_eval_flags)
KNN_K = 10
IW_BYTES = 1024 * 784 * 4  # the widest decoder activation of one IWAE step, per CPU thread (64x that on a GPU):
# bounds memory whatever K is, and keeps each step's activations in cache, where the elementwise work (a conv
# decoder's GroupNorm and SiLU, the log-density) costs little next to the matmuls. 1024 rows of the 784-400-20 MLP;
# ~100 of the 32x32x3 conv decoder, whose 32x16x16 maps are 10x wider (benchmarks/eval_speed.py --arch conv)


def active_units(codes: Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, list[float]]:
    """(count, per-dimension variance over the data) of posterior means `codes` (N, L)."""
    var = codes.double().var(0, unbiased=False)  # (L,)
    return int((var > threshold).sum()), var.tolist()


def prior_radius(p: float, dim: int) -> float:
    """The radius r with P(‖z‖ ≤ r) = p for z ~ N(0, I_dim): the chi quantile, sqrt(chi2.ppf(p, dim)).

    ‖z‖² is chi-square with `dim` degrees of freedom, whose CDF is the regularized gamma P(dim/2, r²/2);
    bisection finds r² to float64 precision. In high dimensions the prior's mass sits near radius √dim, so a
    fixed radius such as 3 holds almost none of it (about 0.03 % in 20 dimensions).
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    a = torch.tensor(dim / 2, dtype=torch.float64)

    def cdf(r2: float) -> float:
        return float(torch.special.gammainc(a, torch.tensor(r2 / 2, dtype=torch.float64)))

    lo, hi = 0.0, float(dim) + 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return math.sqrt((lo + hi) / 2)


def prior_radii(dim: int) -> dict[str, float]:
    """{"68": r, "95": r, "99.7": r}: the radii that hold 68 / 95 / 99.7 % of N(0, I_dim)."""
    return {k: prior_radius(p, dim) for k, p in PRIOR_MASS.items()}


def radius_share(codes: Tensor, radii: dict[str, float] | None = None) -> dict[str, float]:
    """Share of codes (N, L) whose Euclidean norm is at most each radius (inclusive), keyed like `radii`.

    By default the radii are prior_radii(L), so a sample of the prior N(0, I_L) gives about
    {"68": 0.68, "95": 0.95, "99.7": 0.997} in any dimension L.
    """
    radii = prior_radii(codes.shape[1]) if radii is None else radii
    norms = codes.double().norm(dim=1)  # (N,)
    return {k: float((norms <= r).double().mean()) for k, r in radii.items()}


def knn_agreement(codes: Tensor, labels, k: int = KNN_K, block: int = 1024) -> float | None:
    """Mean share of each code's k nearest other codes (Euclidean) that share its label; None without labels of
    two classes or more (one class would agree 100 %)."""
    if labels is None or torch.as_tensor(labels).unique().numel() < 2:
        return None
    labels = torch.as_tensor(labels).to(codes.device)
    n = codes.shape[0]
    if n <= k:
        raise ValueError(f"k-NN agreement needs more than k={k} codes, got {n}")
    codes = codes.double()
    hits = 0.0
    for start in range(0, n, block):
        d = torch.cdist(codes[start:start + block], codes)  # (b, N)
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + start] = math.inf  # a code is not its own neighbour
        idx = d.topk(k, dim=1, largest=False).indices  # (b, k)
        hits += (labels[idx] == labels[start:start + block, None]).double().sum().item()
    return hits / (n * k)


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def sharpness(images: Tensor) -> float:
    """Variance of the Laplacian (3x3, valid region, per channel), averaged over images (N, C, H, W).

    The usual blur measure: a blurry image has a flat Laplacian, a sharp one has large swings at edges.
    """
    x = images.double().flatten(0, 1).unsqueeze(1)  # (N*C, 1, H, W)
    lap = torch.nn.functional.conv2d(x, LAPLACIAN.to(x).view(1, 1, 3, 3))  # (N*C, 1, H-2, W-2)
    per_channel = lap.flatten(1).var(1, unbiased=False).view(images.shape[0], -1)  # (N, C)
    return float(per_channel.mean(1).mean())


def iwae_sizes(model: VAE, n: int, k: int, batch_size: int, device: torch.device) -> tuple[int, int]:
    """(images, samples per image) of each IWAE step: about IW_BYTES of the decoder's widest activation per
    thread, so the step stays in cache for a conv decoder as for an MLP. K = 1 takes whole batches, as
    elbo_metrics does: the same noise stream, so it draws the very z of the ELBO's estimate."""
    if k == 1:
        return max(1, min(batch_size, n)), 1
    rows = max(16, rows_within(model, IW_BYTES * (torch.get_num_threads() if device.type == "cpu" else 64), device))
    group = max(1, min(batch_size, n, rows // min(k, 16)))
    return group, max(1, min(k, rows // group))


def iwae_log_px(model: VAE, x: Tensor | StoredImages, k: int, batch_size: int, prepare,
                progress: bool = False, eps: Tensor | None = None) -> Tensor:
    """Importance-weighted log p(x) with K samples per image, (N,) nats, over a whole split.

    model.iwae_bound draws the K samples `chunk` at a time for a group of images and combines them with a
    running log-sum-exp; iwae_sizes sizes groups and chunks by the memory of the decoder's activations.
    `eps` (K, N, L) is the noise of every draw, drawn here when not given (the numbers then depend on the seed
    and on the sizes; given, they do not).
    """
    from tqdm.auto import tqdm

    n = x.shape[0]
    group, chunk = iwae_sizes(model, n, k, batch_size, x.device)
    out = torch.empty(n, dtype=torch.float64)
    with tqdm(total=n, desc=f"log p(x), K={k}", unit="img", disable=not progress, leave=False) as bar, \
            torch.inference_mode():
        for start in range(0, n, group):
            xb = prepare(x[start:start + group])
            e = None if eps is None else eps[:, start:start + xb.shape[0]]
            out[start:start + xb.shape[0]] = model.iwae_bound(xb, k, chunk, e).double().cpu()
            bar.update(xb.shape[0])
    return out


@torch.no_grad()
def posterior_means(model: VAE, x: Tensor | StoredImages, batch_size: int, prepare) -> Tensor:
    return torch.cat([model.encode(prepare(x[i:i + batch_size])).mean for i in range(0, len(x), batch_size)])


@torch.no_grad()
def unit_means(model, x: Tensor | StoredImages, batch_size: int, prepare) -> Tensor:
    """A hierarchical model's posterior means of every latent unit, (N, L) (model.unit_means)."""
    return torch.cat([model.unit_means(prepare(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def group_numbers(model, m: dict, variance: list[float], x: Tensor | StoredImages, rows: int, prepare) -> dict:
    """A hierarchical model's KL and active units per latent group, top first, with the groups' names, and what
    the groups hold: `mse_keeping`[k], the per-pixel MSE of f(z) with the top k groups at their posterior means
    and the others at their prior means (k = 0: the prior means alone; k = G: the reconstruction)."""
    var = torch.tensor(variance, dtype=torch.float64)
    active = [int((v > ACTIVE_THRESHOLD).sum()) for v in var.split(model.group_sizes)]
    groups = len(model.group_sizes)
    sq = torch.zeros(groups + 1, dtype=torch.float64)
    for i in range(0, len(x), rows):
        xb = prepare(x[i:i + rows])
        zero = xb.new_zeros(len(xb), model.latent_dim)  # every group at its mean: the posterior's or the prior's
        for k in range(groups + 1):
            mean = model.likelihood.mean(model.decode_keeping(xb, k, zero))
            sq[k] += (mean - xb).square().sum().double().cpu()
    return {"group_names": model.group_names(), "group_sizes": model.group_sizes, "code_dim": model.code_dim,
            "kl_per_group": m.get("kl_per_group"), "active_units_per_group": active,
            "mse_keeping": (sq / (len(x) * model.n_pixels)).tolist()}


@torch.no_grad()
def evaluate(model: VAE, x: Tensor | StoredImages, prepare, labels=None, iw_samples: int = DEFAULT_IW_SAMPLES,
             batch_size: int = 500, seed: int = 0, progress: bool = False, factors=None,
             factor_names=None, renderer=None) -> dict:
    """Every number of `vaelab eval` for the images `x` (stored form; `prepare` maps them to [0, 1]).

    elbo and log_px are log-likelihoods (nats per image, higher is better); bits_per_dim is that of the
    −ELBO, as in metrics.jsonl. One seed fixes every sample drawn, without touching the global RNG stream.
    factors (N, K) with factor_names: the images' known factors of variation, scored as `factor_scores`; with
    the data's `renderer` too, `label_kept` says how often a reconstruction keeps the first factor (the class) that
    a redraw of the image's factors would show (factors.read_label).
    """
    model.eval()
    m = elbo_metrics(model, x, batch_size, prepare, seed=seed)
    rows = eval_rows(model, batch_size, x.device)  # images per pass: batch_size unless the decoder is too wide
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # The prior samples come first, from the seed alone, so every number but log_px is the same
        # whatever K is (the σ study's table and `vaelab eval` agree for any --iw-samples).
        torch.manual_seed(seed)
        codes = posterior_means(model, x, rows, prepare)  # (N, L)
        sharp = torch.zeros(3, dtype=torch.float64)  # data, recon, samples: sums of per-batch means x sizes
        reading = renderer is not None and factors is not None and bool(factor_names)
        levels = np.unique(np.asarray(factors)[:, 0]) if reading else np.zeros(0)
        kept = 0
        for i in range(0, len(x), rows):
            xb = prepare(x[i:i + rows])
            images = (xb, model.reconstruct(xb).clamp(0, 1),
                      model.decode_mean(model.sample_prior(len(xb))).clamp(0, 1))
            sharp += torch.tensor([sharpness(im) for im in images], dtype=torch.float64) * len(xb)
            if reading:
                kept += kept_count(images[1].cpu(), factors[i:i + rows], renderer, levels)
        torch.manual_seed(seed)  # K = 1 then draws the very z that elbo_metrics drew: it is the ELBO estimate
        log_px = iwae_log_px(model, x, iw_samples, batch_size, prepare, progress)
    sharpness_means = (sharp / len(x)).tolist()
    hierarchical = hasattr(model, "unit_means")  # codes: the top group; active units: every unit, as kl_per_dim
    count, var = active_units(unit_means(model, x, rows, prepare) if hierarchical else codes)
    radii = prior_radii(codes.shape[1])
    d = model.n_pixels
    lp = log_px.mean().item()
    return {
        "elbo": -m["loss"], "log_px": lp,
        "log_px_stderr": log_px.std().item() / math.sqrt(len(log_px)) if len(log_px) > 1 else None,
        "iw_samples": iw_samples,
        "bits_per_dim": m["bits_per_dim"],
        "bits_per_dim_log_px": bits_per_dim(-lp, d, model.likelihood.continuous),
        "rec": m["rec"], "kl": m["kl"], "mse": m["mse"], "kl_per_dim": m["kl_per_dim"],
        "active_units": count, "posterior_mean_variance": var,
        "radius_share": radius_share(codes, radii), "radius_quantiles": radii,
        "knn_agreement": knn_agreement(codes, labels) if len(codes) > KNN_K else None,
        "sharpness": dict(zip(("data", "recon", "samples"), sharpness_means, strict=True)),
        "sigma": m.get("sigma") if model.likelihood.additive_gaussian_noise else None,  # the noise's sd
        # the KL = I(x; z) + KL(q(z) ‖ p(z)); for one latent group (a hierarchy's KL has a term per group)
        **(elbo_anatomy(model, x, prepare, batch_size, seed) if not hierarchical else {}),
        **(group_numbers(model, m, var, x, rows, prepare) if hierarchical else {}),
        "n_images": int(x.shape[0]),
        "factor_scores": split_scores(codes.double().cpu().numpy(), factors, factor_names, seed),
        "label_kept": {"factor": factor_names[0], "share": kept / len(x), "levels": len(levels)} if reading else None,
    }


SPLITS = ("train", "test")


def check_eval_args(split: str, iw_samples: int, batch_size: int, limit: int | None = None) -> None:
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    for flag, v in (("--iw-samples", iw_samples), ("--batch-size", batch_size), ("--limit", limit)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{flag} must be an integer >= 1; got {v!r}")


class Split(NamedTuple):
    x: Tensor | StoredImages  # (N, C, H, W) as stored (uint8 or float), on the model's device
    prepare: Callable[[Tensor | StoredImages], Tensor]  # stored batch -> model input in [0, 1]
    labels: Tensor | None
    classes: list[str] | None
    normalized: bool  # False for a Bernoulli on grey pixels
    factors: np.ndarray | None = None  # (N, F) named factors of variation (shapes, dsprites)
    factor_names: list[str] | None = None
    renderer: Callable | None = None  # draws images from factor rows (generated data)


def split_data(config, split: str, device: torch.device, limit: int | None = None) -> Split:
    """A run's split as the trainer evaluated it (same data, same binarization), its first `limit` images."""
    with warnings.catch_warnings():  # evaluate_run reports it as "normalized": false instead
        warnings.simplefilter("ignore", NotNormalizedWarning)
        prep = prepare_data(config, device, binary_only=LIKELIHOODS[config.model.likelihood].binary_only)
    x = prep.test if split == "test" else prep.train_eval
    labels = prep.data.test_labels if split == "test" else prep.data.train_labels
    factors = prep.data.test_factors if split == "test" else prep.data.train_factors
    if limit is not None:
        x = x[:limit]
        labels = None if labels is None else labels[:limit]
        factors = None if factors is None else factors[:limit]
    if labels is not None and len(np.unique(labels)) < 2:  # one class is no labels: no score, no label colours
        labels = None
    label_tensor = None if labels is None else torch.as_tensor(labels)
    classes = None if labels is None else prep.data.classes
    return Split(x, prep.prepare, label_tensor, classes, prep.normalized, factors, prep.data.factor_names,
                 prep.data.renderer)


def evaluate_run(run, split: str = "test", iw_samples: int = DEFAULT_IW_SAMPLES, batch_size: int = 500,
                 limit: int | None = None, seed: int = 0, progress: bool = False,
                 sample_quality: bool = False, temperatures: Sequence[float] = (1.0,)) -> dict:
    """evaluate() on a run's `split` (its first `limit` images), loaded as the trainer loaded it; with
    `sample_quality`, also the sample-quality scores (vaelab.analysis.quality) against the first `limit` (at
    most 2000) test images, whatever the split, with prior samples at each of `temperatures`."""
    check_eval_args(split, iw_samples, batch_size, limit)
    device = next(run.model.parameters()).device
    s = split_data(run.config, split, device, limit)
    numbers = evaluate(run.model, s.x, s.prepare, s.labels, iw_samples, batch_size, seed, progress, s.factors,
                       s.factor_names, s.renderer)
    out = {"split": split, **numbers}
    out["normalized"] = s.normalized
    if sample_quality:
        out["sample_quality"] = run_sample_quality(run, min(N_SCORE, limit or N_SCORE), seed, progress=progress,
                                                   temperatures=temperatures)
    return out


def table_rows(r: dict) -> list[tuple[str, str]]:
    """The numbers of evaluate() as (name, formatted value) rows, for the terminal and the HTML report.

    One convention: negative log-likelihoods (the −ELBO, −log p(x|z), the IWAE bound on −log p(x)), in nats per
    image, lower is better, as training reports them, each with its bits/dim. The first one below 0 is followed
    by a row that says why that is fine.
    """
    def f(v, spec=".2f"):
        return "n/a" if v is None else format(v, spec)

    def bpd(v):
        return "" if v is None else f"  = {v:.4f} bits/dim"

    k, dim = r["iw_samples"], len(r["kl_per_dim"] if r["kl_per_dim"] is not None else r["posterior_mean_variance"])
    nll = [  # (row, value): the rows that are negative log-likelihoods
        (("−ELBO (loss, lower is better)", f"{f(-r['elbo'])} nats/image{bpd(r['bits_per_dim'])}"), -r["elbo"]),
        (("  reconstruction −log p(x|z)", f"{f(r['rec'])} nats/image"), r["rec"]),
        (("  KL(q(z|x) ‖ p(z))", f"{f(r['kl'])} nats/image"), None),
        *((row, None) for row in anatomy_rows(r)),
        ((f"−log p(x) ≤ (IWAE, K = {k})", f"{f(-r['log_px'])} nats/image ± {f(r['log_px_stderr'])} s.e. over "
          f"images{bpd(r['bits_per_dim_log_px'])}"), -r["log_px"]),
        ((f"  tighter than −ELBO by (K = {k})", f"{f(r['log_px'] - r['elbo'])} nats/image"), None),
    ]
    rows = [("images", f"{r['n_images']} ({r.get('split', '?')} split)")]
    explained = False
    for row, value in nll:
        rows.append(row)
        if value is not None and value < 0 and not explained:
            rows.append(("  below 0?", NEGATIVE_NOTE))
            explained = True
    shares, radii = r["radius_share"], r["radius_quantiles"]
    rows += [
        ("MSE per pixel of f(z)", f(r["mse"], ".5f")),
        ("σ in use", f(r["sigma"], ".4g")),
        *_kl_rows(r, dim),
        ("codes within r68 / r95 / r99.7", " / ".join(f"{shares[p]:.1%}" for p in PRIOR_MASS)),
        ("  (the radii)", f"{' / '.join(f'{radii[p]:.2f}' for p in PRIOR_MASS)} hold 68 / 95 / 99.7 % of the "
         f"prior N(0, I) in {r.get('code_dim', dim)} dimensions, so codes spread like the prior give about those "
         "shares"),
        (f"{KNN_K}-NN label agreement", "n/a (needs labels and > 10 images)" if r["knn_agreement"] is None
         else f"{r['knn_agreement']:.1%}"),
        ("sharpness data / recon / samples", " / ".join(f"{r['sharpness'][name]:.4f}"
                                                         for name in ("data", "recon", "samples"))),
    ]
    rows += kept_rows(r.get("label_kept"))
    rows += factor_rows(r.get("factor_scores"))
    rows += quality_rows(r)
    if r.get("normalized") is False:
        rows.append(("note", "Bernoulli on non-binary pixels is not a normalized density; −ELBO and "
                     "−log p(x) are cross-entropy bounds, not negative log-likelihoods"))
    return rows


def _kl_rows(r: dict, dim: int) -> list[tuple[str, str]]:
    """The KL per latent dimension and the active units (per group, top first, for a hierarchical model)."""
    if r.get("kl_per_group") is not None:
        names = r["group_names"]
        return [("KL per latent group (top first)",
                 " | ".join(f"{n}: {v:.2f}" for n, v in zip(names, r["kl_per_group"], strict=True))),
                ("active units (Var > 0.01)", f"{r['active_units']} of {dim}: " + " | ".join(
                    f"{n}: {a} of {size}" for n, a, size in zip(names, r["active_units_per_group"],
                                                                r["group_sizes"], strict=True))),
                *_keeping_rows(r, names)]
    return [("KL per latent dim", "n/a (the prior has no per-dimension KL; the KL above is estimated at z ~ q(z|x))"
             if r["kl_per_dim"] is None else " ".join(f"{v:.2f}" for v in r["kl_per_dim"])),
            ("active units (Var > 0.01)", f"{r['active_units']} of {dim}")]


def _keeping_rows(r: dict, names: list[str]) -> list[tuple[str, str]]:
    """What the groups hold: the MSE with the top groups from q(z|x), down to each group, the rest at prior means."""
    if r.get("mse_keeping") is None:  # numbers saved before it was measured
        return []
    kept = ["none", *names]
    return [("MSE keeping groups down to (rest at prior means)",
             " | ".join(f"{n}: {v:.4f}" for n, v in zip(kept, r["mse_keeping"], strict=True)))]


def headline(r: dict) -> str:
    """The main numbers of evaluate() on one line, K beside the bound (what `vaelab report` prints)."""
    line = (f"{r.get('split', 'test')} −ELBO {-r['elbo']:.2f} nats/image = {r['bits_per_dim']:.4f} bits/dim; "
            f"−log p(x) ≤ {-r['log_px']:.2f} (IWAE, K = {r['iw_samples']})")
    return line + (f"\n  ({NEGATIVE_NOTE})" if min(-r["elbo"], -r["log_px"]) < 0 else "")
