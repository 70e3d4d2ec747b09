"""The explorer's model side: a run's test codes, its decodes and draws as 8-bit images, and input checks.

Nothing here knows about HTTP. Every value a request can carry is parsed and bounded here, and a bad one
raises RequestError with the one-line reason the server sends back.
"""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import torch
from PIL import Image

from ..analysis.metrics import prior_radii, split_data
from ..runs import Run

MAX_ABS_Z = 100.0  # |z_i| bound: the prior puts no visible mass past a few units
MAX_BATCH = 64  # codes per decode request
MAX_RESPONSE_PIXELS = 1 << 22  # pixels per PNG answer (batch x H x W), whatever the image size
MAX_SIGMA = 10.0
MAX_SEED = 2**31 - 1
N_CODES = 5000  # test images encoded for the scatter
PRIOR_GRID = 96  # a learned prior in two dimensions: log p(z) on this many x this many points of the plane
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII digits only


class RequestError(ValueError):
    """A malformed request; the message is the one-line reason the server answers with (status 400 or 404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_number(text: str, name: str, lo: float, hi: float) -> float:
    """A plain decimal number (no nan, inf, hex or underscores) within [lo, hi]."""
    if not _NUMBER.fullmatch(text):
        raise RequestError(f"{name} must be a number, got {_short(text)!r}")
    v = float(text)
    if not (lo <= v <= hi):
        raise RequestError(f"{name} must be within [{lo:g}, {hi:g}], got {_short(text)}")
    return v


def parse_int(text: str, name: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"[+-]?[0-9]{1,12}", text):
        raise RequestError(f"{name} must be an integer, got {_short(text)!r}")
    v = int(text)
    if not (lo <= v <= hi):
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {v}")
    return v


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def png_strip(images: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 images (B, H, W, C) side by side in one PNG, (H, B*W); grey for C = 1, RGB for C = 3.
    The default compression is the fastest: a live answer stays on this machine."""
    b, h, w, c = images.shape
    strip = images.transpose(1, 0, 2, 3).reshape(h, b * w, c)  # (H, B*W, C)
    if c == 1:
        img = Image.fromarray(strip[:, :, 0], "L")
    elif c == 3:
        img = Image.fromarray(strip, "RGB")
    else:  # no natural colour mapping: show the channels' mean
        img = Image.fromarray(strip.mean(2).round().astype(np.uint8), "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Pixels in [0, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounded to the nearest of 256 levels."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Explorer:
    """A loaded run with its first `n_codes` test images encoded once, and the operations the page calls.

    The plane: `basis` (L, L) has orthonormal rows; rows 0 and 1 span the default plane (the latent axes for
    L = 2, else the first two principal components of the posterior means). Plane coordinates are measured
    from the origin of z, so the prior's radius circles keep their meaning.
    """

    def __init__(self, run: Run, n_codes: int = N_CODES):
        self.run, self.model = run, run.model.eval()
        self.device = next(self.model.parameters()).device
        self.lock = threading.Lock()  # one request at a time in the model (and in the global RNG for draws)
        split = split_data(run.config, "test", self.device, n_codes)  # the data as the trainer evaluated it
        self.x, self.prepare = split.x[:n_codes], split.prepare  # stored form; scaled per request
        self.labels = None if split.labels is None else np.asarray(split.labels)[:n_codes].astype(int)
        self.classes = split.classes
        factors = getattr(split, "factors", None)  # (N, F) named factors of variation, for data that has them
        self.factors = None if factors is None else np.asarray(factors, dtype=np.float64)[:n_codes]
        self.factor_names = getattr(split, "factor_names", None) if factors is not None else None
        with torch.inference_mode():
            means, stds = [], []
            for i in range(0, len(self.x), 500):
                q = self.model.encode(self.prepare(self.x[i:i + 500]))
                means.append(q.mean.float().cpu())
                stds.append(q.std.float().cpu())
        self.codes = torch.cat(means).numpy()  # (N, L)
        self.stds = torch.cat(stds).numpy()  # (N, L)
        self.centre, self.basis = principal_basis(self.codes)
        self.shape = tuple(self.model.shape)  # (C, H, W)
        _, h, w = self.shape
        self.max_batch = max(1, min(MAX_BATCH, MAX_RESPONSE_PIXELS // (h * w)))

    @property
    def latent_dim(self) -> int:
        """The length of z the page sends: a hierarchical model's top group (the rest decode at their prior means)."""
        return getattr(self.model, "code_dim", self.model.latent_dim)

    @property
    def n(self) -> int:
        return len(self.codes)

    # ------------------------------------------------------------------ parsing
    def parse_z(self, text: str) -> np.ndarray:
        """'v1,...,vL' or several codes joined by ';' -> (B, L) float32, each value checked."""
        if not text:
            raise RequestError(f"z is empty; give {self.latent_dim} comma-separated numbers")
        parts = text.split(";")
        if len(parts) > self.max_batch:
            raise RequestError(f"at most {self.max_batch} codes per request, got {len(parts)}")
        rows = []
        for k, part in enumerate(parts):
            values = part.split(",")
            if len(values) != self.latent_dim:
                raise RequestError(self._wrong_length(len(values), k if len(parts) > 1 else None))
            rows.append([parse_number(v.strip(), "each z value", -MAX_ABS_Z, MAX_ABS_Z) for v in values])
        return np.asarray(rows, dtype=np.float32)

    def _wrong_length(self, got: int, code: int | None) -> str:
        dim = self.latent_dim
        which = "z" if code is None else f"code {code + 1} of z"
        plane = "" if dim == 2 else (" (a full z, not the 2 coordinates of a point in the plane: "
                                     "/api/info's basis maps one to the other, see docs/explore.md)")
        return (f"{which} has {got} value{'s' * (got != 1)}, but this run's latent dimension is {dim}: give {dim} "
                f"comma-separated value{'s' * (dim != 1)} per code{plane}")

    def parse_index(self, text: str) -> int:
        return parse_int(text, "index", 0, self.n - 1)

    # ------------------------------------------------------------------ operations
    def info(self) -> dict:
        lik = self.model.likelihood
        c, h, w = self.shape
        sigma, per_pixel = self.observation_scale()
        return {
            "run": self.run.path.name,
            "dataset": str(self.run.config.data.dataset),
            "latent_dim": self.latent_dim,
            "shape": [c, h, w],
            "likelihood": lik.name,
            "likelihood_text": lik.describe(),
            "sigma": sigma,
            "sigma_name": lik.scale_name,
            "sigma_per_pixel": per_pixel,
            "labels": self.classes,
            "factor_names": self.factor_names,
            "n_codes": self.n,
            "centre": _round(self.centre),
            "basis": _round(self.basis),
            "basis_kind": "axes" if self.latent_dim == 2 else "pca",
            "prior": self.model.code_prior.name,
            "prior_text": self.model.code_prior.describe(),
            # N(0, I) seen in any plane through z = 0 is N(0, I_2): the circles that hold these shares of its mass
            # (a learned prior has none: in two dimensions its log-density comes on a grid instead)
            "prior_radii": ({label: round(r, 4) for label, r in prior_radii(2).items()}
                            if self.model.code_prior.name == "standard" else {}),
            "prior_density": self.prior_density(),
            "limits": {"max_abs_z": MAX_ABS_Z, "max_batch": self.max_batch, "max_sigma": MAX_SIGMA,
                       "max_seed": MAX_SEED},
        }

    def prior_density(self, n: int = PRIOR_GRID) -> dict | None:
        """A learned prior in two dimensions: {"extent": E, "log_p": n rows of n values}, log p(z) at the centres
        of an n x n grid over [-E, E]²; row i at z₂ = E − (i + ½)·2E/n, column j at z₁ = −E + (j + ½)·2E/n (row 0
        at the top, as drawn). E covers the codes as the page's default view does. None otherwise."""
        if self.latent_dim != 2 or self.model.code_prior.name == "standard":
            return None
        extent = float(min(MAX_ABS_Z, max(4.0, 1.15 * np.percentile(np.abs(self.codes).max(1), 99))))
        t = -extent + (np.arange(n) + 0.5) * (2 * extent / n)  # (n,) cell centres, ascending
        z1, z2 = np.meshgrid(t, t[::-1])  # (n, n): row i at z₂ = t[n - 1 - i]
        z = torch.from_numpy(np.stack([z1.ravel(), z2.ravel()], 1).astype(np.float32)).to(self.device)
        with self.lock, torch.inference_mode():
            log_p = self.model.code_prior.log_prob(z).float().cpu().numpy().reshape(n, n)
        return {"extent": round(extent, 5), "log_p": _round(log_p, 3)}

    def observation_scale(self) -> tuple[float | None, bool]:
        """(the scale of p(x|z): σ, Laplace b, logistic s; per_pixel); None for likelihoods without one. A
        per-pixel scale is reported as its mean at the mean code."""
        lik = self.model.likelihood
        if not lik.has_scale:
            return None, False
        with self.lock, torch.inference_mode():
            z = torch.from_numpy(self.centre[None].astype(np.float32)).to(self.device)
            s = lik.scale(self.model.decode(z))
        return (None if s is None else float(f"{float(s[0]):.6g}")), lik.n_params > 1

    def codes_payload(self) -> dict:
        labels = None if self.labels is None else self.labels.tolist()
        factors = None if self.factors is None else _round(self.factors, 4)
        return {"codes": _round(self.codes), "labels": labels, "factors": factors}

    def decode(self, z: np.ndarray) -> np.ndarray:
        """f(z) for codes (B, L) -> uint8 (B, H, W, C)."""
        with self.lock, torch.inference_mode():
            return to_uint8(self.model.decode_mean(torch.from_numpy(z).to(self.device)))

    def sample(self, z: np.ndarray, sigma: float | None, seed: int, n: int = 1) -> np.ndarray:
        """n draws x ~ p(x|z) per code, (B*n, H, W, C), code-major. `sigma` replaces the scale of the run's
        observation model (σ, b, s: see Likelihood.sample); the same seed gives the same noise, so only the
        scale changes between σ values."""
        lik = self.model.likelihood
        if sigma is not None and not lik.has_scale:
            raise RequestError(f"sigma applies to observation models with a scale (σ, b or s); this run's "
                               f"{lik.name} has none")
        if len(z) * n > self.max_batch:
            raise RequestError(f"at most {self.max_batch} images per request, got {len(z)} codes x {n} draws")
        zs = np.repeat(z, n, axis=0)  # (B*n, L)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with self.lock, torch.inference_mode(), torch.random.fork_rng(devices=devices):  # global RNGs untouched
            torch.manual_seed(seed)
            return to_uint8(lik.sample(self.model.decode(torch.from_numpy(zs).to(self.device)), sigma))

    def encode(self, index: int) -> dict:
        out = {"index": index, "mean": _round(self.codes[index]), "std": _round(self.stds[index])}
        if self.labels is not None:
            label = int(self.labels[index])
            out["label"] = label
            if self.classes is not None and 0 <= label < len(self.classes):
                out["label_name"] = self.classes[label]
        return out

    def image(self, index: int) -> np.ndarray:
        """The test image itself, uint8 (1, H, W, C)."""
        with torch.inference_mode():
            return to_uint8(self.prepare(self.x[index:index + 1]))


def principal_basis(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean code (L,), orthonormal basis (L, L)): the latent axes for L = 2, else the principal components of
    the codes, largest variance first, each signed so that its largest entry is positive (a stable choice)."""
    _, dim = codes.shape
    centre = codes.mean(0)
    if dim == 2:
        return centre, np.eye(2)
    _, _, vt = np.linalg.svd(codes - centre, full_matrices=True)  # (L, L), rows sorted by variance
    signs = np.sign(vt[np.arange(dim), np.abs(vt).argmax(1)])
    return centre, vt * signs[:, None]


def _round(a: np.ndarray, digits: int = 5):
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()
