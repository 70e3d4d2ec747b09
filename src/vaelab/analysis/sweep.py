"""Sweeps: one run per combination of training settings, each an ordinary run directory, compared on one page.

    vaelab sweep --set sigma=0.03,0.1,0.3,1 --set beta=1,4 --epochs 5 --out runs/sweep

`--set FIELD=V1,V2,...` names any setting of `vaelab train` (its flag without the dashes) and its values; the
sweep is the grid of every --set (or, with --zip, their values side by side). Each point is trained as
`vaelab train` would train it, in DIR/<its settings> (`sigma=0.1,beta=4`); a run that is there and complete is
reused, one with fewer epochs is resumed, so an interrupted sweep continues where it stopped. Each run is then
evaluated as `vaelab eval` evaluates it (vaelab.analysis.metrics.evaluate_run) and the runs are compared on
the rate–distortion plane (vaelab.analysis.sweep_page).
"""

from __future__ import annotations

import itertools
import json
import sys
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, field_named, flag_fields, flag_name
from ..errors import ConfigError, TrainingError
from ..flags import _flag_type
from ..runs import CHECKPOINT, CONFIG, WEIGHTS, Run, load_run, write_text_atomic
from ..training.distributed import env_world_size
from ..training.ensemble import groups, train_ensemble
from ..training.trainer import resume, train
from .metrics import DEFAULT_IW_SAMPLES, evaluate_run
from .sweep_page import METRICS, value_text, write_page

NOT_SWEPT = ("out", "name", "tensorboard")  # where a run is written is the sweep's choice
LIST_SEPARATOR = "/"  # between the values of a list-valued setting: --set hidden=400/512,256


def sweepable() -> list[str]:
    """The settings --set accepts, by flat name: every flag of `vaelab train` but where runs are written."""
    return [f.name for _, f in flag_fields() if f.name not in NOT_SWEPT]


def _is_list(name: str) -> bool:
    role, _ = field_named(name)
    tp = typing.get_type_hints(role)[name]
    return any(typing.get_origin(t) is list for t in (tp, *typing.get_args(tp)))


def _field(text: str) -> str:
    name = text.strip().lstrip("-").replace("-", "_")
    if name not in sweepable():
        allowed = ", ".join(n.replace("_", "-") for n in sweepable())
        raise ConfigError(f"--set: {text!r} is not a training setting; allowed: {allowed}")
    return name


def _value(name: str, text: str) -> Any:
    """One value of --set as the flag of `vaelab train` would read it (the config then checks it)."""
    role, _ = field_named(name)
    kind = _flag_type(typing.get_type_hints(role)[name])
    text = text.strip()
    try:
        if kind is bool:
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        return kind(text) if kind in (int, float) else text
    except (KeyError, ValueError) as e:
        what = "true or false" if kind is bool else f"{'an integer' if kind is int else 'a number'}"
        raise ConfigError(f"--set {name.replace('_', '-')}: each value must be {what}; got {text!r}") from e


