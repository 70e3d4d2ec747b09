"""The report: every figure of a run as PNG, and one self-contained report.html that embeds them
(base64 data URIs) with the evaluation numbers and the run's config.

Models turn into arrays in views.py, arrays into figures in plots.py; this module only wires them together.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..runs import Run, write_text_atomic
from . import aggregate, factors, plots, views
from .metrics import (
    DEFAULT_IW_SAMPLES,
    active_units,
    elbo_metrics,
    evaluate_run,
    prior_radii,
    split_data,
    table_rows,
)

N_SHOW = 10  # images per row of the image figures
N_CODES = 2000  # test images encoded for the scatter and the principal plane


@dataclass
class Material:
    """What the figures are drawn from: a run, a slice of its test split in [0, 1], labels, latent plane."""

    run: Run
    x: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: np.ndarray | None
    classes: list[str] | None
    numbers: dict | None = None  # the output of evaluate_run, when computed
    factors: np.ndarray | None = None  # (N, F) named factors of variation of the images, if the data has them
    factor_names: list[str] | None = None
    plane: tuple = field(init=False)

    def __post_init__(self):
        self.plane = views.latent_plane(self.run.model, self.x)  # codes (N, L), centre (L,), axes (2, L)

    @classmethod
    def of(cls, run: Run, n: int = N_CODES, numbers: dict | None = None) -> Material:
        device = next(run.model.parameters()).device
        s = split_data(run.config, "test", device, n)
        labels = None if s.labels is None else np.asarray(s.labels)
        return cls(run, s.prepare(s.x), labels, s.classes, numbers, s.factors, s.factor_names)

    @property
    def model(self):
        return self.run.model

    @property
    def axis_names(self) -> tuple[str, str]:
        if self.model.latent_dim == 2:
            return ("z₁", "z₂")
        return ("principal axis 1 of the posterior means", "principal axis 2")

    def kl_and_variance(self) -> tuple[list[float] | None, list[float]]:
        if self.numbers is not None:
            return self.numbers["kl_per_dim"], self.numbers["posterior_mean_variance"]
        m = elbo_metrics(self.model, self.x, 500, lambda t: t)
        return m["kl_per_dim"], active_units(torch.from_numpy(self.plane[0]))[1]


def _manifold(m: Material, path: Path) -> Path:
    codes, centre, axes = m.plane
    spread = (1.0, 1.0) if m.model.latent_dim == 2 else tuple(((codes - centre) @ axes.T).std(0))
    images, c1, c2 = views.manifold_grid(m.model, 20, centre, axes, spread)
    title = "decoder mean f(z) on a grid at Gaussian quantiles"
    if m.model.latent_dim > 2:
        title += " (quantiles x the codes' spread, other dims at their mean)"
    return plots.manifold(images, c1, c2, path, title, m.axis_names)


def _scatter(m: Material, path: Path) -> Path:
    codes, _, axes = m.plane
    dim = codes.shape[1]  # a hierarchical model's codes are its top group's
    radii = prior_radii(dim)  # {"68": r, ...}: the radii of `vaelab eval`'s radius shares
    circles = [(r, f"{p} %: r={r:.2f}") for p, r in radii.items()]
    title = (f"posterior means of the test images; circles hold 68 / 95 / 99.7 % of N(0, I) in {dim}-D"
             if dim == 2 else
             f"posterior means of the test images, projected; circles: the radii that hold\n68 / 95 / 99.7 % of "
             f"N(0, I) in {dim}-D (outside a circle here is outside it in {dim}-D; inside may not be)")
    return plots.latent_scatter(views.plane_coords(codes, axes), m.labels, path, m.classes, circles,
                                axis_names=m.axis_names, title=title)


def _factors(m: Material, path: Path) -> Path:
    if m.factors is None or m.factor_names is None:
        raise ConfigError(f"the dataset of {m.run.path} has no named factors of variation (shapes and dsprites "
                          "have them); `--only scatter` colours the codes by class label")
    codes, _, axes = m.plane
    named = {"shape": m.classes} if m.classes and "shape" in m.factor_names else None
    return plots.factor_scatter(views.plane_coords(codes, axes), np.asarray(m.factors), m.factor_names, path,
                                axis_names=m.axis_names, level_names=named)


def _scores_of(m: Material) -> dict:
    scores = (m.numbers or {}).get("factor_scores")
    if scores is None:  # `vaelab plot`: no evaluation at hand, so score the material's codes
        if m.factors is None or len(m.factors) < factors.EVAL_MIN_ROWS:
            raise ConfigError(f"the factor scores of {m.run.path} need data with named factors of variation "
                              f"(shapes, dsprites) and at least {factors.EVAL_MIN_ROWS} test images")
        scores = factors.factor_scores(m.plane[0], m.factors, names=m.factor_names)
    return scores


def _factor_scores(m: Material, path: Path) -> Path:
    return factors.heatmap(_scores_of(m), path)


def _factor_traversals(m: Material, path: Path) -> Path:
    """One row per factor: the code dimension with the most mutual information with it (MIG's matrix, the
    factor's `best_dim`) traversed, labelled "shape (z3)"."""
    per_factor = _scores_of(m)["per_factor"]
    dims = [p["best_dim"] for p in per_factor.values()]
    rows = [(f"{name} (z{d + 1})", images)
            for name, d, (_, images) in zip(per_factor, dims, views.traversals(m.model, dims), strict=True)]
    return plots.image_rows(rows, path, "per factor: the code dimension that shares most information with it "
                            "(MI / H), at Gaussian quantiles, the others at 0")


def _reconstructions(m: Material, path: Path) -> Path:
    return plots.image_rows(views.reconstructions(m.model, m.x[:N_SHOW]), path,
                            "reconstructions: input | f(z) at the posterior mean | f(z) at z ~ q(z|x)")


def _stochastic(m: Material, path: Path) -> Path:
    params = views.posterior_mean_params(m.model, m.x[:N_SHOW])  # at each image's posterior mean
    lik = m.model.likelihood
    what = "f(z) + σ·ε" if lik.additive_gaussian_noise else "draws"
    with torch.no_grad():
        sigma = lik.scale([p[:1] for p in params])
    extra = f", σ = {sigma.mean().item():.3g}" if sigma is not None else ""
    return plots.image_rows(views.stochastic_rows(m.model, params), path,
                            f"where the randomness is: same z, f(z) vs draws x ~ p(x|z) ({what}{extra})")


def _samples(m: Material, path: Path) -> Path:
    return plots.image_grid(views.prior_samples(m.model, 64), path, 8,
                            f"prior samples: f(z), z ~ p(z) = {m.model.prior.describe()}")


def _prior_vs_aggregate(m: Material, path: Path) -> Path:
    grid = np.arange(8)
    fitted = ("f(z): z_top ~ mixture fitted to the training codes,\nthe lower groups ~ their priors"
              if hasattr(m.model, "decode_keeping") else "f(z), z ~ mixture fitted to the training codes")
    panels = [(title, aggregate.sample_images(m.run, 64, source), grid, grid) for source, title in
              (("prior", "f(z), z ~ p(z)"), ("aggregate", fitted))]
    return plots.manifold_panels(panels, path)


def _interpolations(m: Material, path: Path) -> Path:
    k = min(6, len(m.x) // 2)
    return plots.image_rows(views.interpolations(m.model, m.x[:k], m.x[k:2 * k]), path,
                            "interpolations: x_a | f(z) on the line between posterior means | x_b")


def _traversals(m: Material, path: Path) -> Path:
    kl, var = m.kl_and_variance()
    # the (up to) ten dimensions that carry the most KL (a learned prior: whose posterior means vary the most)
    dims = sorted(np.argsort(var if kl is None else kl)[::-1][:10].tolist())
    return plots.image_rows(views.traversals(m.model, dims), path,
                            "traversals: one z_d at Gaussian quantiles, the others at 0")


def _curves(m: Material, path: Path) -> Path:
    return plots.training_curves(m.run.metrics, path)


def _kl(m: Material, path: Path) -> Path:
    if hasattr(m.model, "per_group"):  # a hierarchical model: thousands of units, so a bar per group
        return _kl_groups(m, path)
    kl, var = m.kl_and_variance()
    if kl is None:
        raise ConfigError(f"the prior of {m.run.path} ({m.model.prior.describe()}) has no KL per latent dimension: "
                          "its KL is estimated per image")
    return plots.kl_per_dim(kl, path, var)


FIGURES = {  # name -> (caption, drawing function); the PNG is written as <name>.png
    "manifold": ("Latent manifold", _manifold),
    "scatter": ("Latent scatter of test codes", _scatter),
    "reconstructions": ("Reconstructions", _reconstructions),
    "stochastic": ("Where the stochastic bit is", _stochastic),
    "samples": ("Prior samples", _samples),
    "aggregate": ("Prior samples | aggregate-posterior samples (docs/samples.md)", _prior_vs_aggregate),
    "interpolations": ("Interpolations", _interpolations),
    "traversals": ("Per-dimension traversals", _traversals),
    "curves": ("Training curves", _curves),
    "kl": ("KL per latent dimension", _kl),
}


# ------------------------------------------------------------------------------ a hierarchical model's figures
def _kl_groups(m: Material, path: Path) -> Path:
    kl = (m.numbers or {}).get("kl_per_group") or elbo_metrics(m.model, m.x, 500, lambda t: t)["kl_per_group"]
    names = m.model.group_names()
    return plots.kl_per_dim(kl, path, title=f"KL per latent group, top first: {', '.join(names)} (total "
                            f"{sum(kl):.2f} nats)", xlabel="latent group (1 = top)")


def _levels(m: Material, path: Path) -> Path:
    rows = views.temperature_rows(m.model, N_SHOW) + views.level_rows(m.model, m.x[:N_SHOW])
    return plots.image_rows(rows, path, "prior samples at temperature T (every group's noise x T);\nthen the top "
                            "groups at their posterior means given the input, the rest drawn from the prior")


def _keeping(m: Material, path: Path) -> Path:
    return plots.image_rows(views.level_rows(m.model, m.x[:N_SHOW], temperature=0.0), path,
                            "the top groups at their posterior means given the input,\nthe rest at their prior "
                            "means (what eval's mse_keeping measures)")


HIERARCHY_FIGURES = {  # drawn for --arch hierarchical
    "levels": ("What each level holds: samples at temperatures, and the top groups kept from q(z|x)", _levels),
    "keeping": ("What the top groups hold alone: the rest at their prior means", _keeping),
}


FACTOR_FIGURES = {  # drawn for data with named factors of variation (shapes, dsprites)
    "factors": ("Latent scatter coloured by each factor of variation", _factors),
    "factor_scores": ("Codes x factors: mutual information (MIG) and probe weights (DCI)", _factor_scores),
    "factor_traversals": ("Traversals by factor: the code dimension most informative about each factor",
                          _factor_traversals),
}
ALL_FIGURES = {**FIGURES, **FACTOR_FIGURES, **HIERARCHY_FIGURES}


def figures_for(material: Material) -> list[str]:
    """FIGURES and FACTOR_FIGURES as _figures_for chooses them, and HIERARCHY_FIGURES for a hierarchical model."""
    names = _figures_for(material)
    return [*names, *HIERARCHY_FIGURES] if hasattr(material.model, "decode_keeping") else names


def _figures_for(material: Material) -> list[str]:
    """The figures of this material's report: FIGURES (the KL per dimension where the prior has one), and
    FACTOR_FIGURES where the data has factors."""
    base = [name for name in FIGURES if name != "kl" or material.model.prior.closed_form_kl]
    if material.factors is None:
        return base
    few = len(material.factors) < factors.EVAL_MIN_ROWS  # too few images to score: no scores, no heat map
    scored = ("factor_scores", "factor_traversals")
    return [*base, *(name for name in FACTOR_FIGURES if not (few and name in scored))]


def check_figure(name: str) -> None:
    if name not in ALL_FIGURES:
        raise ConfigError(f"--only must be one of {', '.join(ALL_FIGURES)}; got {name!r}")


def draw(material: Material, name: str, out_dir: Path) -> Path:
    check_figure(name)
    if name in HIERARCHY_FIGURES and not hasattr(material.model, "decode_keeping"):
        raise ConfigError(f"--only {name} shows the latent groups of an --arch hierarchical model; "
                          f"{material.run.path} has --arch {material.run.config.model.arch}")
    with torch.random.fork_rng(devices=_cuda_devices(material.run)):
        torch.manual_seed(0)  # the sampled figures are reproducible, and the caller's RNG stream is untouched
        return ALL_FIGURES[name][1](material, Path(out_dir) / f"{name}.png")


def _cuda_devices(run: Run) -> list[int]:
    device = next(run.model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


def figures_html(figures: list[tuple[str, Path]]) -> str:
    """<figure> elements with each PNG embedded as a data URI, so the page stands alone."""
    esc = html.escape
    return "\n".join(
        f'<figure id="{esc(p.stem)}"><img alt="{esc(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(caption)}</figcaption></figure>'
        for caption, p in figures)


def html_page(title: str, body: str) -> str:
    """A standalone HTML page with vaelab's style; `body` is already-escaped HTML."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 2px 12px; border-bottom: 1px solid #ddd; font-size: 14px; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def render_html(title: str, numbers: list[tuple[str, str]], config: dict,
                figures: list[tuple[str, Path]]) -> str:
    """One HTML page; each figure's PNG is embedded as a data URI, so the file stands alone."""
    esc = html.escape
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in numbers)
    conf = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in config.items())
    return html_page(title, f"""<h2>Numbers</h2>
<table id="numbers">
{rows}
</table>
<h2>Figures</h2>
{figures_html(figures)}
<h2>Config</h2>
<table id="config">
{conf}
</table>""")


def write_report(run: Run, out_dir: str | Path | None = None, iw_samples: int = DEFAULT_IW_SAMPLES,
                 batch_size: int = 500,
                 limit: int | None = None, progress: bool = False, sample_quality: bool = False,
                 temperatures: Sequence[float] = (1.0,)) -> Path:
    """Evaluate the run's test split, draw every figure into `out_dir` (default: the run folder), write
    eval.json and report.html there; return the path of report.html. `sample_quality` adds the sample-quality
    scores (vaelab.analysis.quality) to the numbers, prior samples at each of `temperatures`."""
    numbers = evaluate_run(run, "test", iw_samples, batch_size, limit, progress=progress,
                           sample_quality=sample_quality, temperatures=temperatures)
    out = Path(out_dir) if out_dir is not None else Path(run.path)
    out.mkdir(parents=True, exist_ok=True)
    material = Material.of(run, min(N_CODES, limit or N_CODES), numbers)
    figures = [(ALL_FIGURES[name][0], draw(material, name, out)) for name in figures_for(material)]
    write_text_atomic(out / "eval.json", json.dumps(numbers, indent=2) + "\n")
    title = (f"vaelab report: {run.path.name} ({run.model.likelihood.describe()}, "
             f"latent {run.config.model.latent_dim})")
    path = out / "report.html"
    write_text_atomic(path, render_html(title, table_rows(numbers), run.config.settings(), figures))
    return path
