"""Disentanglement scores: how codes (N, L) line up with known factors of variation (N, K), on plain arrays.

MIG, SAP, DCI, the FactorVAE score and the β-VAE score follow disentanglement_lib (Locatello et al. 2019) where a
fixed table of (code, factor) rows allows it; a probe per factor says how well the codes predict it at all.
docs/factors.md gives each definition, its settings and where it departs from disentanglement_lib:

- DCI's predictor is an L2-regularised linear model (logistic for a discrete factor, ridge for a continuous one) on
  standardised codes, its importances the absolute weights, not gradient-boosted trees;
- SAP's 1-D classifier for a discrete factor is linear discriminant analysis, not a linear SVM;
- FactorVAE and β-VAE fix a factor by drawing rows of the table that share its value (its bin for a continuous
  factor), not by rendering new images;
- a factor is discrete or continuous on its own (inferred: integer values are discrete), not all of them at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .probes import fit_logistic, knn_probe, linear_probe, standardised


@dataclass(frozen=True)
class FactorSettings:
    bins: int = 20  # equal-width bins per code dimension for MIG (disentanglement_lib's histogram discretizer)
    factor_bins: int = 20  # a continuous factor with more distinct values than this is cut into this many bins
    test_share: float = 0.25  # rows held out for the probes, DCI's informativeness and SAP's accuracies
    batch_size: int = 64  # rows per FactorVAE vote; pairs per β-VAE point
    train_votes: int = 10000  # FactorVAE votes and β-VAE points to fit each classifier on
    eval_votes: int = 5000  # ... and to score it on
    min_std: float = 0.05  # FactorVAE leaves out code dimensions whose std is below this (collapsed)
    l2: float = 1e-3  # L2 penalty of the linear probes (on standardised codes)
    max_iter: int = 200  # L-BFGS iterations of a logistic probe
    knn: int = 10  # neighbours of the nearest-neighbour probe
    knn_rows: int = 5000  # train rows it searches (the first of the shuffled split)
    seed: int = 0

    def __post_init__(self):
        for name in ("bins", "factor_bins", "batch_size", "train_votes", "eval_votes", "max_iter", "knn", "knn_rows"):
            v, low = getattr(self, name), 1 if name in ("max_iter", "knn", "knn_rows") else 2
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not 0 < self.test_share < 1:
            raise ValueError(f"test_share must be in (0, 1), got {self.test_share!r}")
        if not self.min_std >= 0 or not self.l2 > 0:
            raise ValueError(f"min_std must be >= 0 and l2 > 0, got {self.min_std!r} and {self.l2!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


SETTING_NAMES = tuple(f.name for f in fields(FactorSettings))


# ------------------------------------------------------------------------------ the table and its factors
def _check(codes, factors, discrete, names) -> tuple[np.ndarray, np.ndarray, list[bool], list[str]]:
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes must be an (N, L) array, got shape {codes.shape}")
    if factors.ndim != 2 or factors.shape[1] < 1 or len(factors) != len(codes):
        raise ValueError(f"factors must be an (N, K) array with N = {len(codes)} rows like codes, got {factors.shape}")
    if len(codes) < 4:
        raise ValueError(f"need at least 4 rows (some are held out), got {len(codes)}")
    for what, a in (("codes", codes), ("factors", factors)):
        if not np.isfinite(a).all():
            raise ValueError(f"{what} must be finite; rows {np.flatnonzero(~np.isfinite(a).all(1))[:5].tolist()} "
                             "hold NaN or inf")
    k = factors.shape[1]
    names = [f"factor {j}" for j in range(k)] if names is None else [str(n) for n in names]
    if len(names) != k or len(set(names)) != k:
        raise ValueError(f"names must be {k} distinct names, one per factor, got {names}")
    if discrete is None:
        kinds = [bool(np.all(f == np.round(f))) for f in factors.T]  # integer values: levels or classes
    elif isinstance(discrete, (bool, np.bool_)):
        kinds = [bool(discrete)] * k
    else:
        kinds = [bool(d) for d in discrete]
        if len(kinds) != k:
            raise ValueError(f"discrete must be a bool or {k} bools, one per factor, got {len(kinds)}")
    for name, f in zip(names, factors.T, strict=True):
        if len(np.unique(f)) < 2:
            raise ValueError(f"factor {name!r} takes the single value {f[0]:g}; each factor needs at least 2 values")
    return codes, factors, kinds, names


def discretise(v: np.ndarray, bins: int) -> np.ndarray:
    """Bin indices of v (N,) in `bins` equal-width bins over [min, max] (disentanglement_lib's histogram
    discretizer: np.digitize on np.histogram's edges, so the maximum shares the last bin)."""
    return np.digitize(v, np.histogram_bin_edges(v, bins)[:-1]) - 1


def factor_levels(f: np.ndarray, discrete: bool, bins: int) -> np.ndarray:
    """Integer labels 0..C-1 of a factor (N,): its distinct values, or for a continuous factor with more than
    `bins` of them, its equal-width bin."""
    if not discrete and len(np.unique(f)) > bins:
        f = discretise(f, bins)
    return np.unique(f, return_inverse=True)[1].reshape(-1)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats between two integer label arrays (N,): H(a) + H(b) − H(a, b) from their counts."""
    joint = np.unique(np.stack([a, b]), axis=1, return_counts=True)[1]
    return _entropy(np.bincount(a)) + _entropy(np.bincount(b)) - _entropy(joint)


def _top_gap(matrix: np.ndarray) -> np.ndarray:
    """Per column of (L, K): the largest entry minus the second largest (minus 0 when L = 1)."""
    top = -np.sort(-matrix, axis=0)
    return top[0] - (top[1] if len(top) > 1 else 0.0)


def _split(n: int, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_test = min(n - 2, max(1, round(n * share)))
    return order[n_test:], order[:n_test]


# ------------------------------------------------------------------------------ the scores
def mig_matrix(codes: np.ndarray, levels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(I(z_l; f_k) / H(f_k) as an (L, K) matrix, H(f_k) (K,)), codes cut into `bins` equal-width bins."""
    binned = [discretise(c, bins) for c in codes.T]
    h = np.array([_entropy(np.bincount(f)) for f in levels.T])
    mi = np.array([[mutual_information(c, f) for f in levels.T] for c in binned])  # (L, K)
    return mi / h, h


def dci(importance: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(disentanglement, completeness, completeness per factor) of an importance matrix (L, K) whose columns
    sum to 1, as disentanglement_lib: 1 − entropy (base K) of each code's row, weighted by the row's share of
    the importance; 1 − entropy (base L) of each factor's column."""
    def one_minus_entropy(m: np.ndarray, base: int) -> np.ndarray:  # per row of m
        p = (m + 1e-11) / (m + 1e-11).sum(1, keepdims=True)
        return 1.0 + (p * np.log(p)).sum(1) / math.log(base) if base > 1 else np.ones(len(m))

    rows, k = importance.sum(1), importance.shape[1]
    per_code = one_minus_entropy(importance, k)
    weights = rows / rows.sum() if rows.sum() > 0 else np.full(len(rows), 1 / len(rows))
    per_factor = one_minus_entropy(importance.T, importance.shape[0])
    return float((per_code * weights).sum()), float(per_factor.mean()), per_factor


def sap_matrix(codes, factors, train, test, kinds: list[bool]) -> np.ndarray:
    """(L, K): for a continuous factor the R² of a linear fit on each code dimension, cov² / (var var), over
    all rows (nothing is fitted but a line); for a discrete one the held-out accuracy of a 1-D linear
    discriminant (Gaussian classes of one pooled variance, the train levels' shares as priors)."""
    out = np.zeros((codes.shape[1], len(kinds)))
    for k, discrete in enumerate(kinds):
        for d in range(codes.shape[1]):
            x, y = codes[:, d], factors[:, k]
            if not discrete:
                vx, vy = x.var(), y.var()
                out[d, k] = ((x - x.mean()) @ (y - y.mean()) / len(x)) ** 2 / (vx * vy) if vx > 1e-12 else 0.0
                continue
            x, y = x[train], y[train]
            levels, label = np.unique(y, return_inverse=True)
            label = label.reshape(-1)
            counts = np.bincount(label, minlength=len(levels))
            means = np.bincount(label, x, len(levels)) / counts  # (C,) class means of the code
            var = max(float(((x - means[label]) ** 2).mean()), 1e-12 * (1.0 + x.var()))  # pooled
            scores = codes[test, d, None] * means / var - means**2 / (2 * var) + np.log(counts / len(x))
            out[d, k] = float(np.mean(levels[np.argmax(scores, axis=1)] == factors[test, k]))
    return out


class _Groups:
    """Rows of the table grouped by one factor's level, for drawing rows that share a level."""

    def __init__(self, level: np.ndarray):
        self.order = np.argsort(level, kind="stable")
        _, start, size = np.unique(level[self.order], return_index=True, return_counts=True)
        group = np.repeat(np.arange(len(start)), size)  # group of each sorted position
        self.start, self.size = start[group], size[group]
        self.usable = np.flatnonzero(self.size >= 2)  # positions whose level other rows share

    def batches(self, n: int, b: int, rng: np.random.Generator, pairs: bool) -> tuple[np.ndarray, np.ndarray]:
        """n draws of b rows that share a level with an anchor row (its level drawn as often as it occurs):
        (anchor rows (n, b) or (n, 1), partner rows (n, b)); pairs: each of the b draws has its own anchor and
        a partner other than it; else one anchor per draw and b rows of its level, with replacement."""
        pos = rng.choice(self.usable, size=(n, b if pairs else 1))
        start, size = self.start[pos], self.size[pos]
        if pairs:
            other = rng.integers(0, size - 1)
            other += other >= pos - start  # skip the anchor itself
        else:
            other = rng.integers(0, np.broadcast_to(size, (n, b)))
        return self.order[pos], self.order[start + other]


def _votes(codes: np.ndarray, groups: list[_Groups], n: int, s: FactorSettings, rng, pairs: bool):
    """(factor fixed (n,), per vote: the least-varying code dimension (FactorVAE) or the mean |z_a − z_b| over
    b pairs (β-VAE), (n,) or (n, L))."""
    ks = rng.integers(0, len(groups), size=n)
    out = np.zeros(n, dtype=np.int64) if not pairs else np.zeros((n, codes.shape[1]))
    for k, g in enumerate(groups):
        sel = np.flatnonzero(ks == k)
        for chunk in np.array_split(sel, max(1, len(sel) // 512)):
            anchor, partner = g.batches(len(chunk), s.batch_size, rng, pairs)
            if pairs:
                out[chunk] = np.abs(codes[anchor] - codes[partner]).mean(1)  # (n, L)
            else:
                out[chunk] = np.argmin(codes[partner].var(1, ddof=1), axis=1)  # codes already over their std
    return ks, out


def factorvae_score(codes: np.ndarray, groups: list[_Groups], s: FactorSettings) -> tuple[float, int]:
    """(held-out accuracy of the majority-vote classifier, active dimensions); 0 when every dimension has
    collapsed (std < min_std)."""
    std = codes.std(0, ddof=1)
    active = std >= s.min_std
    if not active.any():
        return 0.0, 0
    z = codes[:, active] / std[active]
    rng = np.random.default_rng([s.seed, 1])
    votes = []
    for n in (s.train_votes, s.eval_votes):
        ks, dims = _votes(z, groups, n, s, rng, pairs=False)
        votes.append(np.bincount(dims * len(groups) + ks, minlength=z.shape[1] * len(groups)).reshape(-1, len(groups)))
    classifier = votes[0].argmax(1)  # (L,) the factor each dimension votes for most often
    return float(votes[1][np.arange(z.shape[1]), classifier].sum() / s.eval_votes), int(active.sum())


def betavae_score(codes: np.ndarray, groups: list[_Groups], s: FactorSettings) -> float:
    """Held-out accuracy of a logistic classifier that tells from mean |z_a − z_b| which factor a and b share."""
    rng = np.random.default_rng([s.seed, 2])
    (k_train, x_train), (k_test, x_test) = (_votes(codes, groups, n, s, rng, pairs=True)
                                            for n in (s.train_votes, s.eval_votes))
    x_train, x_test = standardised(x_train, x_test)
    w, b = fit_logistic(x_train, k_train, len(groups), s.l2, s.max_iter)
    return float(np.mean(np.argmax(x_test @ w + b, axis=1) == k_test))


def factor_scores(codes, factors, discrete=None, names=None, **settings) -> dict:
    """Disentanglement scores of codes (N, L) against factors (N, K), each in [0, 1], higher is better.

    discrete: None (a factor is discrete when all its values are integers), one bool for all, or one per factor.
    A discrete factor is predicted by classifiers and scored by accuracy; a continuous one by linear fits and
    scored by R² (at least 0), and cut into `factor_bins` equal-width bins where a level is needed (MIG,
    FactorVAE, β-VAE). names: one per factor (default "factor 0", ...). settings: the fields of FactorSettings
    (bins, factor_bins, test_share, batch_size, train_votes, eval_votes, min_std, l2, max_iter, seed).

    Returns {"mig", "sap", "dci": {"disentanglement", "completeness", "informativeness"}, "factorvae",
    "betavae", "per_factor", "matrices", "factorvae_active_dims", "settings"}. per_factor, by name: "kind",
    "levels" (distinct values or bins used), "probe" (held-out score of the linear probe; its mean over factors
    is DCI's informativeness), "knn" (of a nearest-neighbour probe: a factor the codes hold along curves scores
    well here only), "probe_metric" ("accuracy" or "R²"), "chance", "best_dim" (the column of codes with the
    most mutual information with it, 0-based), "best_mi", "mig_gap", "sap_gap", "completeness" (DCI's). matrices:
    "mi" (I(z; f) / H(f)), "sap", "importance" (DCI's), each (L, K) as lists. FactorVAE and β-VAE fix a factor
    by drawing rows that share its level, so the table must hold several rows per level. Seeded: the same
    inputs give the same numbers.
    """
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(SETTING_NAMES)}")
    s = FactorSettings(**settings)
    codes, factors, kinds, names = _check(codes, factors, discrete, names)
    levels = np.stack([factor_levels(f, d, s.factor_bins) for f, d in zip(factors.T, kinds, strict=True)], 1)
    groups = [_Groups(level) for level in levels.T]
    for name, g in zip(names, groups, strict=True):
        if len(g.usable) == 0:
            raise ValueError(f"factor {name!r} has no level shared by two rows; FactorVAE and β-VAE draw rows "
                             "that share one")
    train, test = _split(len(codes), s.test_share, np.random.default_rng([s.seed, 0]))
    z_train, z_test = standardised(codes[train], codes[test])
    tables = [(z_train, z_test, factors[train, k], factors[test, k], kinds[k]) for k in range(len(kinds))]
    probes = [linear_probe(*t, s.l2, s.max_iter) for t in tables]
    knn = [knn_probe(*t, s.knn, s.knn_rows) for t in tables]
    importance = np.stack([imp / imp.sum() if imp.sum() > 0 else imp for _, _, imp in probes], 1)  # (L, K)
    disentanglement, completeness, per_factor_c = dci(importance)
    mi, _ = mig_matrix(codes, levels, s.bins)
    sap = sap_matrix(codes, factors, train, test, kinds)
    mig_gaps, sap_gaps = _top_gap(mi), _top_gap(sap)
    fvae, active = factorvae_score(codes, groups, s)
    per_factor = {name: {
        "kind": "discrete" if kinds[k] else "continuous", "levels": int(levels[:, k].max() + 1),
        "probe": probes[k][0], "knn": knn[k], "probe_metric": "accuracy" if kinds[k] else "R²",
        "chance": probes[k][1],
        "best_dim": int(mi[:, k].argmax()), "best_mi": float(mi[:, k].max()), "mig_gap": float(mig_gaps[k]),
        "sap_gap": float(sap_gaps[k]), "completeness": float(per_factor_c[k]),
    } for k, name in enumerate(names)}
    return {
        "mig": float(mig_gaps.mean()), "sap": float(sap_gaps.mean()),
        "dci": {"disentanglement": disentanglement, "completeness": completeness,
                "informativeness": float(np.mean([p[0] for p in probes]))},
        "factorvae": fvae, "betavae": betavae_score(codes, groups, s),
        "per_factor": per_factor,
        "matrices": {"mi": mi.tolist(), "sap": sap.tolist(), "importance": importance.tolist()},
        "factorvae_active_dims": active,
        "settings": {**asdict(s), "discrete": kinds, "rows": len(codes), "train_rows": len(train),
                     "test_rows": len(test)},
    }


# ------------------------------------------------------------------------------ for `vaelab eval` and the report
EVAL_MIN_ROWS = 100  # fewer images than this give no scores in `vaelab eval` (too few rows share a level)


def split_scores(codes, factors, names, seed: int = 0) -> dict | None:
    """factor_scores of a split's codes with the default settings; None for data without factors or with
    fewer than EVAL_MIN_ROWS images."""
    if factors is None or len(factors) < EVAL_MIN_ROWS:
        return None
    return factor_scores(codes, factors, names=names, seed=seed)


def read_label(images, factors: np.ndarray, renderer, levels: np.ndarray) -> np.ndarray:
    """For images (N, C, H, W) in [0, 1] (e.g. reconstructions) of factor rows (N, K) whose first factor is the
    class: the level of that factor whose redraw, every other factor as in the row, is nearest to each image
    (squared error), (N,). The images themselves read back their own level; an image that keeps colour and place
    but not the outline reads as whichever level's outline is closest to its blob."""
    from ..data import to_unit

    x = to_unit(images).double().flatten(1)  # (N, D)
    dist = np.empty((len(x), len(levels)))
    for j, level in enumerate(levels):
        f = np.array(factors, dtype=np.float32, copy=True)
        f[:, 0] = level
        dist[:, j] = (x - to_unit(renderer(f)).double().flatten(1)).square().sum(1).numpy()
    return np.asarray(levels)[dist.argmin(1)]


def kept_count(images, factors: np.ndarray, renderer, levels: np.ndarray) -> int:
    """How many of `images` (N, C, H, W), e.g. reconstructions of the images of factor rows `factors` (N, K), read
    back their own first factor (read_label)."""
    factors = np.asarray(factors)
    return int((read_label(images, factors, renderer, levels) == factors[:, 0]).sum())


def kept_rows(r: dict | None) -> list[tuple[str, str]]:
    """The row of evaluate()'s `label_kept` (none without a renderer of the data)."""
    if r is None:
        return []
    return [(f"{r['factor']} kept in reconstructions",
             f"{r['share']:.1%} of reconstructions are nearest to a redraw of their own {r['factor']} among the "
             f"{r['levels']} (the images themselves: 100%, chance {1 / r['levels']:.1%})")]


def factor_rows(r: dict | None) -> list[tuple[str, str]]:
    """A few (name, value) rows of factor_scores' result for `vaelab eval` and the report; none for None."""
    if r is None:
        return []
    d = r["dci"]
    rows = [("disentanglement (known factors)",
             f"MIG {r['mig']:.3f} · SAP {r['sap']:.3f} · DCI disentanglement {d['disentanglement']:.3f}, "
             f"completeness {d['completeness']:.3f}, informativeness {d['informativeness']:.3f} · "
             f"FactorVAE {r['factorvae']:.1%} · β-VAE {r['betavae']:.1%} (each 0 to 1, higher is better)")]
    for name, p in r["per_factor"].items():
        told = (f"{p['probe']:.1%} of held-out images right by a linear probe, {p['knn']:.1%} by nearest "
                f"neighbours (chance {p['chance']:.1%})" if p["kind"] == "discrete" else
                f"held-out R² {p['probe']:.2f} by a linear probe, {p['knn']:.2f} by nearest neighbours")
        rows.append((f"  {name} from the codes", f"{told}; mostly in z{p['best_dim'] + 1} "
                     f"(MI/H {p['best_mi']:.2f}, gap to the next {p['mig_gap']:.2f})"))
    return rows


def heatmap(r: dict, path):
    """The (codes x factors) matrices of factor_scores' result side by side: I(z; f) / H(f), MIG's, and the
    probes' importance shares, DCI's; one row per code dimension z1..zL."""
    from .plots import _figure, _save

    names = list(r["per_factor"])
    panels = (("mutual information / H(factor) (MIG)", np.asarray(r["matrices"]["mi"])),
              ("share of each factor's probe weight (DCI)", np.asarray(r["matrices"]["importance"])))
    n_dims = panels[0][1].shape[0]
    fig = _figure(2.0 + 1.4 * len(names), 1.6 + 0.32 * n_dims)
    for j, (title, m) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for (row, col), v in np.ndenumerate(m):
            ax.text(col, row, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n_dims), [f"z{d + 1}" for d in range(n_dims)], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"codes x factors: MIG {r['mig']:.3f}, DCI disentanglement {r['dci']['disentanglement']:.3f}")
    fig.tight_layout()
    return _save(fig, path)
