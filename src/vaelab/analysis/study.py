"""The σ study: a sweep over σ (same data, seed, network and budget), measured and compared.

Each setting is a normal run directory under the study folder (`sigma-0.1`, `sigma-learned`, ...), so
`vaelab eval`, `report` and `info` accept them. The runs are trained, reused or resumed and evaluated as
`vaelab sweep` does it (vaelab.analysis.sweep), so a study can be extended without retraining; the study adds
its own table, figures and claims about σ.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import ConfigError, TrainingError
from ..runs import Run, load_run, write_text_atomic
from . import plots
from .metrics import DEFAULT_IW_SAMPLES, PRIOR_MASS, split_data
from .reporting import figures_html, html_page
from .sweep import Point, check_eval_settings, train_shared
from .sweep_page import csv_table as _csv_table
from .sweep_page import html_table, images_text
from .sweep_page import markdown_table as _markdown_table
from .views import manifold_grid, prior_samples, reconstructions

SPECIAL = ("learned", "optimal")
# the train settings a study takes (as flags of `vaelab sigma-study`, declared once in vaelab.config) and the
# defaults that differ from train's; every other train setting keeps train's default
TRAIN_SETTINGS = ("dataset", "limit", "arch", "hidden", "blocks", "latent_dim", "optimizer", "lr", "batch_size",
                  "epochs", "seed", "device")
TRAIN_DEFAULTS = {"latent_dim": 2}
SGD_LR = 1e-4  # plain SGD needs a smaller step than Adam's default at the small σ of the sweep


@dataclass(frozen=True, init=False)
class StudyConfig:
    """The σ study: the settings every run shares (`train`, a TrainConfig with a Gaussian likelihood) and the
    study's own. Built from flat settings: StudyConfig(dataset="fashion-mnist", sigmas=[0.1, 1.0], epochs=3)."""

    train: TrainConfig
    sigmas: list[float]
    also: list[str]
    out: str
    iw_samples: int
    mse_threshold: float | None  # default: the worst final test MSE of the sweep
    eval_limit: int | None  # evaluate each run on the first N test images (None: all), as `vaelab eval --limit`

    def __init__(self, sigmas: list[float] | None = None, also: list[str] | None = None, out: str = "runs/sigma",
                 iw_samples: int = DEFAULT_IW_SAMPLES, mse_threshold: float | None = None,
                 eval_limit: int | None = None, **settings):
        sigmas = [0.03, 0.1, 0.3, 1.0] if sigmas is None else list(sigmas)
        also = [] if also is None else list(also)
        if not sigmas and not also:
            raise ConfigError("--sigmas must list at least one σ > 0 (or give --also learned,optimal)")
        for s in sigmas:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise ConfigError(f"--sigmas must be numbers > 0 separated by commas; got {s!r}")
        bad = [a for a in also if a not in SPECIAL]
        if bad:
            raise ConfigError(f"--also must be a comma-separated subset of {', '.join(SPECIAL)}; got {bad[0]!r}")
        if mse_threshold is not None and not mse_threshold > 0:
            raise ConfigError(f"--mse-threshold must be > 0; got {mse_threshold!r}")
        check_eval_settings(iw_samples, eval_limit)
        unknown = sorted(set(settings) - set(TRAIN_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown sigma-study settings {unknown}; allowed: {sorted(TRAIN_SETTINGS)}")
        given = {**TRAIN_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
        if given.get("optimizer") == "sgd" and "lr" not in given:
            given["lr"] = SGD_LR
        train = TrainConfig(likelihood="gaussian", **given)
        for name, value in (("train", train), ("sigmas", sigmas), ("also", also), ("out", str(out)),
                            ("iw_samples", iw_samples), ("mse_threshold", mse_threshold),
                            ("eval_limit", eval_limit)):
            object.__setattr__(self, name, value)
        self.settings()  # validates the TrainConfig of every setting up front

    def settings(self) -> list[tuple[str, TrainConfig]]:
        labels = [_fmt(s) for s in sorted(set(self.sigmas))] + list(dict.fromkeys(self.also))
        return [(label, self.train.replace(sigma=label, out=str(Path(self.out) / f"sigma-{label}")))
                for label in labels]

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "sigmas": self.sigmas, "also": self.also, "out": self.out,
                "iw_samples": self.iw_samples, "mse_threshold": self.mse_threshold, "eval_limit": self.eval_limit}


def _fmt(s: float) -> str:
    return f"{s:g}"


def parse_list(text: str, flag: str, kind=float) -> list:
    try:
        return [kind(p) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag} must be a comma-separated list such as 0.03,0.1,0.3,1.0; got {text!r}") from e


def epoch_to_reach(mse_by_epoch: list[float], threshold: float) -> float | None:
    """The (linearly interpolated) epoch at which test MSE first reaches `threshold`; None if never.

    Before epoch 1 nothing is measured, so a run already below the threshold after epoch 1 reports 1.0.
    """
    for i, m in enumerate(mse_by_epoch):
        if m <= threshold:
            if i == 0:
                return 1.0
            prev = mse_by_epoch[i - 1]
            return i + (prev - threshold) / (prev - m)  # epochs are 1-based: i is epoch i+1's index
    return None


def study_row(label: str, run: Run, numbers: dict) -> dict:
    tests = [r for r in run.metrics if r["split"] == "test"]
    return {
        "setting": label, "fixed": label not in SPECIAL, "sigma": numbers["sigma"],
        "neg_elbo": -numbers["elbo"], "rec": numbers["rec"],
        "kl": numbers["kl"], "mse": numbers["mse"], "active_units": numbers["active_units"],
        "sharpness_recon": numbers["sharpness"]["recon"], "sharpness_samples": numbers["sharpness"]["samples"],
        "sharpness_data": numbers["sharpness"]["data"],
        # the share of codes within the radius that holds 99.7 % of the prior (3.41 for a 2-D latent)
        "within_997": numbers["radius_share"]["99.7"], "radius_997": numbers["radius_quantiles"]["99.7"],
        "n_images": numbers["n_images"],
        "mse_epoch1": tests[0]["mse"] if tests else None, "mse_curve": [r["mse"] for r in tests],
        "kl_curve": [r["kl"] for r in tests],
    }


COLUMNS = [("setting", "setting", "{}"), ("σ (final)", "sigma", "{:.4g}"),
           ("test −ELBO", "neg_elbo", "{:.2f}"),
           ("rec", "rec", "{:.2f}"), ("KL", "kl", "{:.2f}"), ("MSE", "mse", "{:.5f}"),
           ("active units", "active_units", "{}"), ("sharpness recon", "sharpness_recon", "{:.5f}"),
           ("sharpness samples", "sharpness_samples", "{:.5f}"), ("sharpness data", "sharpness_data", "{:.5f}"),
           ("codes within r99.7", "within_997", "{:.1%}"), ("MSE after epoch 1", "mse_epoch1", "{:.5f}"),
           ("epoch to MSE threshold", "epoch_to_threshold", "{:.2f}")]


def _cell(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    return "never" if v is None and key == "epoch_to_threshold" else ("n/a" if v is None else spec.format(v))


def markdown_table(rows: list[dict]) -> str:
    return _markdown_table(rows, COLUMNS, _cell)


def csv_table(rows: list[dict]) -> str:
    return _csv_table(rows, COLUMNS)


def _trend(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation of ys against xs (-1: falls as x grows, +1: rises)."""
    if len(xs) < 2:
        return 0.0
    rx, ry = np.argsort(np.argsort(xs)), np.argsort(np.argsort(ys))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _verdict(rho: float, expected_sign: int) -> str:
    if rho * expected_sign >= 0.99:
        return "held"
    if rho * expected_sign > 0:
        return "partly held"
    return "did not hold"


def summarize(rows: list[dict], threshold: float, optimizer: str) -> list[str]:
    """Plain sentences on what this run measured, each with the numbers behind it."""
    fixed = sorted((r for r in rows if r["setting"] not in SPECIAL), key=lambda r: r["sigma"])
    s = [r["sigma"] for r in fixed]
    out = []

    def series(key, spec):
        return ", ".join(f"{spec.format(r[key])} at σ={_fmt(r['sigma'])}" for r in fixed)

    if len(fixed) >= 2:
        rho = _trend(s, [r["sharpness_recon"] for r in fixed])
        rho_s = _trend(s, [r["sharpness_samples"] for r in fixed])
        out.append(f"Larger σ gives blurrier outputs: {_verdict(rho, -1)} for reconstructions "
                   f"(sharpness {series('sharpness_recon', '{:.5f}')}; data {fixed[0]['sharpness_data']:.5f}) "
                   f"and {_verdict(rho_s, -1)} for prior samples ({series('sharpness_samples', '{:.5f}')}).")
        rho = _trend(s, [r["kl"] for r in fixed])
        out.append(f"Larger σ puts fewer nats in the code (the posterior moves toward the prior): "
                   f"{_verdict(rho, -1)} (KL {series('kl', '{:.2f}')}).")
        speed = [r["epoch_to_threshold"] if r["epoch_to_threshold"] is not None else math.inf for r in fixed]
        rho = _trend(s, [-v for v in speed])  # faster learning = fewer epochs
        first = series("mse_epoch1", "{:.5f}")
        reached = ", ".join(("never" if v == math.inf else f"{v:.2f}") + f" at σ={_fmt(x)}"
                            for v, x in zip(speed, s, strict=True))
        note = (" With Adam, the update size does not scale with the gradient, so the 1/σ² factor in the loss "
                "cannot by itself slow learning." if optimizer == "adam" else
                " With plain SGD the gradient of the reconstruction term scales as 1/σ², so the step size is "
                "effectively multiplied by 1/σ².")
        out.append(f"Smaller σ learns more slowly ({optimizer}): {_verdict(rho, 1)}. Test MSE after epoch 1: "
                   f"{first}; epochs to reach MSE {threshold:.5f}: {reached}.{note}")
        best = min(rows, key=lambda r: r["neg_elbo"])
        out.append(f"The best −ELBO ({best['neg_elbo']:.2f} nats) came from setting {best['setting']} "
                   f"(σ={best['sigma']:.4g}, √MSE={math.sqrt(best['mse']):.4g}): the ELBO prefers σ near the "
                   "reconstruction error, as the calibrated-decoder argument predicts; a fixed σ far below √MSE "
                   "pays ‖x−f(z)‖²/2σ² for every inexact reconstruction.")
    out.append(_where_codes_lie(rows))
    for r in rows:
        if r["setting"] in SPECIAL:
            out.append(f"σ {r['setting']} ended at {r['sigma']:.4g} (√MSE = {math.sqrt(r['mse']):.4g}), "
                       f"test −ELBO {r['neg_elbo']:.2f} nats.")
    return out


def _where_codes_lie(rows: list[dict]) -> str:
    """Whether the codes stay where the prior puts its mass: at least as many within the radius that holds 99.7 %
    of N(0, I) as for draws from the prior, up to two standard errors of a share of that many draws."""
    p = PRIOR_MASS["99.7"]
    ok = all(r["within_997"] >= p - 2 * math.sqrt(p * (1 - p) / r["n_images"]) for r in rows)
    shares = ", ".join(f"{r['within_997']:.1%} ({r['setting']})" for r in rows)
    return (f"Codes lie where the prior puts its mass: {'held' if ok else 'did not hold everywhere'} (share of test "
            f"posterior means within r = {rows[0]['radius_997']:.2f}, the radius that holds 99.7 % of N(0, I): "
            f"{shares}; codes spread like the prior give 99.7 %).")


def sigma_study(cfg: StudyConfig, progress: bool = True) -> Path:
    """Train (or reuse) every setting, evaluate, and write table.md, table.csv, figures and index.html."""

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # a setting whose loss becomes non-finite (plain SGD at a small σ) is a finding, not a crash; under torchrun
    # each process trains and evaluates its share of the settings, as `vaelab sweep` does
    points = [Point(label, {"sigma": label}, tc) for label, tc in cfg.settings()]
    main, lines, held = train_shared(points, out, cfg.iw_samples, "sigma-study", progress=progress,
                                     eval_limit=cfg.eval_limit)
    failed = [(line["run"], line["error"] or "") for line in lines if line["eval"] is None]
    if len(failed) == len(lines):
        raise TrainingError("every setting of the σ study failed: " + "; ".join(f"{k}: {m}" for k, m in failed))
    if not main:
        return out / "index.html"
    done = [line for line in lines if line["eval"] is not None]
    # the runs another process trained are read from their folders
    runs: list[Run] = [held.get(line["index"]) or load_run(points[line["index"]].config.runtime.out)
                       for line in done]
    rows = [study_row(line["run"], run, line["eval"]["numbers"]) for line, run in zip(done, runs, strict=True)]
    threshold = cfg.mse_threshold or max(r["mse_curve"][-1] for r in rows)
    for r in rows:
        r["epoch_to_threshold"] = epoch_to_reach(r["mse_curve"], threshold)

    device = next(runs[0].model.parameters()).device
    split = split_data(runs[0].config, "test", device, limit=10)
    x = split.prepare(split.x)
    image_rows, panels = [("data", x.cpu().numpy())], []
    for label, run in zip([r["setting"] for r in rows], runs, strict=True):
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(0)
            recon = reconstructions(run.model, x, n_samples=0)[1][1]
        image_rows += [(f"σ={label} recon", recon), (f"σ={label} samples", prior_samples(run.model, 10))]
        if run.model.latent_dim == 2:
            panels.append((f"σ = {label}", *manifold_grid(run.model, 12)))
    figures = [("Reconstructions f(mean z) and prior samples, one pair of rows per σ",
                plots.image_rows(image_rows, out / "recon_samples.png"))]
    if panels:
        figures.append(("The 2-D manifold per σ (decoder means on a Gaussian-quantile grid)",
                        plots.manifold_panels(panels, out / "manifolds.png")))
    figures.append(("Test MSE and KL against epoch", plots.study_curves(
        {r["setting"]: {"mse": r["mse_curve"], "kl": r["kl_curve"]} for r in rows}, threshold,
        out / "curves.png")))
    figures.append(("KL and sharpness against σ", plots.against_sigma(rows, out / "vs_sigma.png")))

    table_rows_ = [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in rows]
    md = markdown_table(table_rows_)
    write_text_atomic(out / "table.md", md)
    write_text_atomic(out / "table.csv", csv_table(table_rows_))
    summary = summarize(rows, threshold, cfg.train.optim.optimizer)
    summary += [f"σ={label} did not finish training with {cfg.train.optim.optimizer} lr {cfg.train.lr:g}: {msg}"
                for label, msg in failed]
    write_text_atomic(out / "summary.md", "".join(f"- {s}\n" for s in summary))
    write_text_atomic(out / "study.json", json.dumps({"config": cfg.to_dict(), "threshold": threshold,
                                                       "rows": rows, "summary": summary}, indent=2) + "\n")
    write_text_atomic(out / "index.html", study_html(cfg, table_rows_, summary, threshold, figures))
    return out / "index.html"


def study_html(cfg: StudyConfig, rows: list[dict], summary: list[str], threshold: float, figures) -> str:


    esc = html.escape
    items = "".join(f"<li>{esc(s)}</li>\n" for s in summary)
    t = cfg.train
    title = (f"What σ does: {t.data.dataset}, latent {t.model.latent_dim}, {t.optim.epochs} epochs, "
             f"{t.optim.optimizer} lr {t.lr:g}")
    return html_page(title, f"""<h2>What held in this run</h2>
<ul id="summary">
{items}</ul>
<h2>Table</h2>
<p id="method">Test split, {images_text(rows[0]["n_images"], cfg.eval_limit)}; MSE threshold for learning speed:
{threshold:.5f}; each run's eval.json holds log p(x) with IWAE K = {cfg.iw_samples}.</p>
{html_table(rows, COLUMNS, _cell)}
<h2>Figures</h2>
{figures_html(figures)}""")
