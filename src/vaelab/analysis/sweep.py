"""Sweeps: one run per combination of training settings, each an ordinary run directory, compared on one page.

    vaelab sweep --set sigma=0.03,0.1,0.3,1 --set beta=1,4 --epochs 5 --out runs/sweep

`--set FIELD=V1,V2,...` names any setting of `vaelab train` (its flag without the dashes) and its values; the
sweep is the grid of every --set (or, with --zip, their values side by side). Each point is trained as
`vaelab train` would train it, in DIR/<its settings> (`sigma=0.1,beta=4`); a run that is there and complete is
reused, one with fewer epochs is resumed, so an interrupted sweep continues where it stopped. Each run is then
evaluated as `vaelab eval` evaluates it (vaelab.analysis.metrics.evaluate_run) and the runs are compared on
the rate–distortion plane (vaelab.analysis.sweep_page).

    torchrun --nproc-per-node 4 -m vaelab sweep --set sigma=0.03,0.1,0.3,1 --out runs/sweep

Under torchrun each process (rank) trains and evaluates its share of the runs (share: a batched ensemble is one
unit of work), each run as one process trains it (vaelab.training.distributed.alone); rank 0 gathers every
rank's numbers and writes the page.
"""

from __future__ import annotations

import datetime
import itertools
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import TrainConfig, flag_name
from ..config_base import positive_int
from ..errors import ConfigError, RunError, TrainingError
from ..runs import CHECKPOINT, CONFIG, WEIGHTS, Run, checkpoint_epoch, load_run, write_text_atomic
from ..training.build import check_hierarchies
from ..training.distributed import SINGLE, World, alone, env_local_rank, env_world_size, join
from ..training.ensemble import groups, train_ensemble
from ..training.trainer import resume, train
from .metrics import DEFAULT_IW_SAMPLES, evaluate_run
from .sweep_page import METRICS, images_text, value_text, write_page
from .sweep_settings import NOT_SWEPT, parse_set, setting_name, setting_value, sweepable


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its folder name, the swept settings' values and its whole config."""

    label: str
    values: dict[str, Any]
    config: TrainConfig


@dataclass(frozen=True, init=False)
class SweepConfig:
    """The settings every run shares (`train`), the swept settings (`axes`: flat name -> values, in order), and
    the sweep's own. SweepConfig({"sigma": [0.1, 1.0]}, epochs=3) or SweepConfig(["sigma=0.1,1"], epochs=3)."""

    train: TrainConfig
    axes: dict[str, list[Any]]
    zip: bool
    out: str
    iw_samples: int
    batched: bool  # train runs that can share a step as batched ensembles
    sample_quality: bool  # also score each run's samples (Fréchet distance, precision, recall), as eval does
    eval_limit: int | None  # evaluate each run on the first N test images (None: all), as `vaelab eval --limit`

    def __init__(self, sets: Mapping[str, Sequence[Any]] | Iterable[str], zip: bool = False,
                 out: str = "runs/sweep", iw_samples: int = DEFAULT_IW_SAMPLES, batched: bool = False,
                 sample_quality: bool = False, eval_limit: int | None = None, **settings: Any):
        axes: dict[str, list[Any]] = {}
        pairs = ([(setting_name(k), [setting_value(setting_name(k), v) if isinstance(v, str) else v for v in vs])
                  for k, vs in sets.items()] if isinstance(sets, Mapping) else [parse_set(s) for s in sets])
        for name, values in pairs:
            if name in axes:
                raise ConfigError(f"--set {name.replace('_', '-')} is given twice; list all its values in one --set")
            if not values:
                raise ConfigError(f"--set {name.replace('_', '-')} names no values")
            axes[name] = list(values)
        if not axes:
            raise ConfigError("a sweep needs at least one --set FIELD=V1,V2,... (e.g. --set sigma=0.1,0.3)")
        both = sorted(set(axes) & {k for k, v in settings.items() if v is not None})
        if both:
            raise ConfigError(f"{flag_name(both[0])} is swept by --set {both[0].replace('_', '-')}=...; give it "
                              "there only")
        lengths = {len(v) for v in axes.values()}
        if zip and len(lengths) > 1:
            raise ConfigError("--zip pairs the i-th values of every --set, so each must list as many values; got "
                              + ", ".join(f"{k.replace('_', '-')}: {len(v)}" for k, v in axes.items()))
        check_eval_settings(iw_samples, eval_limit)
        unknown = sorted(set(settings) - set(sweepable()))
        if unknown:
            raise ConfigError(f"unknown sweep settings {unknown}; allowed: {sweepable()}")
        train_config = TrainConfig(**{k: v for k, v in settings.items() if v is not None})
        for name, value in (("train", train_config), ("axes", axes), ("zip", bool(zip)), ("out", str(out)),
                            ("iw_samples", iw_samples), ("batched", bool(batched)),
                            ("sample_quality", bool(sample_quality)), ("eval_limit", eval_limit)):
            object.__setattr__(self, name, value)
        self.points()  # every point's config is built, and so checked, before anything trains

    def points(self) -> list[Point]:
        combos = zip(*self.axes.values(), strict=True) if self.zip else itertools.product(*self.axes.values())
        points, seen = [], set()
        for combo in combos:
            values = dict(zip(self.axes, combo, strict=True))
            label = ",".join(f"{k.replace('_', '-')}={value_text(v)}" for k, v in values.items())
            if label in seen:
                continue
            seen.add(label)
            points.append(Point(label, values, self.train.replace(**values, out=str(Path(self.out) / label))))
        return points

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "axes": self.axes, "zip": self.zip, "out": self.out,
                "iw_samples": self.iw_samples, "batched": self.batched, "sample_quality": self.sample_quality,
                "eval_limit": self.eval_limit}


