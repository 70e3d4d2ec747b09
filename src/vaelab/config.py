"""Typed configuration, one dataclass per role, saved as config.json in every run and used to rebuild the model.

    DataConfig      what to train on and how it is read
    ModelConfig     the networks, the latent space and the observation model p(x|z)
    OptimConfig     the objective and how it is minimised
    RuntimeConfig   where and how the run executes and where it is written

Each field declares, once, its default, its help text and (through a Literal type or a registry) its allowed
values; the CLI's flags, choices and help, and validation, are generated from these declarations. Configs are
frozen: functions that need another setting build a new config (`TrainConfig.replace`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config_base import Role, _size, option, positive_float, positive_int
from .config_base import choices_of as choices_of  # re-exported: flags, sweeps and callers read them here
from .config_base import flag_name as flag_name
from .config_base import parse_hidden as parse_hidden
from .errors import ConfigError
from .models.factor_objectives import check_model_for, check_own_settings
from .models.likelihoods import LIKELIHOODS, check_likelihood
from .models.nets import DEFAULT_BLOCKS, DEFAULT_HIDDEN, NET_VERSION
from .models.objective import OBJECTIVES, ObjectiveSettings, make_objective
from .models.priors import DEFAULT_COMPONENTS, check_prior

DEFAULT_LR = {"mlp": 1e-3, "conv": 5e-4, "hierarchical": 1e-3}
DEFAULT_BATCH = {"mlp": 128, "conv": 16, "hierarchical": 32}

Arch = Literal["mlp", "conv", "hierarchical"]
Binarize = Literal["none", "dynamic", "static"]
Device = Literal["auto", "cpu", "cuda"]
Optimizer = Literal["adam", "sgd"]
Precision = Literal["fp32", "bf16"]
Background = Literal["white", "black"]
PriorName = Literal["standard", "mog", "vamp"]
IWGrad = Literal["standard", "dreg"]
FreeBitsPer = Literal["dim", "group"]
LRSchedule = Literal["constant", "cosine"]

# keys that config.json files of earlier versions hold and that no longer mean anything
RETIRED_KEYS = ("handwritten_grads",)


@dataclass(frozen=True)
class DataConfig(Role):
    title = "data"
    dataset: str = option("fashion-mnist", "mnist, fashion-mnist, cifar10, dsprites, celeba (a local folder), shapes "
                          "(generated), a .npz/.npy file or an image folder")
    data_dir: str | None = option(None, "folder holding the files of a named dataset (looked at first; then "
                                  "$VAELAB_DATA, the user cache ~/.cache/vaelab, system copies, then a download)")
    limit: int | None = option(None, "train on the first N training images only", metavar="N")
    binarize: Binarize = option("none", "turn grey pixels into 0/1: a fresh draw per step (dynamic) or one fixed "
                                "draw (static); for the Bernoulli likelihood")
    image_size: str | None = option(None, "image folders: resize the shorter side to N (antialiased) and centre-crop "
                                    "to N x N, or to H x W with HxW (needed when images differ in size)",
                                    metavar="N|HxW")
    center_crop: str | None = option(None, "image folders: crop the centre N x N (or HxW) before resizing (CelebA's "
                                     "usual 140 with --image-size 64)", metavar="N|HxW")
    background: Background = option("white", "image folders: the colour transparent pixels are composited over")
    skip_bad_images: bool = option(False, "image folders: leave out files that cannot be decoded (named in one "
                                   "warning) instead of stopping at the first")

    def __post_init__(self) -> None:
        self._check_choices()
        if self.limit is not None:
            positive_int("limit", self.limit)
        self._set("image_size", _size("image_size", self.image_size))
        self._set("center_crop", _size("center_crop", self.center_crop))


@dataclass(frozen=True)
class ModelConfig(Role):
    title = "model"
    arch: Arch = option("mlp", "encoder/decoder type: mlp (fully connected), conv (stride-2 convolution "
                        "stages with residual blocks, sized from the images) or hierarchical (a top-down "
                        "hierarchy of latent groups from 1x1 up to 16x16, VDVAE-style)")
    hidden: list[int] | None = option(None, "mlp: hidden layer widths, e.g. 400 or 512,256 (default 400); conv: "
                                      "channels of the first stride-2 stage, doubled per stage (at most 8x) until "
                                      "the image is about 4x4 (default 32), or one number per stage, e.g. "
                                      "32,64,128")
    blocks: int | None = option(None, "conv: residual blocks per stage (default 1; 0 for a plain conv net); "
                                "hierarchical: bottleneck blocks per encoder stage and per decoder size above the "
                                "latents (default 1)",
                                metavar="N")
    groups: list[int] | int | None = option(None, "hierarchical: latent groups per resolution: one count for every "
                                            "resolution, or one per resolution, top (1x1) first, e.g. 1,2,4,1; "
                                            "0 leaves a resolution without latents, e.g. 1,2,4,0 (default 1)",
                                            metavar="N|N,N,...")
    latent_dim: int = option(20, "dimensions of z (hierarchical: channels of each latent group, so the 1x1 top "
                             "group has this many)")
    likelihood: str = option("gaussian", "observation model p(x|z)", choices=lambda: tuple(LIKELIHOODS))
    sigma: str | None = option(None, "the scale: a number (fixed), learned (one shared value, learned), "
                               "learned-pixel (one per pixel from the decoder) or, for gaussian, optimal (σ² = batch "
                               "MSE). Default 0.1 for gaussian and laplace, learned-pixel for the discretized ones")
    mixtures: int = option(1, "discretized-logistic: components of the per-pixel mixture", metavar="K")
    prior: PriorName = option("standard", "p(z): standard (N(0, I)), mog (a mixture of K learned Gaussians) or vamp "
                              "(the VampPrior: the encoder's posteriors at K learned pseudo-inputs); the KL of a "
                              "learned prior is estimated at the sampled z")
    prior_components: int | None = option(None, "mog and vamp: K, the prior's components (default "
                                           f"{DEFAULT_COMPONENTS['mog']} for mog, {DEFAULT_COMPONENTS['vamp']} for "
                                           "vamp)", metavar="K")
    # filled in when training starts, so the model can be rebuilt from config.json alone
    data_shape: list[int] | None = option(None, "", flag=False)
    # the networks' design (models.nets.NET_VERSION); a config.json without it describes version 1
    net_version: int = option(NET_VERSION, "", flag=False)

    def __post_init__(self) -> None:
        self._check_choices()
        hidden = DEFAULT_HIDDEN[self.arch] if self.hidden is None else self.hidden
        hidden = parse_hidden(hidden) if isinstance(hidden, str) else hidden
        if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ConfigError(f"--hidden must be positive layer sizes such as 400 or 512,256; got {hidden}")
        self._set("hidden", list(hidden))
        blocks = DEFAULT_BLOCKS[self.arch] if self.blocks is None else self.blocks
        positive_int("blocks", blocks, allow_zero=True)
        if self.arch == "mlp" and blocks:
            raise ConfigError(f"--blocks (residual blocks per stage) applies to --arch conv only; got {blocks} "
                              "with --arch mlp")
        self._set("blocks", blocks)
        positive_int("latent_dim", self.latent_dim)
        sigma = LIKELIHOODS[self.likelihood].default_sigma if self.sigma is None else self.sigma
        self._set("sigma", str(sigma))
        check_likelihood(self.likelihood, self.sigma, self.mixtures)
        self._set("prior_components", check_prior(self.prior, self.prior_components))
        self._check_hierarchical()
        if self.data_shape is not None:
            self._set("data_shape", [int(v) for v in self.data_shape])
        if self.net_version not in range(1, NET_VERSION + 1) or isinstance(self.net_version, bool):
            raise ConfigError(f"net_version must be an integer from 1 to {NET_VERSION}; got {self.net_version!r}")

    def _check_hierarchical(self) -> None:
        """--groups and the meaning of --hidden for --arch hierarchical."""
        if self.arch != "hierarchical":
            if self.groups is not None:
                raise ConfigError(f"--groups applies to --arch hierarchical only; got {self.groups} with --arch "
                                  f"{self.arch}")
            return
        assert self.hidden is not None, "set above"
        if len(self.hidden) != 1:
            raise ConfigError("--hidden for --arch hierarchical is one width (the channels of both passes), such as "
                              f"64; got {','.join(map(str, self.hidden))}")
        self._set("groups", _group_counts(self.groups))


def _group_counts(value: object) -> int | list[int]:
    """--groups as given (None, 2, "2", "1,2,4,1", [1, 2, 4, 1]) -> one count for every resolution (an int, as
    runs saved it before counts per resolution existed) or a list of counts, top first."""
    if value is None:
        return 1
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list | tuple) else [value]
    counts = [int(p) if isinstance(p, str) and p.strip().isdigit() else p for p in parts]
    if (not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            or counts[0] == 0):
        raise ConfigError("--groups must be a positive integer, or one count per latent resolution, top first, "
                          "such as 1,2,4,1 (0 leaves a resolution without latents: 1,2,4,0; the top needs one); "
                          f"got {value!r}")
    return typing.cast(int, counts[0]) if len(counts) == 1 else typing.cast(list[int], counts)


@dataclass(frozen=True)
class OptimConfig(Role):
    title = "optimisation"
    objective: str = option("elbo", "the training objective: elbo (the negative ELBO, with --beta, --kl-warmup and "
                            "--free-bits), iwae (the importance-weighted bound with --iw-train K draws per image), "
                            "betatcvae (β-TCVAE, with --tc-weight) or dipvae-i, dipvae-ii (DIP-VAE, with --lambda-od "
                            "and --lambda-d)",
                            "objective", choices=lambda: tuple(OBJECTIVES))
    beta: float = option(1.0, "weight of the KL term in the training objective", "objective")
    kl_warmup: float = option(0.0, "raise the KL weight linearly from 0 to beta over this many epochs", "objective",
                              metavar="EPOCHS")
    free_bits: float = option(0.0, "lower bound on each latent dimension's (or group's: --free-bits-per) batch-mean "
                              "KL in the objective (nats)", "objective", metavar="NATS")
    free_bits_per: FreeBitsPer = option("dim", "what --free-bits bounds: each latent dimension's KL, or with --arch "
                                        "hierarchical each latent group's (Kingma et al. 2016's free bits per group)",
                                        "objective")
    kl_balance: bool = option(False, "--arch hierarchical, during --kl-warmup: weigh each latent group's KL by its "
                              "batch-mean KL per unit (NVAE's KL balancing; the weights average 1), so that groups "
                              "with little KL are cheap to use and none collapses early", "objective")
    progressive: float = option(0.0, "--arch hierarchical: open the latent resolutions to x one at a time, top "
                                "first, this many epochs apart (progressive learning, Li et al. 2020); until its "
                                "turn a resolution's groups are drawn from their priors, hold nothing of x and cost "
                                "no KL, so the groups above must hold the image's layout (0: all from the start)",
                                "objective", metavar="EPOCHS")
    iw_train: int = option(1, "iwae: draws of z per image in the training objective", "objective", metavar="K")
    iw_grad: IWGrad = option("standard", "iwae: the gradient estimator: standard (the bound's own gradient) or dreg "
                             "(doubly reparameterized, Tucker et al. 2019: the same expected gradient, lower variance "
                             "for the encoder at large K)", "objective")
    tc_weight: float | None = option(None, "betatcvae: weight of the total correlation between the code dimensions "
                                     "(default 6; 1 gives the ELBO)", "objective", metavar="BETA")
    lambda_od: float | None = option(None, "dipvae-i and dipvae-ii: weight of the off-diagonal covariance penalty "
                                     "(default 10)", "objective", metavar="LAMBDA")
    lambda_d: float | None = option(None, "dipvae-i and dipvae-ii: weight of the diagonal penalty, (C_ii - 1)² "
                                    "(default 10 x --lambda-od for dipvae-i, --lambda-od for dipvae-ii)", "objective",
                                    metavar="LAMBDA")
    optimizer: Optimizer = option("adam", "the optimizer")
    lr: float | None = option(None, "learning rate (default 1e-3 for mlp and hierarchical, 5e-4 for conv)")
    lr_schedule: LRSchedule = option("constant", "how the learning rate changes over the run: constant, or cosine "
                                     "(down to --lr-final x --lr at the end of the last of --epochs, along half a "
                                     "cosine, after the warm-up)")
    lr_warmup: float = option(0.0, "raise the learning rate linearly from 0 to --lr over this many epochs first",
                              metavar="EPOCHS")
    lr_final: float = option(0.0, "cosine: the learning rate at the end, as a fraction of --lr", metavar="FRACTION")
    batch_size: int | None = option(None, "images per training step (default 128 for mlp, 16 for conv, 32 for "
                                           "hierarchical)")
    epochs: int = option(10, "total epochs; with --resume, the new total")
    seed: int = option(0, "seeds initialisation, shuffling and sampling")
    skip_threshold: float = option(0.0, "skip (and count) every update whose gradient norm is more than this many "
                                   "times the usual one (the running geometric mean of the last ~50 updates' "
                                   "norms), as VDVAE skips its rare huge gradients; 0: never. Steps with a "
                                   "non-finite loss or gradient are always skipped", "guards", metavar="K")
    clip_threshold: float = option(10.0, "rescale every gradient whose norm is more than this many times the usual "
                                   "one (the running geometric mean of the last ~50 updates' norms) down to that "
                                   "norm: the update is taken, its size bounded; 0: never",
                                   "guards", metavar="K")
    grad_clip: float = option(0.0, "rescale each step's gradient to at most this total norm; 0: never", "guards",
                              metavar="NORM")
    ema: float = option(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                        "evaluate, sample and save it; 0: off", "guards", metavar="DECAY")

    def __post_init__(self) -> None:
        self._check_choices()
        if self.lr is not None:
            positive_float("lr", self.lr)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        positive_int("epochs", self.epochs)
        self._check_schedule()
        positive_float("beta", self.beta, allow_zero=True)
        positive_float("kl_warmup", self.kl_warmup, allow_zero=True)
        positive_float("progressive", self.progressive, allow_zero=True)
        positive_float("free_bits", self.free_bits, allow_zero=True)
        positive_int("iw_train", self.iw_train)
        positive_float("skip_threshold", self.skip_threshold, allow_zero=True)
        positive_float("clip_threshold", self.clip_threshold, allow_zero=True)
        positive_float("grad_clip", self.grad_clip, allow_zero=True)
        if not (isinstance(self.ema, int | float) and 0 <= self.ema < 1):
            raise ConfigError(f"--ema is the decay of the weights' moving average, in [0, 1) (0: off); got "
                              f"{self.ema!r}")
        if self.iw_grad != "standard" and self.objective != "iwae":
            raise ConfigError(f"--iw-grad {self.iw_grad} applies to --objective iwae; got --objective {self.objective}")
        for name in ("tc_weight", "lambda_od", "lambda_d"):
            if getattr(self, name) is not None:
                positive_float(name, getattr(self, name), allow_zero=True)
        check_own_settings(self.objective, self.objective_settings())
        make_objective(self.objective, self.objective_settings())  # each objective checks the settings it reads

    def _check_schedule(self) -> None:
        positive_float("lr_warmup", self.lr_warmup, allow_zero=True)
        if self.lr_warmup >= self.epochs:
            raise ConfigError(f"--lr-warmup must be shorter than the run's --epochs ({self.epochs}); got "
                              f"{self.lr_warmup!r}")
        if not (isinstance(self.lr_final, int | float) and 0 <= self.lr_final <= 1):
            raise ConfigError(f"--lr-final is a fraction of --lr, in [0, 1]; got {self.lr_final!r}")
        if self.lr_final and self.lr_schedule != "cosine":
            raise ConfigError(f"--lr-final is where --lr-schedule cosine ends; got --lr-schedule {self.lr_schedule}")

    def objective_settings(self) -> ObjectiveSettings:
        return ObjectiveSettings(beta=self.beta, kl_warmup=self.kl_warmup, free_bits=self.free_bits,
                                 free_bits_per=self.free_bits_per, kl_balance=self.kl_balance,
                                 iw_train=self.iw_train, iw_grad=self.iw_grad, tc_weight=self.tc_weight,
                                 lambda_od=self.lambda_od, lambda_d=self.lambda_d)


@dataclass(frozen=True)
class RuntimeConfig(Role):
    title = "runtime"
    device: Device = option("auto", "auto: cuda when available")
    precision: Precision = option("fp32", "bf16: run the networks' matmuls in bfloat16 (torch.autocast), faster on "
                                  "GPUs and on CPUs with AVX-512-BF16 or AMX; z, the KL, the likelihood, weights and "
                                  "optimizer state stay float32 and every reported number is computed in float32")
    cuda_graph: bool = option(True, "on a GPU, record the training step once as a CUDA graph and replay it for "
                              "each full batch (same results, far fewer kernel launches); --no-cuda-graph launches "
                              "every kernel of every step (for profiling or debugging)")
    out: str | None = option(None, "run directory (default runs/<name>)", "run directory")
    name: str | None = option(None, "run name used for the default --out", "run directory")
    tensorboard: str | None = option(None, "also write each epoch's numbers and image grids (reconstructions, prior "
                                     "samples) to this folder, for `tensorboard --logdir DIR` (needs pip install "
                                     "'vaelab[tensorboard]')", "run directory", metavar="DIR")
    time_limit: float | None = option(None, "stop training after this many minutes (at a step boundary, leaving "
                                      "time for the last evaluation), then checkpoint and evaluate as after an epoch; "
                                      "with --resume, the limit of the continued run", metavar="MINUTES")

    def __post_init__(self) -> None:
        self._check_choices()
        if self.time_limit is not None:
            positive_float("time_limit", self.time_limit)


ROLES: dict[str, type[Role]] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                                "runtime": RuntimeConfig}


def _role_of_setting() -> dict[str, str]:
    return {f.name: role for role, cls in ROLES.items() for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Everything a run needs, by role. Built from role configs, from flat settings (each goes to its role), or
    both: `TrainConfig(dataset="shapes", latent_dim=2)`, `TrainConfig(model=ModelConfig(arch="conv"), epochs=3)`.
    The learning rate and batch size default to the architecture's."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    runtime: RuntimeConfig

    def __init__(self, data: DataConfig | None = None, model: ModelConfig | None = None,
                 optim: OptimConfig | None = None, runtime: RuntimeConfig | None = None, **settings: Any):
        given: dict[str, Role | None] = {"data": data, "model": model, "optim": optim, "runtime": runtime}
        by_role: dict[str, dict[str, Any]] = {role: {} for role in ROLES}
        where = _role_of_setting()
        unknown = sorted(set(settings) - set(where))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; allowed keys: {sorted(where)}")
        for key, value in settings.items():
            by_role[where[key]][key] = value
        for role, cls in ROLES.items():
            base = given[role]
            part = dataclasses.replace(typing.cast(Any, base), **by_role[role]) if base is not None \
                else cls(**by_role[role])
            object.__setattr__(self, role, part)
        self._check_groups()
        if self.optim.iw_grad == "dreg" and self.model.arch == "hierarchical":
            raise ConfigError("--iw-grad dreg applies to --arch mlp and conv: a hierarchical posterior's groups depend "
                              "on the draws above them; use --iw-grad standard")
        check_model_for(self.optim.objective, self.model.prior)
        arch = self.model.arch
        if self.optim.lr is None or self.optim.batch_size is None:
            # conv nets train with smaller steps: at 1e-3 and batch 128 a default conv run on `shapes` can fall
            # into a state that outputs one grey image; 5e-4 and batch 64 trained stably and reached a lower MSE
            object.__setattr__(self, "optim", dataclasses.replace(
                self.optim, lr=DEFAULT_LR[arch] if self.optim.lr is None else self.optim.lr,
                batch_size=DEFAULT_BATCH[arch] if self.optim.batch_size is None else self.optim.batch_size))

    def _check_groups(self) -> None:
        """The settings that read a KL per dimension or per latent group against the model's latents."""
        optim = self.optim
        needs_groups = (("--kl-balance", optim.kl_balance, "reads the KL of each latent group"),
                        ("--progressive", optim.progressive > 0, "opens latent groups in turn"),
                        ("--free-bits-per group", optim.free_bits_per == "group", "reads the KL of each latent group"))
        for flag, given, what in needs_groups:
            if given and self.model.arch != "hierarchical":
                raise ConfigError(f"{flag} {what}, which --arch hierarchical has; got --arch {self.model.arch}")
        if optim.free_bits_per == "group" and optim.free_bits <= 0:
            raise ConfigError("--free-bits-per group says what --free-bits NATS bounds; give --free-bits too")
        if optim.kl_balance and optim.kl_warmup <= 0:
            raise ConfigError("--kl-balance weighs the groups' KL during the KL warm-up; give --kl-warmup EPOCHS too")
        if optim.kl_balance and optim.free_bits > 0 and optim.free_bits_per == "dim":
            raise ConfigError("--kl-balance weighs each group's KL; with it --free-bits bounds groups: add "
                              "--free-bits-per group")
        if self.model.prior != "standard" and optim.free_bits > 0 and optim.free_bits_per == "dim":
            raise ConfigError(f"--free-bits bounds a per-dimension KL, which --prior {self.model.prior} does not have "
                              "(its KL is estimated per image); use --prior standard, --free-bits-per group (--arch "
                              "hierarchical) or leave out --free-bits")

    @property
    def lr(self) -> float:
        assert self.optim.lr is not None, "set from the architecture when the config is built"
        return self.optim.lr

    @property
    def batch_size(self) -> int:
        assert self.optim.batch_size is not None, "set from the architecture when the config is built"
        return self.optim.batch_size

    def replace(self, **settings: Any) -> TrainConfig:
        """A new config with these settings (flat names) changed; this one is left as it is."""
        return TrainConfig(self.data, self.model, self.optim, self.runtime, **settings)

    def settings(self) -> dict[str, Any]:
        """Every setting by its flat name (the name of its flag without dashes)."""
        return {k: v for role in ROLES for k, v in getattr(self, role).to_dict().items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {role: getattr(self, role).to_dict() for role in ROLES}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From to_dict()'s nested form, or from flat settings (the config.json of earlier versions)."""
        if set(d) & set(ROLES):
            unknown = sorted(set(d) - set(ROLES))
            if unknown:
                raise ConfigError(f"unknown config sections {unknown}; allowed: {sorted(ROLES)}")
            parts: dict[str, Any] = {role: _role_from_dict(ROLES[role], d.get(role) or {}) for role in ROLES}
            return cls(**parts)
        return cls(**{k: v for k, v in d.items() if k not in RETIRED_KEYS})

    def save(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        with open(path) as fh:
            return cls.from_dict(_versioned(json.load(fh)))


def _versioned(d: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json with `net_version` filled in: files written before it existed describe version 1."""
    if "model" in d and isinstance(d["model"], dict):
        return d if "net_version" in d["model"] else {**d, "model": {**d["model"], "net_version": 1}}
    return d if set(d) & set(ROLES) or "net_version" in d else {**d, "net_version": 1}


def _role_from_dict(cls: type[Role], d: dict[str, Any]) -> Role:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known - set(RETIRED_KEYS))
    if unknown:
        raise ConfigError(f"unknown {cls.title} config keys {unknown}; allowed keys: {sorted(known)}")
    return cls(**{k: v for k, v in d.items() if k in known})


def flag_fields() -> Iterator[tuple[type[Role], dataclasses.Field[Any]]]:
    """Every setting that is a flag of `vaelab train`, with its role, in declaration order."""
    for cls in ROLES.values():
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.metadata.get("cli"):
                yield cls, f


def field_named(name: str) -> tuple[type[Role], dataclasses.Field[Any]]:
    for cls, f in flag_fields():
        if f.name == name:
            return cls, f
    raise KeyError(name)
