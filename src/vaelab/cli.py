"""Command-line interface: argument parsing only; each command calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
import warnings
from pathlib import Path

from . import __version__
from .analysis.metrics import table_rows
from .analysis.reporting import ALL_FIGURES
from .api import demo, evaluate, explore, plot, report, sigma_study
from .config import TrainConfig
from .data import cache
from .errors import ConfigError, VaelabError
from .models.nets import conv_channels, n_parameters, stage_sizes
from .runs import load_run
from .training.distributed import env_rank, reports
from .training.trainer import resume, train


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the help text and default written there. Every flag's argparse
    default is None, so a flag the user did not give never overrides the dataclass (or a resumed run's config)."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli"):
            continue
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = _flag_type(hints[f.name])
        help_text = f.metadata["help"] + ("" if default in (None, False) else f" (default {_show(default)})")
        kwargs: dict = {"help": help_text, "default": None}
        if kind is bool:  # --flag for an option that is off by default; --flag / --no-flag for one that is on
            kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif isinstance(kind, tuple):
            kwargs["choices"] = kind
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.metadata.get("metavar")
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    r = groups["run directory"]
    r.add_argument("--resume", metavar="RUN", help="continue the run in this directory from its checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_threads_flag(groups["optimisation"])


def _flag_type(tp):
    """bool, int, float or str for a field's annotation; the allowed values (a tuple) for a Literal."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if args and typing.get_origin(tp) is not list:  # X | None
        return _flag_type(args[0])
    return tp if tp in (bool, int, float) else str  # lists (--hidden 512,256) are parsed by TrainConfig


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def _add_threads_flag(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine shared with "
                   "other jobs, 1 is often faster. Results are reproducible for a given thread count")


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli"))


def cmd_train(args) -> int:
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
    if last and env_rank() == 0:
        print(f"{run.path}: test loss {last['loss']:.2f} nats (rec {last['rec']:.2f}, kl {last['kl']:.2f}, "
              f"{last['bits_per_dim']:.3f} bits/dim) after {last['epoch']} epochs")
    return 0


def info_text(path: str | Path) -> str:
    run = load_run(path)
    lines = [f"run: {run.path}", f"model: {run.config.arch} {run.config.hidden} -> z{run.config.latent_dim}, "
             f"{run.model.likelihood.describe()}"]
    lines += [f"  {line}" for line in network_lines(run.model, run.config)]
    lines.append("config:")
    lines += [f"  {k}: {json.dumps(v)}" for k, v in run.config.to_dict().items()]
    for split in ("train", "test"):
        last = run.last(split)
        if last:
            parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
                     if k not in ("split", "kl_per_dim")]
            lines.append(f"last {split}: " + " ".join(parts))
            if last.get("normalized") is False:
                lines.append("  (Bernoulli on non-binary pixels: loss is a cross-entropy, not a normalized "
                             "negative log-likelihood)")
    if not run.metrics:
        lines.append("no metrics yet")
    return "\n".join(lines)


def network_lines(model, config: TrainConfig) -> list[str]:
    """What each network is and how many parameters it has (and the likelihood's own, if any)."""
    shape: tuple[int, int, int] = model.shape
    hidden = config.hidden or []
    if config.arch == "conv":
        chans = conv_channels(shape, hidden)
        sizes = stage_sizes(shape, len(chans))
        what = (f"{len(chans)} stride-2 stages, channels {','.join(map(str, chans))}, {config.blocks} residual "
                f"block(s) each, {shape[1]}x{shape[2]} -> {sizes[-1][0]}x{sizes[-1][1]}")
    else:
        what = f"hidden widths {','.join(map(str, hidden))}"
    out = [f"encoder: {n_parameters(model.encoder):,} parameters ({what})",
           f"decoder: {n_parameters(model.decoder):,} parameters (mirrored, {model.likelihood.n_params} output "
           f"tensor(s) per pixel)"]
    own = n_parameters(model.likelihood)
    if own:
        out.append(f"likelihood: {own:,} parameter(s)")
    return out


def format_table(numbers: dict) -> str:
    rows = table_rows(numbers)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_info(args) -> int:
    print(info_text(args.run))
    return 0


def cmd_demo(args) -> int:
    demo(out=args.out, epochs=args.epochs, limit=args.limit, progress=not args.quiet)
    return 0