def check_eval_settings(iw_samples: int, eval_limit: int | None) -> None:
    """A sweep's or a σ study's --iw-samples and --eval-limit, checked before anything trains."""
    if not isinstance(iw_samples, int) or isinstance(iw_samples, bool) or iw_samples < 1:
        raise ConfigError(f"--iw-samples must be an integer >= 1; got {iw_samples!r}")
    if eval_limit is not None:
        positive_int("eval_limit", eval_limit)


def ensure_run(config: TrainConfig, progress: bool) -> tuple[Run, str]:
    """The run at config's --out, trained as `config` says: (run, what was done: trained, resumed or reused).

    A run there with the same settings is reused when complete and resumed when shorter (or interrupted); one
    with other settings is refused."""
    assert config.runtime.out is not None, "every run of a sweep has its own folder"
    out = Path(config.runtime.out)
    if not (out / CONFIG).exists():
        return train(config, progress=progress), "trained"
    saved, wanted = TrainConfig.load(out / CONFIG).settings(), config.settings()
    # a run is reused when everything but where and how long it runs matches
    free = {*config.runtime.to_dict(), "epochs", "data_shape"}
    diff = [k for k in wanted if k not in free and saved.get(k) != wanted[k]]
    if diff:
        raise ConfigError(f"{out} holds a run with different settings ({', '.join(diff)}); use another --out "
                          "or remove it")
    if not (out / CHECKPOINT).exists():  # interrupted before its first checkpoint: start over
        (out / CONFIG).unlink()
        return train(config, progress=progress), "trained"
    if not (out / WEIGHTS).exists():  # interrupted inside epoch 1
        return resume(out, progress=progress, epochs=config.optim.epochs), "resumed"
    run = load_run(out)
    done = run.metrics[-1]["epoch"] if run.metrics else 0
    if done < config.optim.epochs:
        return resume(out, progress=progress, epochs=config.optim.epochs), "resumed"
    return run, "reused"


@dataclass
class Outcome:
    """What became of one point: its run and evaluation (`vaelab eval`'s numbers), or why it failed."""

    point: Point
    action: str  # trained, resumed, reused or failed
    run: Run | None = None
    numbers: dict | None = None
    error: str | None = None


