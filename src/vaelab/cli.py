"""Command-line interface: argument parsing only; each command calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .runs import RunError
    from .train import TrainingError

    return (ConfigError, DataError, RunError, TrainingError)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    # Every default is None so the TrainConfig dataclass stays the one place defaults live.
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="mnist, fashion-mnist, a .npz/.npy file or an image folder "
                   "(default fashion-mnist)")
    d.add_argument("--data-dir", help="folder holding the IDX files of a named dataset (looked at first; then "
                   "$VAELAB_DATA, the user cache ~/.cache/vaelab, system copies, then a download)")
    d.add_argument("--limit", type=int, help="train on the first N training images only")
    d.add_argument("--binarize", choices=["none", "dynamic", "static"],
                   help="turn grey pixels into 0/1: a fresh draw per step (dynamic) or one fixed draw (static); "
                   "for the Bernoulli likelihood (default none)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=["mlp", "conv"], help="encoder/decoder type (default mlp)")
    m.add_argument("--hidden", help="hidden sizes, e.g. 400 or 512,256 (mlp widths; conv channels, "
                   "default 32,64)")
    m.add_argument("--latent-dim", type=int, help="dimensions of z (default 20)")
    m.add_argument("--likelihood", help="observation model p(x|z): gaussian, bernoulli, continuous-bernoulli, "
                   "laplace (default gaussian)")
    m.add_argument("--sigma", help="gaussian σ: a number (e.g. 0.1), learned (one shared σ), learned-pixel "
                   "(σ per pixel from the decoder) or optimal (σ² = batch MSE); laplace: the scale b or learned "
                   "(default 0.1)")
    o = p.add_argument_group("objective")
    o.add_argument("--beta", type=float, help="weight of the KL term in the training objective (default 1)")
    o.add_argument("--kl-warmup", type=float, metavar="EPOCHS",
                   help="raise the KL weight linearly from 0 to beta over this many epochs (default 0)")
    o.add_argument("--free-bits", type=float, metavar="NATS",
                   help="lower bound on each latent dimension's batch-mean KL in the objective (default 0)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="default adam")
    t.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    t.add_argument("--batch-size", type=int, help="default 128")
    t.add_argument("--epochs", type=int, help="total epochs; with --resume, the new total (default 10)")
    t.add_argument("--seed", type=int, help="seeds initialisation, shuffling and sampling (default 0)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (cuda when available)")
    t.add_argument("--precision", choices=["fp32", "bf16"],
                   help="bf16: run the networks' matmuls in bfloat16 (torch.autocast), faster on GPUs and on "
                   "CPUs with AVX-512-BF16 or AMX; z, the KL, the likelihood, weights and optimizer state stay "
                   "float32 and every reported number is computed in float32 (default fp32)")
    _add_threads_flag(t)
    r = p.add_argument_group("run directory")
    r.add_argument("--out", help="run directory (default runs/<name>)")
    r.add_argument("--name", help="run name used for the default --out")
    r.add_argument("--resume", metavar="RUN", help="continue the run in this directory from its checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def _add_threads_flag(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine shared with "
                   "other jobs, 1 is often faster. Results are reproducible for a given thread count")


TRAIN_KEYS = ("dataset", "data_dir", "limit", "binarize", "arch", "hidden", "latent_dim", "likelihood", "sigma",
              "beta", "kl_warmup", "free_bits", "optimizer", "lr", "batch_size", "epochs", "seed", "device",
              "precision", "out", "name")


def cmd_train(args) -> int:
    from .api import resume, train
    from .config import ConfigError, TrainConfig

    given = {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k) is not None}
    if args.resume:
        extra = sorted(set(given) - {"epochs", "device"})
        if extra:
            raise ConfigError(f"--resume continues a run with its saved settings; only --epochs and --device may "
                              f"be given with it, got {', '.join('--' + k.replace('_', '-') for k in extra)}")
        run = resume(args.resume, progress=not args.quiet, **given)
    else:
        run = train(TrainConfig(**given), progress=not args.quiet)
    last = run.last("test")
    if last:
        print(f"{run.path}: test loss {last['loss']:.2f} nats (rec {last['rec']:.2f}, kl {last['kl']:.2f}, "
              f"{last['bits_per_dim']:.3f} bits/dim) after {last['epoch']} epochs")
    return 0


def cmd_info(args) -> int:
    from .api import info_text

    print(info_text(args.run))
    return 0


def cmd_demo(args) -> int:
    from .api import demo

    demo(out=args.out, epochs=args.epochs, limit=args.limit, progress=not args.quiet)
    return 0


def cmd_eval(args) -> int:
    from .api import evaluate
    from .evaluate import format_table

    numbers = evaluate(args.run, args.split, args.iw_samples, args.batch_size, args.limit, args.json,
                       args.device, progress=not args.quiet)
    print(format_table(numbers))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_report(args) -> int:
    from .api import report

    print(report(args.run, args.out, args.iw_samples, args.batch_size, args.limit, args.device,
                 progress=not args.quiet))
    return 0


def cmd_plot(args) -> int:
    from .api import plot

    print(plot(args.run, args.only, args.out, args.device))
    return 0


def cmd_explore(args) -> int:
    from .explore import export, serve

    if args.export:
        print(f"wrote {export(args.run, args.export, n_codes=args.codes or 2000)}")
    else:
        serve(args.run, host=args.host, port=args.port, open_browser=not args.no_browser,
              n_codes=args.codes or 5000, verbose=args.verbose)
    return 0


def _add_eval_flags(p: argparse.ArgumentParser, iw_default: int) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--iw-samples", type=int, default=iw_default, metavar="K",
                   help="samples from q(z|x) per image for the importance-weighted log p(x) "
                   f"(default {iw_default}; papers use 5000; K=1 gives the ELBO's estimate)")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch (default 500)")
    p.add_argument("--limit", type=int, help="evaluate the first N images of the split only")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    _add_threads_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_sigma_study(args) -> int:
    from .api import sigma_study

    path = sigma_study(dataset=args.dataset, sigmas=args.sigmas, also=args.also, latent_dim=args.latent_dim,
                       hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                       lr=args.lr, limit=args.limit, seed=args.seed, device=args.device, out=args.out,
                       iw_samples=args.iw_samples, mse_threshold=args.mse_threshold, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaelab",
        description="Train and understand Variational Autoencoders with exact observation models. "
        "Losses are negative ELBOs in nats per image, summed over pixels.")
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train a VAE. Writes config.json, model.safetensors, metrics.jsonl (one line "
                       "per split per epoch) and a checkpoint to the run directory. Ctrl-C saves a checkpoint; "
                       "--resume RUN continues it.")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="print a run's config and last metrics",
                       description="Print the config and the last train/test metrics of a run directory.")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="train a 2-D Gaussian VAE on Fashion-MNIST (or MNIST) and draw it",
                       description="Train a 2-D-latent Gaussian VAE (σ = 0.1) on MNIST when a local copy "
                       "exists, else Fashion-MNIST, then write the manifold grid and reconstructions as PNG.")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=int, default=5, help="default 5")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    _add_threads_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate a trained run: ELBO, IWAE log p(x), latent geometry, sharpness",
                       description="Print the −ELBO, its parts, bits/dim, MSE, the importance-weighted "
                       "log p(x), KL per latent dimension, active units, the share of codes within radius 1/2/3, k-NN "
                       "label agreement and sharpness for one split. Log-likelihoods are nats per image.")
    _add_eval_flags(p, 1000)
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="write every figure and a self-contained HTML report of a run",
                       description="Evaluate the test split and write the figures (PNG), eval.json and "
                       "report.html (figures embedded, with the numbers and the config); prints its path.")
    _add_eval_flags(p, 100)
    p.add_argument("--out", help="folder for the PNGs and report.html (default: the run directory)")
    p.set_defaults(func=cmd_report)

    from .report import FIGURES

    p = sub.add_parser("plot", help="write one figure of the report as PNG",
                       description="Write one figure as <out>/<NAME>.png and print its path.")
    p.add_argument("run", help="run directory")
    p.add_argument("--only", required=True, metavar="NAME", help=f"the figure: {', '.join(FIGURES)}")
    p.add_argument("--out", help="folder for the PNG (default: the run directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("sigma-study", help="train one Gaussian VAE per σ and measure what σ does",
                       description="Train one run per σ setting (same data, seed, network and budget) under "
                       "OUT/sigma-<σ>, reusing runs that exist, then write table.md/csv, figures, summary.md and "
                       "index.html: −ELBO, KL, MSE, sharpness, radius-3 share and learning speed against σ.")
    p.add_argument("--dataset", default="fashion-mnist", help="as for train (default fashion-mnist)")
    p.add_argument("--sigmas", default="0.03,0.1,0.3,1.0", help="fixed σ values, comma-separated "
                   "(default 0.03,0.1,0.3,1.0)")
    p.add_argument("--also", default="", help="extra settings: learned and/or optimal, comma-separated")
    p.add_argument("--latent-dim", type=int, default=2, help="default 2 (the manifold figure needs 2)")
    p.add_argument("--hidden", default="400", help="MLP widths, e.g. 400 or 512,256 (default 400)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument("--optimizer", default="adam", help="adam or sgd (default adam)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3 for adam, 1e-4 for sgd)")
    p.add_argument("--limit", type=int, help="train on the first N training images only")
    p.add_argument("--seed", type=int, default=0, help="the same seed for every run (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--iw-samples", type=int, default=100, help="IWAE samples for each run's eval (default 100)")
    p.add_argument("--mse-threshold", type=float, help="test MSE that defines learning speed (default: the "
                   "worst final test MSE of the sweep, so every run reaches it)")
    p.add_argument("--out", default="runs/sigma", help="study folder (default runs/sigma)")
    _add_threads_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sigma_study)

    p = sub.add_parser("explore", help="explore a run's latent space live in the browser",
                       description="Serve a local web page that shows the test images' codes in the latent plane "
                       "and decodes the point under the pointer live, with draws from p(x|z), posteriors q(z|x) "
                       "and paths; or, with --export, write it as one HTML file that needs no server. The page's "
                       "HTTP API is in docs/explore.md.")
    p.add_argument("run", help="run directory")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; any other address lets whoever reaches it use the explorer)")
    p.add_argument("--no-browser", action="store_true", help="print the URL but do not open a browser")
    p.add_argument("--codes", type=int, metavar="N", help="test images encoded for the scatter (default 5000; "
                   "2000 with --export)")
    p.add_argument("--export", metavar="FILE", help="write a self-contained HTML explorer to FILE instead of "
                   "serving (MLP decoders run in the page; other decoders are precomputed on a grid)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_explore)
    return parser


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    from .config import ConfigError

    if n < 1:
        raise ConfigError(f"--threads must be an integer >= 1; got {n}")
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    errors = _user_errors()
    try:
        _set_threads(getattr(args, "threads", None))
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda msg, cat, *a, **k: f"vaelab: warning: {msg}\n"
            return args.func(args)
    except errors as e:
        print(f"vaelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaelab: interrupted", file=sys.stderr)
        return 130
    except json.JSONDecodeError as e:
        print(f"vaelab: error: invalid JSON ({e})", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave cannot be read or written (missing, a file, no permission)
        where = f": {Path(e.filename)}" if e.filename else ""
        print(f"vaelab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
