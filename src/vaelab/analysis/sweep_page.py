"""A sweep's comparison: table.md, table.csv, the figures and index.html, from each run's evaluation.

The numbers are `vaelab eval`'s (vaelab.analysis.metrics.evaluate_run): rate R = the average KL(q(z|x) ‖ p(z)),
distortion D = the average −log p(x|z) at z ~ q(z|x), so −ELBO = D + R, all in nats per test image. On the
rate–distortion plane every run is a point; the diagonals D + R = c join runs of equal −ELBO.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..runs import write_text_atomic
from . import plots
from .reporting import figures_html, html_page
from .views import prior_samples

# (header, key, format) of each number of a run, in table order
METRICS = [("−ELBO", "loss", "{:.2f}"), ("rate (KL)", "rate", "{:.2f}"), ("distortion (rec)", "distortion", "{:.2f}"),
           ("IWAE log p(x)", "log_px", "{:.2f}"), ("bits/dim", "bits_per_dim", "{:.3f}"),
           ("active units", "active_units", "{}"), ("MSE", "mse", "{:.5f}"),
           ("sharpness recon", "sharpness_recon", "{:.5f}"), ("sharpness samples", "sharpness_samples", "{:.5f}"),
           ("sample FD (prior)", "sample_fd", "{:.3f}")]
# which run won on which number: (key, lower is better, what the page says)
GOALS = [("loss", True, "lowest −ELBO"), ("log_px", False, "highest IWAE log p(x)"),
         ("distortion", True, "lowest distortion"), ("rate", True, "lowest rate (fewest nats in the code)"),
         ("mse", True, "lowest MSE"), ("active_units", False, "most active units"),
         ("sharpness_samples", False, "sharpest prior samples"),
         ("sample_fd", True, "lowest Fréchet distance of prior samples to test images")]
PLOTTED = [("loss", "−ELBO"), ("rate", "rate (KL)"), ("distortion", "distortion"), ("log_px", "IWAE log p(x)"),
           ("mse", "MSE"), ("active_units", "active units")]

Column = tuple[str, str, str]


def value_text(value: Any) -> str:
    """A setting's value as a run's folder name and the page show it: 0.1, 512-256, learned."""
    if isinstance(value, list | tuple):
        return "-".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).replace("/", "_").replace("\\", "_")
    return f"{number:g}" if math.isfinite(number) else str(value)


def images_text(n_images: int | None, limit: int | None) -> str:
    """Which test images the numbers are over: "the first 500 test images" (a limit) or "all 10000 test images"."""
    count = f"{n_images} " if n_images is not None else (f"{limit} " if limit is not None else "")
    return f"the first {count}test images" if limit is not None else f"all {count}test images"


def cell(row: dict, key: str, spec: str, missing: str = "n/a") -> str:
    value = row.get(key)
    return missing if value is None else spec.format(value)


def markdown_table(rows: list[dict], columns: list[Column], cell_of: Callable[[dict, str, str], str] = cell) -> str:
    head = "| " + " | ".join(c for c, _, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell_of(r, k, s) for _, k, s in columns) + " |\n" for r in rows)


def csv_table(rows: list[dict], columns: list[Column]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for _, k, _ in columns])
    for r in rows:
        w.writerow(["" if r.get(k) is None else r[k] for _, k, _ in columns])
    return buf.getvalue()


def html_table(rows: list[dict], columns: list[Column], cell_of: Callable[[dict, str, str], str] = cell) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c, _, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell_of(r, k, s))}</td>" for _, k, s in columns) + "</tr>\n"
                   for r in rows)
    return f'<table id="table"><tr>{head}</tr>\n{body}</table>'


def columns_for(fields: list[str], rows: list[dict]) -> list[Column]:
    swept = [(f, f, "{}") for f in fields]
    shown = [c for c in METRICS if c[1] != "sample_fd" or any(r.get("sample_fd") is not None for r in rows)]
    return [("run", "run", "{}"), *swept, *shown]


def finite_runs(rows: list[dict]) -> list[dict]:
    """The runs drawn and ranked: those that trained and whose −ELBO, rate and distortion are finite (a run can
    end with an infinite loss without stopping, e.g. a tiny σ after a few steps; the table still lists it)."""
    return [r for r in rows if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                                   for k in ("loss", "rate", "distortion"))]


def winners(rows: list[dict]) -> list[str]:
    """One sentence per number: the run(s) that did best on it, with the value."""
    done = finite_runs(rows)
    out = []
    for key, lower, what in GOALS:
        values = [r[key] for r in done if r.get(key) is not None]
        if not values:
            continue
        best = min(values) if lower else max(values)
        names = [r["run"] for r in done if r.get(key) == best]
        spec = next(s for _, k, s in METRICS if k == key)
        who = "every run" if len(names) == len(done) > 1 else " and ".join(names)
        out.append(f"{what}: {who} ({spec.format(best)})")
    return out


def _numeric(values: list[Any]) -> list[float] | None:
    try:
        xs = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return xs if all(math.isfinite(x) for x in xs) else None


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None, bool]:
    """x positions of a setting's values: the numbers themselves (log scale when they span 10x or more) or, for
    words (learned, conv), evenly spaced with the words as tick labels."""
    xs = _numeric(values)
    if xs is not None:
        return xs, None, min(xs) > 0 and max(xs) >= 10 * min(xs)
    order = list(dict.fromkeys(value_text(v) for v in values))
    return [float(order.index(value_text(v))) for v in values], order, False


def _traces(rows: list[dict], field: str, fields: list[str]) -> list[tuple[str, list[dict]]]:
    """The runs grouped by the other swept settings, each group in the order of `field`'s values: the curve
    `field` traces with everything else held."""
    others = [f for f in fields if f != field]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(",".join(f"{f}={value_text(r[f])}" for f in others), []).append(r)
    return [(name, g) for name, g in groups.items() if len(g) > 1]


def _nothing_to_draw(path: Path) -> Path:
    fig = plots._figure(8, 2)
    fig.text(0.5, 0.5, "no run has a finite −ELBO, rate and distortion to draw", ha="center", va="center")
    return plots._save(fig, path)


def rate_distortion(rows: list[dict], fields: list[str], path: Path) -> Path:
    """Each run a labelled point at (rate, distortion), the curve each swept setting traces, and the diagonals
    of equal −ELBO = D + R."""
    done = finite_runs(rows)
    if not done:
        return _nothing_to_draw(path)
    fig = plots._figure(8, 6.5)
    ax = fig.add_subplot(111)
    rate, dist = np.array([r["rate"] for r in done]), np.array([r["distortion"] for r in done])
    pad_r, pad_d = max(np.ptp(rate) * 0.15, 1.0), max(np.ptp(dist) * 0.15, 1.0)
    xlim, ylim = (rate.min() - pad_r, rate.max() + pad_r), (dist.min() - pad_d, dist.max() + pad_d)
    losses = rate + dist
    levels = np.linspace(losses.min(), losses.max(), 5) if np.ptp(losses) > 0 else losses[:1]
    xs = np.array(xlim)
    for i, c in enumerate(levels):
        ax.plot(xs, c - xs, color="0.75", ls="--", lw=1, zorder=0, label="equal −ELBO (D + R = c)" if i == 0 else None)
        ax.annotate(f"{c:.1f}", (xs[0], c - xs[0]), fontsize=7, color="0.5", xytext=(2, 2), textcoords="offset points")
    for j, field in enumerate(fields):
        for k, (_, group) in enumerate(_traces(done, field, fields)):
            order = sorted(group, key=lambda r: _positions([g[field] for g in group])[0][group.index(r)])
            ax.plot([r["rate"] for r in order], [r["distortion"] for r in order], color=f"C{j}", lw=1.5,
                    alpha=0.8, label=f"along {field}" if k == 0 else None)
    ax.scatter(rate, dist, color="k", s=18, zorder=3)
    for r in done:
        ax.annotate(r["run"], (r["rate"], r["distortion"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("rate R = KL(q(z|x) ‖ p(z))  (nats/image)")
    ax.set_ylabel("distortion D = −log p(x|z)  (nats/image)")
    ax.set_title("the rate–distortion plane (test split); lower left is better")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.2)
    return plots._save(fig, path)


def against_field(rows: list[dict], field: str, fields: list[str], path: Path) -> Path:
    """Each number against the values of one swept setting, one line per combination of the others."""
    done = finite_runs(rows)
    if not done:
        return _nothing_to_draw(path)
    traces = _traces(done, field, fields) or [("", done)]
    fig = plots._figure(12, 6.5)
    for i, (key, name) in enumerate(PLOTTED):
        ax = fig.add_subplot(2, 3, i + 1)
        for label, group in traces:
            xs, ticks, log = _positions([r[field] for r in group])
            pairs = sorted(zip(xs, [r[key] for r in group], strict=True))
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", ms=4, label=label or None)
        xs, ticks, log = _positions([r[field] for r in done])
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(field)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0 and any(label for label, _ in traces):
            ax.legend(fontsize=7)
    fig.suptitle(f"the test numbers against {field}")
    fig.tight_layout()
    return plots._save(fig, path)


def write_page(out: Path, rows: list[dict], fields: list[str], models: list[tuple[str, Any]], title: str,
               notes: str, eval_limit: int | None = None) -> Path:
    """table.md, table.csv, the figures and index.html (figures embedded) in `out`; the path of index.html.
    `rows` are the runs' lines (run, the swept settings by flag name, the numbers of METRICS, or `error`),
    `models` (run, VAE) the trained ones, for their prior samples; `notes` closes the page (escaped here);
    `eval_limit`: the runs were evaluated on the first N test images (None: all)."""
    columns = columns_for(fields, rows)
    write_text_atomic(out / "table.md", markdown_table(rows, columns))
    write_text_atomic(out / "table.csv", csv_table(rows, columns))
    figures = [("The rate–distortion plane", rate_distortion(rows, fields, out / "rate_distortion.png"))]
    figures += [(f"The numbers against {f}", against_field(rows, f, fields, out / f"vs_{f}.png")) for f in fields]
    strip = [(label, prior_samples(model, 10)) for label, model in models]  # the same z for one latent size
    figures.append(("Prior samples f(z), z ~ p(z), one row per run",
                    plots.image_rows(strip, out / "samples.png", "prior samples, one row per run")))
    esc = html.escape
    best = "".join(f"<li>{esc(s)}</li>\n" for s in winners(rows))
    failed = "".join(f"<li>{esc(r['run'])}: {esc(str(r['error']))}</li>\n" for r in rows if r.get("error"))
    iw = next((r["iw_samples"] for r in rows if r.get("iw_samples")), None)
    images = images_text(next((r["n_images"] for r in rows if r.get("n_images")), None), eval_limit)
    body = f"""<h2>Which setting won</h2>
<ul id="winners">
{best}</ul>
{f'<h2>Failed runs</h2><ul id="failed">{failed}</ul>' if failed else ''}
<h2>Table</h2>
<p id="method">Test split, {images}, nats per image; −ELBO = distortion + rate; IWAE log p(x) with K = {iw}
(each run's eval.json holds every number of <code>vaelab eval</code>).</p>
{html_table(rows, columns)}
<h2>Figures</h2>
{figures_html(figures)}
<h2>Settings every run shares</h2>
<p id="shared">{esc(notes)}</p>"""
    path = out / "index.html"
    write_text_atomic(path, html_page(title, body))
    return path