def cmd_eval(args) -> int:
    numbers = evaluate(args.run, args.split, args.iw_samples, args.batch_size, args.limit, args.json,
                       args.device, progress=not args.quiet)
    print(format_table(numbers))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_report(args) -> int:
    print(report(args.run, args.out, args.iw_samples, args.batch_size, args.limit, args.device,
                 progress=not args.quiet))
    return 0


def cmd_plot(args) -> int:
    print(plot(args.run, args.only, args.out, args.device))
    return 0


def cmd_explore(args) -> int:
    def announce(url: str) -> None:
        print(f"vaelab explore: serving {args.run} at {url}  (Ctrl-C stops it)", flush=True)

    path = explore(args.run, args.port, args.host, not args.no_browser, args.export, args.codes, args.device,
                   args.verbose, announce)
    print(f"wrote {path}" if path else "vaelab explore: stopped", flush=True)
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
    path = sigma_study(dataset=args.dataset, sigmas=args.sigmas, also=args.also, latent_dim=args.latent_dim,
                       hidden=args.hidden, arch=args.arch, blocks=args.blocks, epochs=args.epochs,
                       batch_size=args.batch_size, optimizer=args.optimizer,
                       lr=args.lr, limit=args.limit, seed=args.seed, device=args.device, out=args.out,
                       iw_samples=args.iw_samples, mse_threshold=args.mse_threshold, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def cmd_cache(args) -> int:
    root = cache.cache_root()
    if args.action == "clear":
        removed = cache.clear(args.entry)
        if args.entry is not None and not removed:
            raise ConfigError(f"no cache entry named {args.entry!r} in {root}; `vaelab cache ls` lists them")
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {root}")
        return 0
    listed = list(cache.entries())
    for e in listed:
        print(cache.describe(e))
    total = sum(e.bytes for e in listed)
    print(f"{len(listed)} entr{'y' if len(listed) == 1 else 'ies'}, {cache.human_size(total)} in {root}")
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

    p = sub.add_parser("plot", help="write one figure of the report as PNG",
                       description="Write one figure as <out>/<NAME>.png and print its path.")
    p.add_argument("run", help="run directory")
    p.add_argument("--only", required=True, metavar="NAME", help=f"the figure: {', '.join(ALL_FIGURES)} (factors: "
                   "data with named factors, such as shapes and dsprites)")
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
    p.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="as for train (default mlp)")
    p.add_argument("--hidden", help="as for train: mlp widths (default 400) or conv channels (default 32)")
    p.add_argument("--blocks", type=int, metavar="N", help="conv: residual blocks per stage (default 1)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    p.add_argument("--batch-size", type=int, help="as for train (default 128 for mlp, 64 for conv)")
    p.add_argument("--optimizer", default="adam", help="adam or sgd (default adam)")
    p.add_argument("--lr", type=float, help="learning rate (default with adam as for train: 1e-3 for mlp, 5e-4 "
                   "for conv; 1e-4 with sgd)")
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

    p = sub.add_parser("cache", help="list or clear the decoded-dataset cache",
                       description="Image folders, .npy files, generated shapes and downloaded archives are decoded "
                       "once into uint8 arrays that later runs memory-map. `ls` lists them (source, shapes, size); "
                       "`clear` deletes them all, or the one named. The folder is $VAELAB_CACHE, else "
                       "~/.cache/vaelab/decoded.")
    p.add_argument("action", choices=["ls", "clear"], help="ls: list the entries; clear: delete them")
    p.add_argument("entry", nargs="?", help="clear: only this entry (a name `ls` prints)")
    p.set_defaults(func=cmd_cache)

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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_explore)
    return parser


def _set_threads(n: int | None) -> None:
    if n is None:
        return
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
    try:
        _set_threads(getattr(args, "threads", None))
        with warnings.catch_warnings():
            # under torchrun, rank 0 speaks for all: the others would repeat its warnings word for word
            warnings.simplefilter("default" if env_rank() == 0 else "ignore")
            warnings.formatwarning = lambda msg, cat, *a, **k: f"vaelab: warning: {msg}\n"
            return args.func(args)
    except VaelabError as e:
        if reports(e):  # under torchrun: one line, from the process that has something to say
            print(f"vaelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if reports(e):
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