def _weights_key(run: Run) -> list[int]:
    stat = (run.path / WEIGHTS).stat()
    return [stat.st_mtime_ns, stat.st_size]


def evaluate_once(run: Run, iw_samples: int, previous: dict | None, tell, sample_quality: bool = False,
                  limit: int | None = None) -> dict:
    """evaluate_run's numbers for the test split, its first `limit` images (None: all) as `vaelab eval --limit`
    takes them (also written to the run's eval.json), with the sample-quality scores if asked; the sweep's
    previous ones where the weights have not changed since (same file time and size) and the same numbers were
    asked for (same K, same images; a record without a limit was of all the images)."""
    if (previous and previous.get("weights") == _weights_key(run) and previous.get("iw_samples") == iw_samples
            and previous.get("limit") == limit
            and (not sample_quality or "sample_quality" in previous["numbers"])):
        return previous["numbers"]
    tell(f"evaluating {run.path.name} (IWAE K={iw_samples}, {images_text(None, limit)})")
    run.model.eval()
    numbers = evaluate_run(run, "test", iw_samples, limit=limit, sample_quality=sample_quality)
    write_text_atomic(run.path / "eval.json", json.dumps(numbers, indent=2) + "\n")
    return numbers


def work_units(points: list[Point], batched: bool) -> list[list[int]]:
    """The sweep's units of work, as indices of `points`: with `batched`, the points not started yet whose networks
    have the same shapes form one unit each (a batched ensemble, vaelab.training.ensemble), first; every other
    point is a unit of its own, in order."""
    if not batched:
        return [[i] for i in range(len(points))]
    fresh = [i for i, p in enumerate(points) if not (Path(str(p.config.runtime.out)) / CONFIG).exists()]
    together = [[fresh[g] for g in group] for group in groups([points[i].config for i in fresh]) if len(group) > 1]
    taken = {i for unit in together for i in unit}
    return together + [[i] for i in range(len(points)) if i not in taken]


def train_units(points: list[Point], units: list[list[int]], progress: bool, tell) -> dict[int, Outcome]:
    """Train, resume or reuse the points of each unit (a unit of several is one batched ensemble), by index; a
    point whose training fails (a non-finite loss) is recorded as failed and the others go on."""
    done: dict[int, Outcome] = {}
    for unit in units:
        if len(unit) > 1:
            tell(f"training {len(unit)} runs as one batched ensemble: {'; '.join(points[i].label for i in unit)}")
            results = train_ensemble([points[i].config for i in unit], progress)
            for i, result in zip(unit, results, strict=True):
                done[i] = (Outcome(points[i], "trained", result) if isinstance(result, Run) else
                           Outcome(points[i], "failed", error=result))
            continue
        p = points[unit[0]]
        tell(f"[{unit[0] + 1}/{len(points)}] {p.label}")
        try:
            run, action = ensure_run(p.config, progress)
        except TrainingError as e:
            tell(f"{p.label} failed: {e}")
            done[unit[0]] = Outcome(p, "failed", error=str(e))
            continue
        tell(f"{p.label}: {action}")
        done[unit[0]] = Outcome(p, action, run)
    return done


def sweep_row(o: Outcome) -> dict[str, Any]:
    """A run's line of the table: its name, the swept settings' values, and its numbers (None where it failed)."""
    row: dict[str, Any] = {"run": o.point.label, **{k.replace("_", "-"): v for k, v in o.point.values.items()}}
    n = o.numbers
    if n is None:
        return {**row, **{k: None for _, k, _ in METRICS}, "error": o.error}
    return {**row, "loss": -n["elbo"], "rate": n["kl"], "distortion": n["rec"], "log_px": n["log_px"],
            "bits_per_dim": n["bits_per_dim"], "active_units": n["active_units"], "mse": n["mse"],
            "sharpness_recon": n["sharpness"]["recon"], "sharpness_samples": n["sharpness"]["samples"],
            "sample_fd": (n.get("sample_quality") or {}).get("prior", {}).get("fd"), "iw_samples": n["iw_samples"],
            "n_images": n.get("n_images")}


