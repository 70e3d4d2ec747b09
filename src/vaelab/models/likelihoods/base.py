"""Observation models p(x|z): small objects with one interface and exact log-densities in nats.

The decoder emits `n_params` tensors per pixel (means, logits, log-scales); a likelihood turns them into
  log_prob(params, x) -> (B,)   summed over every pixel, no constant dropped (params may carry leading
                                sample dims, (K, B, C, H, W), against x (B, C, H, W): the result is (K, B)),
  mean(params)        -> (B, C, H, W)   the decoder mean f(z) in pixel space,
  sample(params, scale=None) -> (B, C, H, W)   a draw x ~ p(x|z); `scale` replaces the family's own scale
                                (σ, b, s), for families that have one (has_scale),
  scale(params)       -> (B,) or None   the σ (or Laplace b, logistic s) in use, averaged over pixels.
  init_from_data(params, x)             sets a learned scale from the untrained decoder, before training.
  scale_lr(optimizer, n_pixels)         the step size of the likelihood's own parameters (None: the nets').
and answers what the rest of vaelab asks about its family (the class attributes below, instability_causes), so
no other module compares family names. Add a family by adding one class to LIKELIHOODS.

Where a family's gradient has a simple closed form, its log_prob is a torch.autograd.Function that computes
the value in the forward pass and that closed form in the backward pass (Bernoulli: x − sigmoid(l); Gaussian
with one shared σ: (x − μ)/σ², and Σ ||x − μ||²/σ² − D for log σ). Autograd would keep and replay every
intermediate of the expression instead. Being ordinary autograd nodes, they work wherever log_prob is used:
under autocast, with hooks or frozen parameters, behind conv decoders, and without gradients at evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


def _sum_pixels(t: Tensor) -> Tensor:
    return t.sum(dim=(-3, -2, -1))  # (..., C, H, W) -> (...): x (B, C, H, W) broadcasts against (K, B, C, H, W)


def _per_example(grad: Tensor) -> Tensor:
    """The incoming gradient of a per-example log-density, (...,), shaped to broadcast over (..., C, H, W)."""
    return grad[..., None, None, None]


class Likelihood(nn.Module):
    name: str = ""
    n_params: int = 1  # parameter tensors per pixel the decoder must produce
    continuous: bool = True  # a density over [0, 1]^D (vs. a probability mass on {0, 1}^D or 256 levels)
    binary_only: bool = False  # normalized only on binary data
    default_sigma: str = "0.1"  # --sigma when none is given
    mixtures_allowed: bool = False  # whether --mixtures K > 1 means something for this family
    has_scale: bool = False  # a scale (σ, b, s) that sample(params, scale) can replace
    scale_name: str | None = None  # its symbol, for messages and the explorer's slider
    additive_gaussian_noise: bool = False  # x = f(z) + σ·ε, ε ~ N(0, I): σ is the noise's sd (σ² = MSE at best)
    # what an exported explorer page runs in JavaScript (static-backend.js), or None where it cannot:
    page_mean: str | None = None  # the map from the decoder's first output block to f(z)
    page_draw: str | None = None  # how it draws x ~ p(x|z) from f(z) (None: it shows f(z))

    def log_prob(self, params: list[Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: list[Tensor]) -> Tensor:
        return params[0]

    def sample(self, params: list[Tensor], scale: float | None = None) -> Tensor:
        raise NotImplementedError

    def scale(self, params: list[Tensor]) -> Tensor | None:
        return None

    def instability_causes(self, sigma_setting: str) -> list[str]:
        """The likely causes of a non-finite loss that belong to this family, given the --sigma in use."""
        return []

    def init_from_data(self, params: list[Tensor], x: Tensor) -> None:
        """Set the likelihood's own parameters from the untrained decoder's output on a batch of training
        data (called once, before the first step); nothing to do for a family without any."""

    def scale_lr(self, optimizer: str, n_pixels: int) -> float | None:
        """The step size of the likelihood's own parameters, or None for the networks' learning rate."""
        return None

    def describe(self) -> str:
        return self.name

    def _check_scale(self, scale: float | None) -> None:
        if scale is None:
            return
        if not self.has_scale:
            raise ValueError(f"{self.name} has no scale to replace; got scale={scale!r}")
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0; got {scale!r}")

    @classmethod
    def make(cls, arg: str, mixtures: int = 1) -> Likelihood:
        return cls()


def _parse_positive(value: str, flag: str, allowed: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{flag} must be a number > 0 or one of {allowed}; got {value!r}")
    return v


def _soft_bounds(log_s: Tensor, lo: float, hi: float) -> Tensor:
    """A smooth, monotone map of log s into [lo, hi] that is the identity well inside it."""
    return hi - F.softplus(hi - (lo + F.softplus(log_s - lo)))


def _soft_bounds_inverse(y: Tensor, lo: float, hi: float) -> Tensor:
    """The log s that _soft_bounds maps to y (lo < y < hi)."""
    w = hi - torch.log(torch.expm1(hi - y))
    return lo + torch.log(torch.expm1(w - lo))


class ScaledLikelihood(Likelihood):
    """A location family with a scale (Gaussian σ, Laplace b, logistic s) that is one of
      fixed    a number the user gave;
      learned  one shared scalar, kept as its log;
      pixel    one per pixel from the decoder (its second output, softly bounded to [SCALE_MIN, SCALE_MAX]),
               plus one shared learned offset in log space.
    A learned scale starts at its maximum-likelihood value for the untrained decoder (init_from_data) and
    moves with its own step size (scale_lr), so it keeps up with the decoder; the objective it maximizes is
    the ELBO as before.
    """

    has_scale = True
    scale_name: str | None = "scale"
    SCALE_MIN, SCALE_MAX = 1e-3, 1.0  # pixel mode's soft bounds
    ADAM_SCALE_LR = 0.05  # Adam moves log scale by about this much per step while the gradient keeps its sign

    def __init__(self, scale: float = 0.1, learned: bool = False, pixel: bool = False):
        super().__init__()
        self.learned, self.pixel = learned or pixel, pixel
        self.fixed_log_scale = math.log(scale)
        if self.learned:  # learned: log s; pixel: the shared offset added to the decoder's log s
            self.log_scale = nn.Parameter(torch.tensor(0.0))
        if pixel:
            self.n_params = self.n_params + 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.pixel and prefix + "log_scale" not in state_dict:  # a run saved before the offset existed
            state_dict[prefix + "log_scale"] = torch.zeros(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_scale_for(self, params: list[Tensor]) -> Tensor:
        if self.pixel:
            return _soft_bounds(params[-1] + self.log_scale, math.log(self.SCALE_MIN), math.log(self.SCALE_MAX))
        if self.learned:
            return self.log_scale
        # a fill on the device, not a copy from host memory, so the step can be recorded as a CUDA graph
        return params[0].new_full((), self.fixed_log_scale)

    def scale_for(self, params: list[Tensor], scale: float | None = None) -> Tensor:
        """The scale a draw uses: the family's own (per pixel or shared), or `scale` in its place."""
        self._check_scale(scale)
        if scale is None:
            return torch.exp(self.log_scale_for(params))
        return params[0].new_full((), scale)

    def location(self, params: list[Tensor]) -> Tensor:
        return params[0]

    def raw_log_scale(self, params: list[Tensor]) -> Tensor:
        """The decoder's log-scale output (pixel mode), before the shared offset and the bounds."""
        return params[-1]

    def mle_log_scale(self, mu: Tensor, x: Tensor) -> Tensor:
        """log of the shared scale that maximizes the likelihood of x given the location mu."""
        raise NotImplementedError

    def init_from_data(self, params, x):
        if not self.learned:
            return
        lo, hi = math.log(self.SCALE_MIN), math.log(self.SCALE_MAX)
        with torch.no_grad():
            best = self.mle_log_scale(self.location(params), x)
            if self.pixel:  # centre the decoder's (random) log-scale output on the best shared value
                best = best.clamp(lo + 0.01, hi - 0.01)
                best = _soft_bounds_inverse(best, lo, hi) - self.raw_log_scale(params).mean()
            self.log_scale.copy_(best)

    def scale_lr(self, optimizer, n_pixels):
        """Adam: a fixed step in log scale. SGD: half a Newton step; the loss's curvature in log scale at the
        optimum is 2 per pixel (Gaussian), so 1/(4·D) halves the distance to the optimum at every step."""
        if not self.learned:
            return None
        return self.ADAM_SCALE_LR if optimizer == "adam" else 0.25 / n_pixels

    def scale(self, params):
        s = torch.exp(self.log_scale_for(params))
        return s.expand(params[0].shape[0]) if s.dim() == 0 else s.flatten(1).mean(1)

    def instability_causes(self, sigma_setting):
        s = self.scale_name
        return [f"{s} is very small or learned {s} collapsed (--sigma {sigma_setting})"]

    def describe(self):
        if self.pixel:
            return (f"{self.name} ({self.scale_name} per pixel from the decoder, in [{self.SCALE_MIN:g}, "
                    f"{self.SCALE_MAX:g}])")
        value = "learned, shared" if self.learned else f"= {math.exp(self.fixed_log_scale):g}"
        return f"{self.name} ({self.scale_name} {value})"
