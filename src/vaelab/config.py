"""Typed configuration: one dataclass, saved as config.json in every run and used to rebuild the model."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal, get_args

from .errors import ConfigError
from .models.likelihoods import LIKELIHOODS, check_likelihood
from .models.nets import DEFAULT_BLOCKS, DEFAULT_HIDDEN

DEFAULT_LR = {"mlp": 1e-3, "conv": 5e-4}
DEFAULT_BATCH = {"mlp": 128, "conv": 64}

Arch = Literal["mlp", "conv"]
Binarize = Literal["none", "dynamic", "static"]
Device = Literal["auto", "cpu", "cuda"]
Optimizer = Literal["adam", "sgd"]
Precision = Literal["fp32", "bf16"]
Background = Literal["white", "black"]


def option(default, help: str, group: str, flag: bool = True, metavar: str | None = None):
    """A TrainConfig field with the help text and group of its CLI flag: the one place both are written."""
    meta = {"help": help, "group": group, "cli": flag, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a run needs; saved as config.json and used to rebuild the model. Each field is a CLI flag of
    `vaelab train` (--data-dir for data_dir) with the help text and default written here."""

    # data
    dataset: str = option("fashion-mnist", "mnist, fashion-mnist, cifar10, dsprites, celeba (a local folder), shapes "
                          "(generated), a .npz/.npy file or an image folder", "data")
    data_dir: str | None = option(None, "folder holding the files of a named dataset (looked at first; then "
                                  "$VAELAB_DATA, the user cache ~/.cache/vaelab, system copies, then a download)",
                                  "data")
    limit: int | None = option(None, "train on the first N training images only", "data", metavar="N")
    binarize: Binarize = option("none", "turn grey pixels into 0/1: a fresh draw per step (dynamic) or one fixed "
                                "draw (static); for the Bernoulli likelihood", "data")
    image_size: str | None = option(None, "image folders: resize the shorter side to N (antialiased) and centre-crop "
                                    "to N x N, or to H x W with HxW (needed when images differ in size)", "data",
                                    metavar="N|HxW")
    center_crop: str | None = option(None, "image folders: crop the centre N x N (or HxW) before resizing (CelebA's "
                                     "usual 140 with --image-size 64)", "data", metavar="N|HxW")
    background: Background = option("white", "image folders: the colour transparent pixels are composited over",
                                     "data")
    skip_bad_images: bool = option(False, "image folders: leave out files that cannot be decoded (named in one "
                                   "warning) instead of stopping at the first", "data")
    # model
    arch: Arch = option("mlp", "encoder/decoder type: mlp (fully connected) or conv (stride-2 convolution "
                        "stages with residual blocks, sized from the images)", "model")
    hidden: list[int] | None = option(None, "mlp: hidden layer widths, e.g. 400 or 512,256 (default 400); conv: "
                                      "channels of the first stride-2 stage, doubled per stage (at most 8x) until "
                                      "the image is about 4x4 (default 32), or one number per stage, e.g. "
                                      "32,64,128", "model")
    blocks: int | None = option(None, "conv: residual blocks per stage (default 1; 0 for a plain conv net)",
                                "model", metavar="N")
    latent_dim: int = option(20, "dimensions of z", "model")
    likelihood: str = option("gaussian", "observation model p(x|z): " + ", ".join(LIKELIHOODS), "model")
    sigma: str | None = option(None, "the scale: a number (fixed), learned (one shared value, learned), "
                               "learned-pixel (one per pixel from the decoder) or, for gaussian, optimal (σ² = batch "
                               "MSE). Default 0.1 for gaussian and laplace, learned-pixel for the discretized ones",
                               "model")
    mixtures: int = option(1, "discretized-logistic: components of the per-pixel mixture", "model", metavar="K")
    # objective
    beta: float = option(1.0, "weight of the KL term in the training objective", "objective")
    kl_warmup: float = option(0.0, "raise the KL weight linearly from 0 to beta over this many epochs", "objective",
                              metavar="EPOCHS")
    free_bits: float = option(0.0, "lower bound on each latent dimension's batch-mean KL in the objective (nats)",
                              "objective", metavar="NATS")
    # optimisation
    optimizer: Optimizer = option("adam", "the optimizer", "optimisation")
    lr: float = option(None, "learning rate (default 1e-3 for mlp, 5e-4 for conv)", "optimisation")
    batch_size: int = option(None, "images per training step (default 128 for mlp, 64 for conv)", "optimisation")
    epochs: int = option(10, "total epochs; with --resume, the new total", "optimisation")
    seed: int = option(0, "seeds initialisation, shuffling and sampling", "optimisation")
    device: Device = option("auto", "auto: cuda when available", "optimisation")
    precision: Precision = option("fp32", "bf16: run the networks' matmuls in bfloat16 (torch.autocast), faster on "
                                  "GPUs and on CPUs with AVX-512-BF16 or AMX; z, the KL, the likelihood, weights and "
                                  "optimizer state stay float32 and every reported number is computed in float32",
                                  "optimisation")
    cuda_graph: bool = option(True, "on a GPU, record the training step once as a CUDA graph and replay it for "
                              "each full batch (same results, far fewer kernel launches); --no-cuda-graph launches "
                              "every kernel of every step (for profiling or debugging)", "optimisation")
    handwritten_grads: bool = option(True, "on a CPU, compute a plain MLP VAE's network gradients with vaelab's "
                                     "hand-written backward pass (the gradients autograd computes, with less "
                                     "per-step overhead); --no-handwritten-grads uses autograd", "optimisation")
    # run directory
    out: str | None = option(None, "run directory (default runs/<name>)", "run directory")
    name: str | None = option(None, "run name used for the default --out", "run directory")
    tensorboard: str | None = option(None, "also write each epoch's numbers and image grids (reconstructions, prior "
                                     "samples) to this folder, for `tensorboard --logdir DIR` (needs pip install "
                                     "'vaelab[tensorboard]')", "run directory", metavar="DIR")
    # filled in when training starts, so the model can be rebuilt from config.json alone
    data_shape: list[int] | None = option(None, "", "", flag=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            allowed = _literal_values(f.type)
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(allowed)}; got {value!r}")
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
        self.image_size = _size("image_size", self.image_size)
        self.center_crop = _size("center_crop", self.center_crop)
        # conv nets train with smaller steps: at 1e-3 and batch 128 a default conv run on `shapes` can fall into
        # a state that outputs one grey image; 5e-4 and batch 64 trained stably and reached a lower test MSE
        if self.lr is None:
            self.lr = DEFAULT_LR[self.arch]
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH[self.arch]
        _positive_int("latent_dim", self.latent_dim)
        _positive_int("batch_size", self.batch_size)
        _positive_int("epochs", self.epochs)
        if self.limit is not None:
            _positive_int("limit", self.limit)
        _positive_float("lr", self.lr)
        _positive_float("beta", self.beta, allow_zero=True)
        _positive_float("kl_warmup", self.kl_warmup, allow_zero=True)
        _positive_float("free_bits", self.free_bits, allow_zero=True)
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
              "Precision": Precision, "Background": Background}.get(tp)
    if tp is not None and typing.get_origin(tp) is Literal:
        return get_args(tp)
    return ()


def _size(name: str, value) -> str | None:
    """An image size as given (64, "64", "64x48", [64, 48]) -> "64" or "64x48" (height x width)."""
    if value is None:
        return None
    parts = list(value) if isinstance(value, list | tuple) else str(value).lower().replace("×", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) not in (1, 2) or any(v < 1 for v in sizes):
        raise ConfigError(f"{_flag(name)} must be a size such as 64 or 64x48 (height x width); got {value!r}")
    return "x".join(map(str, sizes)) if len(sizes) == 2 and sizes[0] != sizes[1] else str(sizes[0])


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