LOG = "sweep.json"  # the sweep's record: its config and, per run, what was done and its evaluation


def read_record(out: Path) -> dict[str, dict]:
    try:
        return {r["run"]: r for r in json.loads((out / LOG).read_text()).get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# how long a rank that has done its share waits for the others' (a sweep's runs may take days); a rank that dies
# is noticed at once, torchrun stopping the others
SWEEP_WAIT = datetime.timedelta(days=7)


def epochs_to_train(point: Point) -> int:
    """The epochs its run still needs: all of them for one not started, none for one complete."""
    checkpoint = Path(str(point.config.runtime.out)) / CHECKPOINT
    try:
        done = checkpoint_epoch(checkpoint) if checkpoint.exists() else 0
    except RunError:
        done = 0
    return max(point.config.optim.epochs - done, 0)


def assign(costs: Sequence[float], size: int) -> list[int]:
    """The rank that does each unit of work, from the units' costs: the costliest first (ties: the earlier unit),
    each to the rank with the least work so far (ties: the lower rank), so the ranks finish close together. Equal
    costs deal the units out in turn: unit i to rank i % size."""
    load = [0.0] * size
    ranks = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        ranks[i] = min(range(size), key=lambda r: (load[r], r))
        load[ranks[i]] += costs[i]
    return ranks


def share(points: list[Point], batched: bool, world: World) -> list[list[int]]:
    """This rank's units of work. Rank 0 splits them, each costing the epochs its runs still train plus one per
    run for its evaluation, and sends the split to the others: every rank works from rank 0's view of OUT."""
    units = work_units(points, batched)
    if world.size == 1:
        return units
    box: list[Any] = [None]
    if world.main:
        box = [list(zip(units, assign([sum(epochs_to_train(points[i]) + 1 for i in u) for u in units], world.size),
                        strict=True))]
    dist.broadcast_object_list(box, src=0)
    return [unit for unit, rank in box[0] if rank == world.rank]


def own_share(points: list[Point], units: list[list[int]], out: Path, iw_samples: int, sample_quality: bool,
              rank: int, progress: bool, tell, eval_limit: int | None = None) -> tuple[list[dict], dict[int, Run]]:
    """Train and evaluate this rank's units (each run on the first `eval_limit` test images, None: all): (their
    lines of the record with "index", their runs by index). The runs train as runs of one process (alone),
    whatever torchrun's environment says."""
    previous = read_record(out)
    with alone():
        done = train_units(points, units, progress, tell)
    lines, runs = [], {}
    for i, o in sorted(done.items()):
        if o.run is not None:
            o.numbers = evaluate_once(o.run, iw_samples, previous.get(o.point.label, {}).get("eval"), tell,
                                      sample_quality, eval_limit)
            runs[i] = o.run
        lines.append({"index": i, "run": o.point.label, "settings": o.point.values, "action": o.action,
                      "error": o.error, "rank": rank,
                      "eval": None if o.run is None else {"weights": _weights_key(o.run), "iw_samples": iw_samples,
                                                          "limit": eval_limit, "numbers": o.numbers}})
    return lines, runs


def train_shared(points: list[Point], out: Path, iw_samples: int, name: str, batched: bool = False,
                 sample_quality: bool = False, progress: bool = True,
                 eval_limit: int | None = None) -> tuple[bool, list[dict], dict[int, Run]]:
    """Train (or reuse) and evaluate every point, each on the first `eval_limit` test images (None: all):
    (whether this process writes the results, every point's line of the record in the points' order, the runs
    this process holds by index; a failed point's line has "eval" None). Under torchrun each process (rank)
    trains and evaluates its share, each run as one process trains it, and every rank gets every line; `name`
    begins the progress lines (`vaelab sweep`)."""
    world = join(torch.device("cpu"), timeout=SWEEP_WAIT)[0] if env_world_size() > 1 else SINGLE
    if world.size > 1 and torch.cuda.is_available():  # each rank's runs on its own GPU (device cuda/auto)
        torch.cuda.set_device(env_local_rank() % torch.cuda.device_count())
    who = f" (rank {world.rank} of {world.size})" if world.size > 1 else ""

    def tell(msg: str) -> None:
        if progress:
            print(f"{name}{who}: {msg}", file=sys.stderr, flush=True)

    def lost() -> str:
        return "run the same command again to finish (finished runs are reused)"

    def work() -> tuple[list[dict], dict[int, Run]]:
        # one process: each run's epoch lines; several: each rank says which run it starts and how it ended
        done = own_share(points, share(points, batched, world), out, iw_samples, sample_quality, world.rank,
                         progress and world.size == 1, tell, eval_limit)
        if world.size > 1:
            tell("its share of the runs is done; waiting for the other ranks")
        return done

    try:
        with world.watch(lost):
            lines, runs = world.agree(work)  # one rank fails (not a run's non-finite loss): all stop
            if world.size > 1:
                parts: list[Any] = [None] * world.size
                dist.all_gather_object(parts, lines)
                lines = sorted((line for part in parts for line in part), key=lambda line: line["index"])
    finally:
        world.close()
    return world.main, lines, runs


def sweep(cfg: SweepConfig, progress: bool = True) -> Path:
    """Train (or reuse) every point, evaluate each run, write the comparison (index.html, table.md, table.csv,
    figures) and the record sweep.json into cfg.out; return the path of index.html.

    Under torchrun each process (rank) trains and evaluates its share of the runs, each run as one process
    trains it; rank 0 waits for the others, then writes the page alone."""
    out = Path(cfg.out)
    points = cfg.points()
    check_hierarchies([point.config for point in points])
    out.mkdir(parents=True, exist_ok=True)
    main, lines, runs = train_shared(points, out, cfg.iw_samples, "vaelab sweep", cfg.batched, cfg.sample_quality,
                                     progress, cfg.eval_limit)
    if all(line["eval"] is None for line in lines):
        raise TrainingError("every run of the sweep failed: " + "; ".join(f"{line['run']}: {line['error']}"
                                                                          for line in lines))
    if not main:
        return out / "index.html"
    return write_sweep(cfg, points, lines, runs)


def write_sweep(cfg: SweepConfig, points: list[Point], lines: list[dict], runs: dict[int, Run]) -> Path:
    """The page, the tables and sweep.json from every run's line of the record (`runs`: those this process holds;
    the others are read from their folders for their prior samples)."""
    out = Path(cfg.out)
    outcomes = [Outcome(points[line["index"]], line["action"], None, (line["eval"] or {}).get("numbers"),
                        line["error"]) for line in lines]
    models = [(o.point.label, (runs[line["index"]] if line["index"] in runs else load_run(out / o.point.label)).model)
              for o, line in zip(outcomes, lines, strict=True) if line["eval"] is not None]
    record = {"config": cfg.to_dict(), "runs": [{k: v for k, v in line.items() if k != "index"} for line in lines]}
    t = cfg.train
    hidden = (*NOT_SWEPT, "data_shape", "net_version")  # not flags: what the run itself records
    shared = ", ".join(f"{flag_name(k)} {value_text(v)}" for k, v in t.settings().items()
                       if k not in cfg.axes and k not in hidden and v not in (None, False))
    fields = [k.replace("_", "-") for k in cfg.axes]
    page = write_page(out, [sweep_row(o) for o in outcomes], fields, models,
                      f"vaelab sweep over {', '.join(fields)}: {t.data.dataset}, {t.optim.epochs} epochs", shared,
                      cfg.eval_limit)
    write_text_atomic(out / LOG, json.dumps(record, indent=2) + "\n")
    return page


__all__ = ["Outcome", "Point", "SweepConfig", "ensure_run", "parse_set", "sweep", "sweepable"]