def parse_set(text: str) -> tuple[str, list[Any]]:
    """'FIELD=V1,V2,...' -> (flat name, values); list-valued settings separate their values with '/'."""
    if "=" not in text:
        raise ConfigError(f"--set must be FIELD=V1,V2,... such as sigma=0.1,0.3; got {text!r}")
    key, _, rest = text.partition("=")
    name = _field(key)
    parts = [p for p in rest.split(LIST_SEPARATOR if _is_list(name) else ",") if p.strip()]
    if not parts:
        raise ConfigError(f"--set {key.strip()}= names no values; give them as {key.strip()}=V1,V2,...")
    return name, [_value(name, p) for p in parts]


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

    def __init__(self, sets: Mapping[str, Sequence[Any]] | Iterable[str], zip: bool = False,
                 out: str = "runs/sweep", iw_samples: int = DEFAULT_IW_SAMPLES, batched: bool = False,
                 sample_quality: bool = False, **settings: Any):
        axes: dict[str, list[Any]] = {}
        pairs = ([(_field(k), [_value(_field(k), v) if isinstance(v, str) else v for v in vs])
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
        if not isinstance(iw_samples, int) or isinstance(iw_samples, bool) or iw_samples < 1:
            raise ConfigError(f"--iw-samples must be an integer >= 1; got {iw_samples!r}")
        unknown = sorted(set(settings) - set(sweepable()))
        if unknown:
            raise ConfigError(f"unknown sweep settings {unknown}; allowed: {sweepable()}")
        train_config = TrainConfig(**{k: v for k, v in settings.items() if v is not None})
        for name, value in (("train", train_config), ("axes", axes), ("zip", bool(zip)), ("out", str(out)),
                            ("iw_samples", iw_samples), ("batched", bool(batched)),
                            ("sample_quality", bool(sample_quality))):
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
                "iw_samples": self.iw_samples, "batched": self.batched, "sample_quality": self.sample_quality}


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


def evaluate_once(run: Run, iw_samples: int, previous: dict | None, tell, sample_quality: bool = False) -> dict:
    """evaluate_run's numbers for the test split (also written to the run's eval.json), with the sample-quality
    scores if asked; the sweep's previous ones where the weights have not changed since (same file time and size)
    and the same numbers were asked for."""
    if (previous and previous.get("weights") == _weights_key(run) and previous.get("iw_samples") == iw_samples
            and (not sample_quality or "sample_quality" in previous["numbers"])):
        return previous["numbers"]
    tell(f"evaluating {run.path.name} (IWAE K={iw_samples})")
    run.model.eval()
    numbers = evaluate_run(run, "test", iw_samples, sample_quality=sample_quality)
    write_text_atomic(run.path / "eval.json", json.dumps(numbers, indent=2) + "\n")
    return numbers


def train_batched(points: list[Point], progress: bool, tell) -> dict[int, Outcome]:
    """The points not started yet whose networks have the same shapes, trained together as batched ensembles
    (vaelab.training.ensemble), by index; the others are left to train_points."""
    fresh = [i for i, p in enumerate(points) if not (Path(str(p.config.runtime.out)) / CONFIG).exists()]
    done = {}
    for group in groups([points[i].config for i in fresh]):
        if len(group) < 2:
            continue
        idx = [fresh[g] for g in group]
        tell(f"training {len(idx)} runs as one batched ensemble: {'; '.join(points[i].label for i in idx)}")
        results = train_ensemble([points[i].config for i in idx], progress)
        for i, result in zip(idx, results, strict=True):
            done[i] = (Outcome(points[i], "trained", result) if isinstance(result, Run) else
                       Outcome(points[i], "failed", error=result))
    return done


def train_points(points: list[Point], progress: bool, tell, batched: bool = False) -> list[Outcome]:
    """Train, resume or reuse each point in turn (with `batched`, fresh points that can share a step first, as
    ensembles); a point whose training fails (a non-finite loss) is recorded as failed and the others go on."""
    done = train_batched(points, progress, tell) if batched else {}
    outcomes = []
    for i, p in enumerate(points, 1):
        if i - 1 in done:
            outcomes.append(done[i - 1])
            continue
        tell(f"[{i}/{len(points)}] {p.label}")
        try:
            run, action = ensure_run(p.config, progress)
        except TrainingError as e:
            tell(f"{p.label} failed: {e}")
            outcomes.append(Outcome(p, "failed", error=str(e)))
            continue
        tell(f"{p.label}: {action}")
        outcomes.append(Outcome(p, action, run))
    return outcomes


def sweep_row(o: Outcome) -> dict[str, Any]:
    """A run's line of the table: its name, the swept settings' values, and its numbers (None where it failed)."""
    row: dict[str, Any] = {"run": o.point.label, **{k.replace("_", "-"): v for k, v in o.point.values.items()}}
    n = o.numbers
    if n is None:
        return {**row, **{k: None for _, k, _ in METRICS}, "error": o.error}
    return {**row, "loss": -n["elbo"], "rate": n["kl"], "distortion": n["rec"], "log_px": n["log_px"],
            "bits_per_dim": n["bits_per_dim"], "active_units": n["active_units"], "mse": n["mse"],
            "sharpness_recon": n["sharpness"]["recon"], "sharpness_samples": n["sharpness"]["samples"],
            "sample_fd": (n.get("sample_quality") or {}).get("prior", {}).get("fd"), "iw_samples": n["iw_samples"]}


LOG = "sweep.json"  # the sweep's record: its config and, per run, what was done and its evaluation


def read_record(out: Path) -> dict[str, dict]:
    try:
        return {r["run"]: r for r in json.loads((out / LOG).read_text()).get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def sweep(cfg: SweepConfig, progress: bool = True) -> Path:
    """Train (or reuse) every point, evaluate each run, write the comparison (index.html, table.md, table.csv,
    figures) and the record sweep.json into cfg.out; return the path of index.html."""
    if env_world_size() > 1:
        raise ConfigError("vaelab sweep trains its runs one after another in one process; run it without "
                          "torchrun (each run of a sweep can be trained with torchrun ... vaelab train)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    def tell(msg: str) -> None:
        if progress:
            print(f"vaelab sweep: {msg}", file=sys.stderr, flush=True)

    previous = read_record(out)
    outcomes = train_points(cfg.points(), progress, tell, cfg.batched)
    if all(o.run is None for o in outcomes):
        raise TrainingError("every run of the sweep failed: " + "; ".join(f"{o.point.label}: {o.error}"
                                                                          for o in outcomes))
    for o in outcomes:
        if o.run is not None:
            o.numbers = evaluate_once(o.run, cfg.iw_samples, previous.get(o.point.label, {}).get("eval"), tell,
                                      cfg.sample_quality)
    record = {"config": cfg.to_dict(), "runs": [
        {"run": o.point.label, "settings": o.point.values, "action": o.action, "error": o.error,
         "eval": None if o.run is None else {"weights": _weights_key(o.run), "iw_samples": cfg.iw_samples,
                                             "numbers": o.numbers}} for o in outcomes]}
    t = cfg.train
    shared = ", ".join(f"{flag_name(k)} {value_text(v)}" for k, v in t.settings().items()
                       if k not in cfg.axes and k not in (*NOT_SWEPT, "data_shape") and v not in (None, False))
    fields = [k.replace("_", "-") for k in cfg.axes]
    page = write_page(out, [sweep_row(o) for o in outcomes], fields,
                      [(o.point.label, o.run.model) for o in outcomes if o.run is not None],
                      f"vaelab sweep over {', '.join(fields)}: {t.data.dataset}, {t.optim.epochs} epochs", shared)
    write_text_atomic(out / LOG, json.dumps(record, indent=2) + "\n")
    return page


__all__ = ["Outcome", "Point", "SweepConfig", "ensure_run", "parse_set", "sweep", "sweepable"]
