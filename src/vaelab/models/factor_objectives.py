"""Objectives that push the codes towards independent dimensions, each one class on the one objective mechanism
(vaelab.models.objective): `--objective betatcvae`, `--objective dipvae-i`, `--objective dipvae-ii`.

β-TCVAE (Chen et al., 2018, "Isolating Sources of Disentanglement in VAEs") splits the KL term of the ELBO,
averaged over the data, into three parts and weighs them apart:

    E_x KL(q(z|x) ‖ p(z)) = I(x; z)                      index-code mutual information     (weight α = 1)
                          + KL(q(z) ‖ Π_d q(z_d))        total correlation                 (weight β = --tc-weight)
                          + Σ_d KL(q(z_d) ‖ p(z_d))      dimension-wise KL                 (weight γ = 1)

q(z) = (1/N) Σ_n q(z|x_n) is the aggregate posterior over the N training images. Each part is estimated at the
sampled z_i of the batch by minibatch-weighted sampling (the paper's estimator): for a batch of M images,

    log q(z_i)     ≈ log Σ_j q(z_i|x_j) − log(N M)
    log q(z_i,d)   ≈ log Σ_j q(z_i,d|x_j) − log(N M)

so the three parts sum to the batch mean of log q(z_i|x_i) − log p(z_i), the one-sample estimate of the KL.

DIP-VAE (Kumar et al., 2018, "Variational Inference of Disentangled Latent Concepts from Unlabeled
Observations") keeps the negative ELBO and adds a penalty that pulls a covariance of the codes towards the
identity, λ_od Σ_{i≠j} C_ij² + λ_d Σ_i (C_ii − 1)²: DIP-VAE-I takes C = Cov[μ(x)], the covariance of the
posterior means over the batch; DIP-VAE-II takes the covariance of the aggregate posterior,
C = Cov[μ(x)] + E[diag σ²(x)].

With --arch hierarchical the code is the top latent group (1x1: what `encode` gives, what the factor scores read),
the first group_sizes[0] columns of q and z. β-TCVAE splits that group's KL, estimated at its draw, and keeps the
lower groups' closed-form KL weighted as in the ELBO: at β = 1 it is still the negative ELBO, estimated at z_top.
DIP-VAE's covariance is that group's, and its KL term is every group's.

Both read statistics of the whole batch. DIP-VAE's are sums over the examples, so a batch split over processes
sums them with `batch.all_sum` and each process's share carries the gradient with respect to its own rows.
β-TCVAE compares every z_i with every q(z|x_j), which would need the other processes' rows with their gradients:
it trains on one process and says so when started on several.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from .objective import Batch, Loss, Objective, ObjectiveSettings, register_objective
from .priors import LOG_2PI, log_standard_normal
from .vae import Terms

NO_SETTINGS = ObjectiveSettings()  # every setting at its default
DEFAULT_TC_WEIGHT = 6.0
DEFAULT_LAMBDA_OD = 10.0
# λ_d = factor x λ_od by default (Kumar et al.: 10 for DIP-VAE-I, 1 for DIP-VAE-II)
DEFAULT_LAMBDA_D_FACTOR = {"i": 10.0, "ii": 1.0}

# the settings these objectives read (ObjectiveSettings fields; None when not given), with their flags and the
# objectives they apply to: any other objective rejects them
OWN_SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tc_weight": ("--tc-weight", ("betatcvae",)),
    "lambda_od": ("--lambda-od", ("dipvae-i", "dipvae-ii")),
    "lambda_d": ("--lambda-d", ("dipvae-i", "dipvae-ii")),
}


def check_own_settings(objective: str, settings: ObjectiveSettings) -> None:
    """Reject a setting of these objectives given with an objective that does not read it (one line)."""
    for name, (flag, owners) in OWN_SETTINGS.items():
        if getattr(settings, name) is not None and objective not in owners:
            raise ConfigError(f"{flag} applies to --objective {' and '.join(owners)} only; got {flag} "
                              f"{getattr(settings, name):g} with --objective {objective}")


def check_model_for(objective: str, prior: str) -> None:
    """The model these objectives train: any architecture (a hierarchy's code is its top group); β-TCVAE's
    dimension-wise KL also needs a prior of the code that factorizes over the dimensions, N(0, I)."""
    if objective == "betatcvae" and prior != "standard":
        raise ConfigError(f"--objective betatcvae splits the KL over the dimensions of the prior N(0, I); got --prior "
                          f"{prior}: use --prior standard")


def _reject_elbo_settings(name: str, settings: ObjectiveSettings, weight_flag: str) -> None:
    if settings.beta != 1.0 or settings.free_bits > 0:
        raise ConfigError(f"--objective {name} weighs its terms with {weight_flag}: --beta and --free-bits apply to "
                          f"--objective elbo only; got --beta {settings.beta:g} --free-bits {settings.free_bits:g}")
    if settings.iw_train != 1:
        raise ConfigError(f"--iw-train K applies to --objective iwae; got --iw-train {settings.iw_train} with "
                          f"--objective {name}")
    if settings.kl_balance:  # it weighs the ELBO's KL per group; these objectives weigh their own terms
        raise ConfigError(f"--kl-balance applies to --objective elbo only; got it with --objective {name}")


def code_posterior(out: Terms, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """The code's q(z|x) mean and log-variance and its draw, (B, K) each: every unit of a single-latent model, the
    top group's K = group_sizes[0] units of a hierarchical one (never the whole (B, L_total) of every group)."""
    if out.q is None or out.z is None or out.z.dim() != 2:
        raise ValueError(f"--objective {name} needs the terms to carry q(z|x) and one z per example (B, L)")
    k = out.z.shape[1] if out.group_sizes is None else out.group_sizes[0]
    return out.q.mean[:, :k], out.q.logvar[:, :k], out.z[:, :k]


def lower_groups_kl(out: Terms) -> Tensor | None:
    """A hierarchical model's KL of every group below the top one, in closed form, (B,); None for one group."""
    if out.group_sizes is None:
        return None
    assert out.kl_per_dim is not None, "a hierarchy's lower groups have a closed-form KL"
    return out.kl_per_dim[:, out.group_sizes[0]:].sum(1)


def log_q_pairs(mean: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
    """log q(z_i,d | x_j) for every pair of examples i, j of the batch and every dimension d: (M, M, L)."""
    diff = z[:, None, :] - mean[None, :, :]  # (M, M, L): row i, column j
    return -0.5 * (diff.square() * torch.exp(-logvar)[None] + logvar[None] + LOG_2PI)


def tc_decomposition(mean: Tensor, logvar: Tensor, z: Tensor, dataset_size: int) -> dict[str, Tensor]:
    """Per-example estimates (M,) of the index-code MI, the total correlation and the dimension-wise KL at the
    sampled z (M, L), by minibatch-weighted sampling with N = max(dataset_size, M) images; they sum to
    log q(z_i|x_i) − log p(z_i) under the N(0, I) prior."""
    m = z.shape[0]
    log_nm = math.log(max(dataset_size, m) * m)
    pairs = log_q_pairs(mean, logvar, z)  # (M, M, L)
    log_q_zx = pairs.diagonal(dim1=0, dim2=1).sum(0)  # (M,) log q(z_i|x_i)
    log_q_z = torch.logsumexp(pairs.sum(2), dim=1) - log_nm  # (M,) log q(z_i)
    log_prod_q_zd = (torch.logsumexp(pairs, dim=1) - log_nm).sum(1)  # (M,) Σ_d log q(z_i,d)
    log_p_z = log_standard_normal(z)  # (M,)
    return {"mi": log_q_zx - log_q_z, "tc": log_q_z - log_prod_q_zd, "dwkl": log_prod_q_zd - log_p_z}


@torch.no_grad()
def aggregate_tc(mean: Tensor, logvar: Tensor, z: Tensor, block: int = 256) -> Tensor:
    """log q(z_i) − Σ_d log q(z_i,d) per row (M,), q the aggregate posterior of exactly these M rows,
    (1/M) Σ_j q(z|x_j), and q(z_d) its marginals; the mean over rows estimates the total correlation of the codes
    of a split (no minibatch weighting: every row is compared with every row, `block` rows at a time)."""
    log_m = math.log(z.shape[0])
    out = []
    for start in range(0, z.shape[0], block):
        pairs = log_q_pairs(mean, logvar, z[start:start + block])  # (block, M, L)
        log_q_z = torch.logsumexp(pairs.sum(2), dim=1) - log_m
        out.append(log_q_z - (torch.logsumexp(pairs, dim=1) - log_m).sum(1))
    return torch.cat(out)


@register_objective
class BetaTCVAE(Objective):
    """mean −log p(x|z) + w · (α · MI + β · TC + γ · dimension-wise KL [+ the lower groups' KL]), α = γ = 1,
    β = --tc-weight, each part of the code's KL estimated by minibatch-weighted sampling (module docstring); the
    bracket is a hierarchical model's, in closed form; w rises from 0 to 1 under --kl-warmup. At β = 1 it is the
    negative ELBO with the code's KL estimated at the sampled z instead of in closed form."""

    name = "betatcvae"
    help = "β-TCVAE: the ELBO with the KL split into MI + β·TC + dimension-wise KL, β = --tc-weight"
    mi_weight = 1.0
    dw_weight = 1.0
    reported = ("mi", "tc", "dwkl")

    def __init__(self, settings: ObjectiveSettings = NO_SETTINGS):
        _reject_elbo_settings(self.name, settings, "--tc-weight")
        tc = DEFAULT_TC_WEIGHT if settings.tc_weight is None else settings.tc_weight
        if not (math.isfinite(tc) and tc >= 0):
            raise ConfigError(f"--tc-weight must be a finite number >= 0; got {settings.tc_weight!r}")
        super().__init__(settings)
        self.tc_weight = tc

    def check_processes(self, processes: int) -> None:
        if processes > 1:
            raise ConfigError(f"--objective betatcvae compares every z of a batch with every q(z|x) of it and trains "
                              f"on one process only; got {processes} processes: start it without torchrun")

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        self.check_processes(batch.processes)
        mean, logvar, z = code_posterior(out, self.name)  # (M, K): the code, a hierarchy's top group
        parts = tc_decomposition(mean, logvar, z, self.settings.dataset_size)
        reg = self.mi_weight * parts["mi"] + self.tc_weight * parts["tc"] + self.dw_weight * parts["dwkl"]  # (M,)
        lower = lower_groups_kl(out)  # (M,) or None
        if lower is not None:
            reg = reg + lower
            parts = {**parts, "lower_kl": lower}
        rec = out.rec.sum() / batch.n
        total = rec + batch.beta * reg.sum() / batch.n
        shown = {k: v.detach().sum() / batch.n for k, v in parts.items()}
        return Loss(total, {"rec": rec.detach(), **shown})


def _moments(mean: Tensor, logvar: Tensor, with_variance: bool) -> Tensor:
    """Sums over this process's rows: Σ μ (L), Σ μ μᵀ (L·L) and, for DIP-VAE-II, Σ σ² (L), as one vector."""
    parts = [mean.sum(0), (mean.T @ mean).flatten()]  # (L,), (L·L,)
    if with_variance:
        parts.append(torch.exp(logvar).sum(0))
    return torch.cat(parts)


def dip_covariance(sums: Tensor, n: int, latent_dim: int, with_variance: bool) -> Tensor:
    """The covariance DIP-VAE regularises, (L, L), from _moments' sums over n examples: Cov[μ(x)] (I), plus
    E[diag σ²(x)] (II)."""
    first = sums[:latent_dim] / n  # (L,) E[μ]
    second = sums[latent_dim:latent_dim + latent_dim ** 2].view(latent_dim, latent_dim) / n  # (L, L) E[μ μᵀ]
    cov = second - torch.outer(first, first)
    if with_variance:
        cov = cov + torch.diag(sums[latent_dim + latent_dim ** 2:] / n)
    return cov


def dip_penalty(cov: Tensor, lambda_od: float, lambda_d: float) -> Tensor:
    """λ_od Σ_{i≠j} C_ij² + λ_d Σ_i (C_ii − 1)²: 0 exactly when C is the identity."""
    diag = cov.diagonal()
    off = cov - torch.diag(diag)
    return lambda_od * off.square().sum() + lambda_d * (diag - 1.0).square().sum()


class _DIPVAE(Objective):
    """mean −log p(x|z) + w · KL + λ_od Σ_{i≠j} C_ij² + λ_d Σ_i (C_ii − 1)² (module docstring); w is --kl-warmup's
    weight, from 0 to 1. C is the code's covariance (a hierarchy's top group), the KL every group's."""

    kind = "i"
    reported = ("dip",)

    def __init__(self, settings: ObjectiveSettings = NO_SETTINGS):
        _reject_elbo_settings(self.name, settings, "--lambda-od and --lambda-d")
        od = DEFAULT_LAMBDA_OD if settings.lambda_od is None else settings.lambda_od
        d = DEFAULT_LAMBDA_D_FACTOR[self.kind] * od if settings.lambda_d is None else settings.lambda_d
        for flag, value in (("--lambda-od", od), ("--lambda-d", d)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag} must be a finite number >= 0; got {value!r}")
        super().__init__(settings)
        self.lambda_od, self.lambda_d = od, d

    def __call__(self, out: Terms, batch: Batch) -> Loss:
        mean, logvar, _ = code_posterior(out, self.name)  # (B, K): the code, a hierarchy's top group
        rec = out.rec.sum() / batch.n
        kl = out.kl.sum() / batch.n
        variance = self.kind == "ii"
        own = _moments(mean, logvar, variance)
        if batch.processes > 1:
            # the whole batch's sums, differentiable in this process's rows only: the penalty's value is the
            # whole batch's on every process, and its gradient here is the part that flows through these rows
            own = batch.all_sum(own.detach().clone()) + (own - own.detach())
        penalty = dip_penalty(dip_covariance(own, batch.n, mean.shape[1], variance), self.lambda_od, self.lambda_d)
        share = penalty if batch.processes == 1 else penalty - penalty.detach() * (1 - 1 / batch.processes)
        total = rec + batch.beta * kl + share
        return Loss(total, {"rec": rec.detach(), "kl": kl.detach(), "dip": share.detach()})


@register_objective
class DIPVAEI(_DIPVAE):
    name = "dipvae-i"
    help = "DIP-VAE-I: the negative ELBO plus a penalty pulling Cov[posterior means] towards the identity"
    kind = "i"


@register_objective
class DIPVAEII(_DIPVAE):
    name = "dipvae-ii"
    help = "DIP-VAE-II: the negative ELBO plus a penalty pulling the aggregate posterior's covariance towards I"
    kind = "ii"
