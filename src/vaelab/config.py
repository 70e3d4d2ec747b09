"""Typed configuration: one dataclass, saved as config.json in every run and used to rebuild the model."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Literal, get_args

Arch = Literal["mlp", "conv"]
Binarize = Literal["none", "dynamic", "static"]
Device = Literal["auto", "cpu", "cuda"]
Optimizer = Literal["adam", "sgd"]
Precision = Literal["fp32", "bf16"]


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the message names the value and what is allowed."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "fashion-mnist"  # a registered name or a path (.npz, .npy, image folder)
    data_dir: str | None = None
    limit: int | None = None  # train on the first N training images
    binarize: Binarize = "none"
    # model
    arch: Arch = "mlp"
    hidden: list[int] | None = None  # mlp: layer widths (default 400); conv: stage channels (default 32, doubling)
    blocks: int | None = None  # conv: residual blocks per stage (default 1); mlp: none
    latent_dim: int = 20
    likelihood: str = "gaussian"
    sigma: str | None = None  # a number, "learned", "learned-pixel" or "optimal" (gaussian); default per likelihood
    mixtures: int = 1  # discretized-logistic: components per pixel
    # objective
    beta: float = 1.0
    kl_warmup: float = 0.0  # epochs of linear warm-up from 0 to beta
    free_bits: float = 0.0  # nats per latent dimension
    # optimisation
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "fp32"  # bf16: the networks' matmuls under bfloat16 autocast; all else float32
    # run directory
    out: str | None = None
    name: str | None = None
    # filled in when training starts, so the model can be rebuilt from config.json alone
    data_shape: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            allowed = _literal_values(f.type)
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(allowed)}; got {value!r}")
        from .nets import DEFAULT_BLOCKS, DEFAULT_HIDDEN  # late import: nets imports torch

        if self.hidden is None:
            self.hidden = list(DEFAULT_HIDDEN[self.arch])
        if isinstance(self.hidden, str):
            self.hidden = parse_hidden(self.hidden)
        self.hidden = [int(h) for h in self.hidden]
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(f"--hidden must be positive layer sizes such as 400 or 512,256; got {self.hidden}")
        if self.blocks is None:
            self.blocks = DEFAULT_BLOCKS[self.arch]
        _positive_int("blocks", self.blocks, allow_zero=True)
        if self.arch == "mlp" and self.blocks:
            raise ConfigError(f"--blocks (residual blocks per stage) applies to --arch conv only; got {self.blocks} "
                              "with --arch mlp")
        _positive_int("latent_dim", self.latent_dim)
        _positive_int("batch_size", self.batch_size)
        _positive_int("epochs", self.epochs)
        if self.limit is not None:
            _positive_int("limit", self.limit)
        _positive_float("lr", self.lr)
        _positive_float("beta", self.beta, allow_zero=True)
        _positive_float("kl_warmup", self.kl_warmup, allow_zero=True)
        _positive_float("free_bits", self.free_bits, allow_zero=True)
        from .likelihoods import LIKELIHOODS, check_likelihood  # late import: likelihoods imports torch

        if self.sigma is None and self.likelihood in LIKELIHOODS:
            self.sigma = LIKELIHOODS[self.likelihood].default_sigma
        self.sigma = str(self.sigma)
        check_likelihood(self.likelihood, self.sigma, self.mixtures)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; allowed keys: {sorted(known)}")
        return cls(**d)

    def save(self, path) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path) -> TrainConfig:
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def parse_hidden(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as e:
        raise ConfigError(f"--hidden must be comma-separated positive integers such as 512,256; got {text!r}") from e
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"--hidden must be comma-separated positive integers such as 512,256; got {text!r}")
    return sizes


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _literal_values(tp) -> tuple:
    if isinstance(tp, str):
        tp = {"Arch": Arch, "Binarize": Binarize, "Device": Device, "Optimizer": Optimizer,
              "Precision": Precision}.get(tp)
    if tp is not None and typing.get_origin(tp) is Literal:
        return get_args(tp)
    return ()


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{_flag(name)} must be an integer {bound}; got {value!r}")


def _positive_float(name: str, value, allow_zero: bool = False) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{_flag(name)} must be a finite number {bound}; got {value!r}")
