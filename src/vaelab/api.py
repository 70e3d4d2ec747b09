"""The commands of the CLI as library functions: info, evaluate, report, plot, sample, demo, sigma_study, explore,
cache_list and cache_clear (train and resume live in vaelab.training.trainer, load_run in vaelab.runs). Each checks
its arguments before any slow work and returns data, text or paths; printing is the CLI's job."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import explorer
from .analysis.aggregate import check_sample_args, sample_images, write_images
from .analysis.metrics import DEFAULT_IW_SAMPLES, check_eval_args, evaluate_run, headline
from .analysis.quality import check_temperatures
from .analysis.reporting import Material, check_figure, draw, write_report
from .analysis.study import StudyConfig, parse_list
from .analysis.study import sigma_study as run_study
from .analysis.summary import run_summary
from .analysis.sweep import SweepConfig
from .analysis.sweep import sweep as run_sweep
from .config import TrainConfig, parse_hidden
from .data import REGISTRY, locate
from .data import cache as decoded_cache
from .errors import ConfigError, RunError
from .explorer import DEFAULT_PORT
from .runs import CONFIG, Run, load_run, write_text_atomic
from .training.build import resolve_device
from .training.trainer import resume, train


def _load(path: str | Path, device: str = "auto") -> Run:
    return load_run(path, device=str(resolve_device(device)))


def _check_out_file(path: str | Path | None, flag: str) -> None:
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"{flag} must be a file name, got the folder {path}")


def info(path: str | Path) -> str:
    """The text `vaelab info` prints for the run in `path`: its model, each network's parameter count, its config
    and its last train/test metrics."""
    return run_summary(path)


def cache_list() -> str:
    """The text `vaelab cache ls` prints: each entry of the decoded-dataset cache, then their count and size."""
    return decoded_cache.listing()


def cache_clear(entry: str | None = None) -> str:
    """Delete the decoded-dataset cache's entries, or only `entry` (ConfigError if it does not exist); returns
    what `vaelab cache clear` prints."""
    return decoded_cache.clear_entries(entry)


def evaluate(path: str | Path, split: str = "test", iw_samples: int = DEFAULT_IW_SAMPLES,
             batch_size: int = 500, limit: int | None = None, json_path: str | Path | None = None,
             device: str = "auto", progress: bool = True, sample_quality: bool = True,
             temperatures: str | Sequence[float] = (1.0,)) -> dict:
    """The numbers of `vaelab eval` for the run in `path`; also written to `json_path` (atomically) if given.
    `sample_quality`: also score prior, aggregate-posterior and reconstructed images against test images
    (key "sample_quality"; docs/samples.md), the prior's at each of `temperatures` ("1,0.8,0.6" or numbers)."""
    check_eval_args(split, iw_samples, batch_size, limit)  # before the (slow) work, so errors come at once
    temperatures = check_temperatures(temperatures)
    _check_out_file(json_path, "--json")
    numbers = evaluate_run(_load(path, device), split, iw_samples, batch_size, limit, progress=progress,
                           sample_quality=sample_quality, temperatures=temperatures)
    if json_path is not None:
        write_text_atomic(Path(json_path), json.dumps(numbers, indent=2) + "\n")
    return numbers


def report(path: str | Path, out: str | Path | None = None, iw_samples: int = DEFAULT_IW_SAMPLES,
           batch_size: int = 500, limit: int | None = None, device: str = "auto", progress: bool = True,
           sample_quality: bool = True, temperatures: str | Sequence[float] = (1.0,)) -> Path:
    """Write every figure, eval.json and a self-contained report.html into `out` (default: the run folder);
    `sample_quality` and `temperatures` as for evaluate()."""
    check_eval_args("test", iw_samples, batch_size, limit)
    temperatures = check_temperatures(temperatures)
    _check_dir(out)
    return write_report(_load(path, device), out, iw_samples, batch_size, limit, progress, sample_quality,
                        temperatures)


def plot(path: str | Path, only: str, out: str | Path | None = None, device: str = "auto") -> Path:
    """Draw one figure of the report (`only` names it) as <out>/<only>.png; return its path."""
    check_figure(only)
    _check_dir(out)
    run = _load(path, device)
    return draw(Material.of(run), only, Path(out) if out is not None else run.path)


def _check_dir(out: str | Path | None) -> None:
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out must be a folder, got the file {out}")


def sample(run: str | Path | Run, n: int, source: str = "prior", temperature: float = 1.0, seed: int = 0,
           out: str | Path | None = None, device: str = "auto") -> np.ndarray:
    """Decoder means f(z) of n codes z drawn from the prior p(z) (source="prior") or from the aggregate posterior
    (source="aggregate": a Gaussian mixture fitted to the training codes, cached in the run folder), each draw's
    spread scaled by `temperature`: (n, C, H, W) float32 in [0, 1], clamped for display. Seeded by `seed` alone.
    `out`: also write them, as a PNG grid (.png) or the array itself (.npy). See docs/samples.md."""
    check_sample_args(n, source, temperature, seed)
    if out is not None and Path(out).suffix.lower() not in (".png", ".npy"):
        raise ConfigError(f"--out must end in .png (a grid) or .npy (the array); got {out}")
    _check_out_file(out, "--out")
    images = sample_images(run if isinstance(run, Run) else _load(run, device), n, source, temperature, seed)
    if out is not None:
        write_images(images, Path(out))
    return images


