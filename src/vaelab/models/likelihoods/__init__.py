"""Observation models p(x|z), one module per family (see base.py for the interface every family shares).

Every public name stays importable from here: `from vaelab.models.likelihoods import Gaussian`.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import LOG_2PI, Likelihood, ScaledLikelihood
from .bernoulli import Bernoulli, BernoulliLogProb, ContinuousBernoulli
from .discretized import (
    HALF_BIN,
    LEVELS,
    Discretized,
    DiscretizedGaussian,
    DiscretizedLogistic,
    log_diff_ndtr,
    log_diff_sigmoid,
    log_ndtr,
    to_levels,
)
from .gaussian import Gaussian, GaussianOptimal, GaussianPixel, SharedSigmaGaussianLogProb
from .laplace import Laplace

LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Gaussian, Bernoulli, ContinuousBernoulli, Laplace, DiscretizedLogistic,
                              DiscretizedGaussian)
}


def make_likelihood(name: str, sigma: str | None = None, mixtures: int = 1) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ConfigError(f"--likelihood must be one of {', '.join(LIKELIHOODS)}; got {name!r}")
    family = LIKELIHOODS[name]
    if not (isinstance(mixtures, int) and not isinstance(mixtures, bool) and mixtures >= 1):
        raise ConfigError(f"--mixtures must be an integer >= 1; got {mixtures!r}")
    if mixtures > 1 and not family.mixtures_allowed:
        allowed = ", ".join(k for k, v in LIKELIHOODS.items() if v.mixtures_allowed)
        raise ConfigError(f"--mixtures {mixtures} applies to {allowed} only; got --likelihood {name}")
    return family.make(str(family.default_sigma if sigma is None else sigma), mixtures)


def check_likelihood(name: str, sigma: str | None, mixtures: int = 1) -> None:
    make_likelihood(name, sigma, mixtures)


__all__ = [
    "HALF_BIN", "LEVELS", "LIKELIHOODS", "LOG_2PI", "Bernoulli", "BernoulliLogProb", "ContinuousBernoulli",
    "Discretized", "DiscretizedGaussian", "DiscretizedLogistic", "Gaussian", "GaussianOptimal", "GaussianPixel",
    "Laplace", "Likelihood", "ScaledLikelihood", "SharedSigmaGaussianLogProb", "check_likelihood", "log_diff_ndtr",
    "log_diff_sigmoid", "log_ndtr", "make_likelihood", "to_levels",
]
