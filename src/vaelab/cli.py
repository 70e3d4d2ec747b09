"""Command-line interface: argument parsing only; each command calls one library function."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import typing
import warnings
from pathlib import Path

from . import __version__
from .analysis.metrics import DEFAULT_IW_SAMPLES, headline, table_rows
from .analysis.reporting import ALL_FIGURES
from .analysis.study import TRAIN_DEFAULTS as STUDY_DEFAULTS
from .analysis.study import TRAIN_SETTINGS as STUDY_SETTINGS
from .analysis.sweep_settings import sweepable
from .api import cache_clear, cache_list, demo, evaluate, explore, info, plot, report, sample, sigma_study, sweep
from .config import Device, TrainConfig
from .errors import ERROR_STATUS, INTERRUPTED_STATUS, ConfigError, VaelabError, say
from .flags import add_setting_flags, given_settings
from .training.distributed import env_rank, reports
from .training.evaluation import NEGATIVE_NOTE, loss_text
from .training.trainer import resume, train

DEVICES = typing.get_args(Device)


def _add_threads_flag(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine shared with "
                   "other jobs, 1 is often faster. Results are reproducible for a given thread count")


def cmd_train(args) -> int:
    given = given_settings(args)
    if args.resume:
        extra = sorted(set(given) - {"epochs", "device", "time_limit"})
        if extra:
            given_flags = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise ConfigError(f"--resume continues a run with its saved settings; only --epochs, --device and "
                              f"--time-limit may be given with it, got {given_flags}")
        run = resume(args.resume, progress=not args.quiet, **given)
    else:
        run = train(TrainConfig(**given), progress=not args.quiet)
    last = run.last("test")
    if last and env_rank() == 0:
        print(f"{run.path}: test {loss_text(last)} after {last['epoch']} epochs")
        if last["loss"] < 0 and (args.quiet or args.resume):  # else the epoch lines have explained it
            print(f"  ({NEGATIVE_NOTE})")
    return 0


def format_table(numbers: dict) -> str:
    rows = table_rows(numbers)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_info(args) -> int:
    print(info(args.run))
    return 0


def cmd_demo(args) -> int:
    demo(out=args.out, epochs=args.epochs, limit=args.limit, progress=not args.quiet)
    return 0


def cmd_eval(args) -> int:
    numbers = evaluate(args.run, args.split, args.iw_samples, args.batch_size, args.limit, args.json,
                       args.device, progress=not args.quiet, sample_quality=not args.no_sample_quality,
                       temperatures=args.temperatures)
    print(format_table(numbers))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_report(args) -> int:
    path = report(args.run, args.out, args.iw_samples, args.batch_size, args.limit, args.device,
                  progress=not args.quiet, sample_quality=not args.no_sample_quality, temperatures=args.temperatures)
    print(headline(json.loads((path.parent / "eval.json").read_text())))
    print(path)
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


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--iw-samples", type=int, default=DEFAULT_IW_SAMPLES, metavar="K",
                   help="samples from q(z|x) per image for the importance-weighted bound on log p(x) (default "
                   f"{DEFAULT_IW_SAMPLES}, the same for eval, report, demo and sigma-study, so their numbers "
                   "agree). The bound rises toward log p(x) as K grows, so compare runs at the same K (printed "
                   "beside the number); the time of the IWAE part grows in proportion to K (papers use 5000). K=1 "
                   "gives the ELBO's estimate")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch (default 500)")
    p.add_argument("--limit", type=int, help="evaluate the first N images of the split only")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    _add_threads_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-sample-quality", action="store_true", help="skip the sample-quality score (Fréchet "
                   "distance, precision, recall of prior, aggregate-posterior and reconstructed images against "
                   "test images, in the features of a judge network trained once per dataset: the first time "
                   "about half a minute on a CPU, then a few seconds; docs/samples.md)")
    p.add_argument("--temperatures", default="1", metavar="T,T,...", help="also score prior samples drawn at "
                   "these temperatures, comma-separated, e.g. 1,0.8,0.6: each draw's spread scaled by T (default 1)")


def cmd_sample(args) -> int:
    sample(args.run, args.n, args.source, args.temperature, args.seed, args.out, args.device)
    print(f"wrote {args.out}")
    return 0


def cmd_sigma_study(args) -> int:
    path = sigma_study(sigmas=args.sigmas, also=args.also, out=args.out, iw_samples=args.iw_samples,
                       mse_threshold=args.mse_threshold, eval_limit=args.eval_limit, progress=not args.quiet,
                       **given_settings(args, STUDY_SETTINGS))
    if env_rank() == 0:  # under torchrun rank 0 writes the study
        print(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    names = tuple(sweepable())
    path = sweep(args.set or [], zip=args.zip, out=args.out, iw_samples=args.iw_samples, batched=args.batched,
                 sample_quality=args.sample_quality, eval_limit=args.eval_limit, progress=not args.quiet,
                 **given_settings(args, names))
    if env_rank() == 0:  # under torchrun rank 0 writes the page
        print(f"wrote {path}")
    return 0


def cmd_cache(args) -> int:
    print(cache_clear(args.entry) if args.action == "clear" else cache_list())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as vaelab reports every mistake: one line, exit status 2; a misspelt flag,
    command or choice also names the nearest ones that exist ("did you mean --latent-dim?")."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the command's own parser, which knows the flags the user meant
            parser = self._command_parser(parsed) or self
            flags = [a for a in extras if a.startswith("-")]
            hints = [_did_you_mean(f.split("=", 1)[0], parser._option_string_actions, len(flags) > 1)
                     for f in flags]
            parser.error("; ".join([f"unrecognized arguments: {' '.join(extras)}", *filter(None, hints)]))
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(parsed, action.dest, None)
                return action.choices.get(name) if isinstance(name, str) else None
        return None

    def _check_value(self, action: argparse.Action, value: typing.Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            hint = _did_you_mean(value, action.choices or ()) if isinstance(value, str) else ""
            if not hint:
                raise
            raise argparse.ArgumentError(action, f"{e.message}; {hint}") from e


def _did_you_mean(given: str, known: typing.Iterable, name_it: bool = False) -> str:
    """'did you mean X?' (or 'X or Y') for the names in `known` nearest to `given`, '' when none is near. Dashes
    and underscores count alike, and leading dashes not at all (so --foo is not near --out for their '--')."""
    def norm(name: str) -> str:
        return name.lstrip("-").replace("_", "-").lower()

    names = {norm(k): k for k in known if isinstance(k, str) and norm(k)}
    near = difflib.get_close_matches(norm(given), list(names), n=3, cutoff=0.75)
    if not near:
        return ""
    return f"{given + ': ' if name_it else ''}did you mean {' or '.join(names[n] for n in near)}?"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vaelab",
        description="Train and understand Variational Autoencoders with exact observation models. "
        "Losses are negative ELBOs in nats per image, summed over pixels.")
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_parser, _info_parser, _demo_parser, _eval_parser, _report_parser, _plot_parser,
                _sample_parser, _study_parser, _sweep_parser, _cache_parser, _explore_parser):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train a VAE. Writes config.json, model.safetensors, metrics.jsonl (one line "
                       "per split per epoch) and a checkpoint to the run directory. Ctrl-C saves a checkpoint; "
                       "--resume RUN continues it.")
    groups = add_setting_flags(p)
    r = groups["run directory"]
    r.add_argument("--resume", metavar="RUN", help="continue the run in this directory from its checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_threads_flag(groups["runtime"])
    p.set_defaults(func=cmd_train)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="print a run's config and last metrics",
                       description="Print the config and the last train/test metrics of a run directory.")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_info)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a 2-D Gaussian VAE on Fashion-MNIST (or MNIST) and draw it",
                       description="Train a 2-D-latent Gaussian VAE (σ = 0.1) on MNIST when a local copy "
                       "exists, else Fashion-MNIST, then write the manifold grid and reconstructions as PNG.")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=int, default=5, help="default 5")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    _add_threads_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run: ELBO, IWAE log p(x), latent geometry, sharpness",
                       description="Print the −ELBO, its parts, bits/dim, MSE, the importance-weighted bound "
                       "on −log p(x), KL per latent dimension, active units, the share of codes within the radii "
                       "that hold 68 / 95 / 99.7 % of the prior N(0, I) in the latent dimension, k-NN label "
                       "agreement and sharpness for one split. Negative log-likelihoods in nats per image, lower is "
                       "better. Then the sample quality of prior and aggregate-posterior samples against the test "
                       "images (docs/samples.md).")
    _add_eval_flags(p)
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_eval)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="write every figure and a self-contained HTML report of a run",
                       description="Evaluate the test split and write the figures (PNG), eval.json and "
                       "report.html (figures embedded, with the numbers and the config); prints the −ELBO and the "
                       "IWAE bound with its K, then the path of report.html.")
    _add_eval_flags(p)
    p.add_argument("--out", help="folder for the PNGs and report.html (default: the run directory)")
    p.set_defaults(func=cmd_report)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a trained run (prior or aggregate posterior)",
                       description="Draw n codes z from the prior p(z) or from the aggregate posterior (a Gaussian "
                       "mixture fitted to the posterior means of the training images, its size chosen from 1, 2, "
                       "5, 10, 20 by held-out log-likelihood and cached in the run folder as aggregate.safetensors) "
                       "and write the decoder means f(z), clamped to [0, 1]: a PNG grid (FILE ends in .png) or the "
                       "float32 array (n, C, H, W) (FILE ends in .npy). See docs/samples.md.")
    p.add_argument("run", help="run directory")
    p.add_argument("-n", type=int, default=64, help="images to draw (default 64)")
    p.add_argument("--from", dest="source", default="prior", metavar="SOURCE",
                   help="prior (z ~ p(z)) or aggregate (z ~ the mixture fitted to the training codes); default prior")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="scale each draw's spread around its mean (the prior's or the mixture component's) by T "
                   "(default 1)")
    p.add_argument("--seed", type=int, default=0, help="the draws depend on this alone (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="a .png (grid) or .npy (array) file to write")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_sample)


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="write one figure of the report as PNG",
                       description="Write one figure as <out>/<NAME>.png and print its path.")
    p.add_argument("run", help="run directory")
    p.add_argument("--only", required=True, metavar="NAME", help=f"the figure: {', '.join(ALL_FIGURES)} (factors: "
                   "data with named factors, such as shapes and dsprites)")
    p.add_argument("--out", help="folder for the PNG (default: the run directory)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_plot)


def _study_parser(sub) -> None:
    p = sub.add_parser("sigma-study", help="train one Gaussian VAE per σ and measure what σ does",
                       description="Train one run per σ setting (same data, seed, network and budget) under "
                       "OUT/sigma-<σ>, reusing runs that exist, then write table.md/csv, figures, summary.md and "
                       "index.html: −ELBO, KL, MSE, sharpness, the share of codes within the prior's 99.7 % radius "
                       "and learning speed against σ. The "
                       "training settings are those of `vaelab train` (a learning rate of 1e-4 with sgd).")
    s = p.add_argument_group("study")
    s.add_argument("--sigmas", default="0.03,0.1,0.3,1.0", help="fixed σ values, comma-separated "
                   "(default 0.03,0.1,0.3,1.0)")
    s.add_argument("--also", default="", help="extra settings: learned and/or optimal, comma-separated")
    s.add_argument("--iw-samples", type=int, default=DEFAULT_IW_SAMPLES,
                   help=f"IWAE samples for each run's eval (default {DEFAULT_IW_SAMPLES}, as for eval and report)")
    _add_eval_limit_flag(s)
    s.add_argument("--mse-threshold", type=float, help="test MSE that defines learning speed (default: the "
                   "worst final test MSE of the sweep, so every run reaches it)")
    s.add_argument("--out", default="runs/sigma", help="study folder (default runs/sigma)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    groups = add_setting_flags(p, STUDY_SETTINGS, STUDY_DEFAULTS)
    _add_threads_flag(groups["runtime"])
    p.set_defaults(func=cmd_sigma_study)


def _add_eval_limit_flag(group) -> None:
    group.add_argument("--eval-limit", type=int, metavar="N", help="evaluate each run on the first N test images "
                       "only, as `vaelab eval RUN --limit N` does (default: all); an evaluation at another N is "
                       "redone, not reused")


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train one run per combination of settings and compare them",
                       description="Train one run per combination of the --set values (every other setting as "
                       "`vaelab train` takes it, shared by every run) under OUT/<settings>, reusing complete runs "
                       "and resuming shorter ones, then write table.md/csv, figures and index.html: each run's "
                       "−ELBO, rate (KL) and distortion (rec) on the rate–distortion plane, IWAE log p(x), active "
                       "units, MSE and sharpness. See docs/sweep.md.")
    s = p.add_argument_group("sweep")
    s.add_argument("--set", action="append", metavar="FIELD=V1,V2,...", help="a setting of `vaelab train` (its "
                   "flag without dashes) and its values, e.g. sigma=0.1,0.3 or latent-dim=2,20 (lists such as "
                   "--hidden: hidden=400/512,256); repeat for a grid")
    s.add_argument("--zip", action="store_true", help="pair the i-th values of every --set instead of taking "
                   "every combination")
    s.add_argument("--batched", action="store_true", help="train the runs whose networks have the same shapes "
                   "(σ, β, seed, learning rate, free bits differ) together, one batched step for all; each run "
                   "is still its own (numbers, checkpoint, RNG streams)")
    s.add_argument("--iw-samples", type=int, default=DEFAULT_IW_SAMPLES,
                   help=f"IWAE samples for each run's eval (default {DEFAULT_IW_SAMPLES}, as for eval and report)")
    _add_eval_limit_flag(s)
    s.add_argument("--sample-quality", action="store_true", help="also score each run's samples against test "
                   "images as `vaelab eval` does (Fréchet distance, precision, recall; docs/samples.md)")
    s.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    groups = add_setting_flags(p, tuple(sweepable()))
    _add_threads_flag(groups["runtime"])
    p.set_defaults(func=cmd_sweep)


def _cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the decoded-dataset cache",
                       description="Image folders, .npy files, generated shapes and downloaded archives are decoded "
                       "once into uint8 arrays that later runs memory-map. `ls` lists them (source, shapes, size); "
                       "`clear` deletes them all, or the one named. The folder is $VAELAB_CACHE, else "
                       "~/.cache/vaelab/decoded.")
    p.add_argument("action", choices=["ls", "clear"], help="ls: list the entries; clear: delete them")
    p.add_argument("entry", nargs="?", help="clear: only this entry (a name `ls` prints)")
    p.set_defaults(func=cmd_cache)


def _explore_parser(sub) -> None:
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
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_explore)


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be an integer >= 1; got {n}")
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        _set_threads(getattr(args, "threads", None))
        with warnings.catch_warnings():
            # under torchrun, rank 0 speaks for all: the others would repeat its warnings word for word
            warnings.simplefilter("default" if env_rank() == 0 else "ignore")
            warnings.formatwarning = lambda msg, cat, *a, **k: f"vaelab: warning: {msg}\n"
            return args.func(args)
    except VaelabError as e:
        if reports(e):  # under torchrun: one line, from the process that has something to say
            say(e)
        return ERROR_STATUS
    except KeyboardInterrupt as e:
        if reports(e):
            print("vaelab: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except json.JSONDecodeError as e:
        print(f"vaelab: error: invalid JSON ({e})", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`vaelab info RUN | head`): nothing left to say, nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit, when Python flushes stdout
        return 141  # as a shell reports a process ended by SIGPIPE
    except OSError as e:  # a path the user gave cannot be read or written (missing, a file, no permission)
        where = f": {Path(e.filename)}" if e.filename else ""
        print(f"vaelab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