def demo_dataset() -> str:
    """MNIST when a local copy exists (no download), else Fashion-MNIST."""
    return "mnist" if locate(REGISTRY["mnist"]) is not None else "fashion-mnist"


def demo(out: str = "runs/demo", epochs: int = 5, limit: int | None = None, progress: bool = True) -> Run:
    """Train a 2-D-latent Gaussian VAE, then write its report (figures, numbers, report.html) into the run folder."""
    dataset = demo_dataset()
    config = TrainConfig(dataset=dataset, likelihood="gaussian", sigma="0.1", latent_dim=2, hidden=[512, 256],
                         epochs=epochs, limit=limit, out=out)
    out_path = Path(out)
    if (out_path / CONFIG).exists():
        run = resume(out_path, progress=progress, epochs=epochs) if _unfinished(out_path, epochs) else load_run(out)
    else:
        print(f"vaelab demo: training a 2-D Gaussian VAE (σ = 0.1) on {dataset} for {epochs} epochs -> {out}",
              file=sys.stderr)
        run = train(config, progress=progress)
    last = run.last("test")
    if last is None:
        raise RunError(f"{run.path}: no test metrics recorded; the run never finished an epoch")
    print(f"test −ELBO {last['loss']:.2f} nats/image (rec {last['rec']:.2f}, KL {last['kl']:.2f}), "
          f"MSE {last['mse']:.4f}, σ {last.get('sigma', float('nan')):.3g}")
    print(f"vaelab demo: evaluating (IWAE K={DEMO_IW_SAMPLES}) and drawing the report ...", file=sys.stderr)
    path = write_report(run, iw_samples=DEMO_IW_SAMPLES, progress=progress)
    print(headline(json.loads((path.parent / "eval.json").read_text())))
    print(f"report: {path}")
    return run


DEMO_IW_SAMPLES = DEFAULT_IW_SAMPLES  # the K of `vaelab eval` and `report`, so the demo's numbers match theirs


def _unfinished(path: Path, epochs: int) -> bool:
    rows = load_run(path).metrics
    return not rows or rows[-1]["epoch"] < epochs


def sigma_study(dataset: str = "fashion-mnist", sigmas: str | list[float] = "0.03,0.1,0.3,1.0",
                also: str | list[str] = "", hidden: str | list[int] | None = None, progress: bool = True,
                **kwargs) -> Path:
    """Run the σ study (see vaelab.study) and return the path of its index.html."""
    if isinstance(sigmas, str):
        sigmas = parse_list(sigmas, "--sigmas")
    if isinstance(also, str):
        also = parse_list(also, "--also", str)
    if isinstance(hidden, str):
        hidden = parse_hidden(hidden)
    hidden = None if hidden is None else list(hidden)
    return run_study(StudyConfig(dataset=dataset, sigmas=list(sigmas), also=list(also), hidden=hidden,
                                 **kwargs), progress=progress)


def sweep(sets, zip: bool = False, out: str = "runs/sweep", iw_samples: int = DEFAULT_IW_SAMPLES,
          batched: bool = False, sample_quality: bool = False, progress: bool = True,
          eval_limit: int | None = None, **settings) -> Path:
    """Train (or reuse) one run per combination of settings and compare them; return the path of index.html.
    `sets`: {"sigma": ["0.1", "0.3"], "beta": [1, 4]} or ["sigma=0.1,0.3", "beta=1,4"] (as `--set`); `zip`
    pairs the i-th values instead of taking every combination; `batched` trains runs whose networks have the
    same shapes together (vaelab.training.ensemble); `sample_quality` also scores each run's samples as `vaelab
    eval` does; `eval_limit` evaluates each run on the first N test images only (None: all); other settings are
    `vaelab train`'s and apply to every run. See docs/sweep.md."""
    return run_sweep(SweepConfig(sets, zip, out, iw_samples, batched, sample_quality, eval_limit, **settings),
                     progress=progress)


__all__ = ["cache_clear", "cache_list", "demo", "evaluate", "explore", "info", "plot", "report", "sample",
           "sigma_study", "sweep"]


def explore(run: str | Path | Run, port: int = DEFAULT_PORT, host: str = "127.0.0.1", open_browser: bool = True,
            export: str | Path | None = None, n_codes: int | None = None, device: str = "auto",
            verbose: bool = False, announce=None, progress: bool = True) -> Path | None:
    """Explore a run's latent space in the browser: serve the live explorer until Ctrl-C (announce(url) is
    called once it listens; default: print it), or with `export`, write it as one self-contained HTML file and
    return its path. See docs/explore.md."""
    explorer.check_port(port)
    if n_codes is not None:
        explorer.check_n_codes(n_codes)
    _check_out_file(export, "--export")
    run = run if isinstance(run, Run) else _load(run, device)
    if progress:  # loading the data and encoding the test images takes a few seconds
        print(f"vaelab explore: encoding the test images of {run.path} ...", file=sys.stderr, flush=True)
    if export is not None:
        return explorer.export(run, export, n_codes or explorer.N_CODES_EXPORT)
    explorer.serve(run, host, port, open_browser, n_codes or explorer.N_CODES, verbose, announce)
    return None
