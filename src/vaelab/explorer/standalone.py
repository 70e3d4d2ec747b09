"""The explorer as one self-contained HTML file: the page, its code and the data it needs, no server.

An MLP decoder (a plain stack of Linear layers and ReLUs, checked by running it) travels as its weights
(base64 float32) and is run in the page's JavaScript. Any other decoder is decoded here on a dense grid over
the plane, and the page shows the decode at the nearest grid point and says so.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runs import write_text_atomic
from .core import Explorer, png_strip
from .server import read_asset

N_IMAGES = 48  # test images (with their posteriors) embedded for the image strip
GRID_BYTES = 8_000_000  # budget of raw decoded pixels for a grid export
GRID_MIN, GRID_MAX = 9, 65


def write_export(ex: Explorer, path: Path) -> Path:
    decoder = mlp_spec(ex) or grid_spec(ex)
    images = [ex.image(i) for i in range(min(N_IMAGES, ex.n))]
    data = {
        "info": ex.info(),
        **ex.codes_payload(),
        "images": [_data_uri(png_strip(im, compress_level=9)) for im in images],
        "posteriors": [ex.encode(i) for i in range(len(images))],
        "decoder": decoder,
        "draw": ex.model.likelihood.page_draw,  # how the page draws x ~ p(x|z) from f(z); None: it shows f(z)
    }
    write_text_atomic(path, page_html(data))
    return path


def page_html(data: dict) -> str:
    page = read_asset("index.html")
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # never ends the <script> early
    swaps = {
        '<link rel="stylesheet" href="static/explorer.css">': f"<style>\n{read_asset('explorer.css')}</style>",
        '<script src="static/server-backend.js"></script>':
            f'<script type="application/json" id="vaelab-data">{blob}</script>\n'
            f"<script>\n{read_asset('static-backend.js')}</script>",
        '<script src="static/explorer.js"></script>': f"<script>\n{read_asset('explorer.js')}</script>",
    }
    for old, new in swaps.items():
        if old not in page:
            raise AssertionError(f"index.html lost {old}")  # the export and the page must change together
        page = page.replace(old, new)
    return page


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().float().cpu().numpy().astype("<f4").tobytes()).decode()


def linear_layers(decoder: nn.Module) -> list[tuple[nn.Linear, bool]] | None:
    """The decoder as [(Linear, ReLU after it?)], if its leaf modules are only Linear and ReLU (and no-ops in
    evaluation: Identity, Flatten, Dropout); else None. Whether they run in this order is checked by mlp_spec."""
    layers: list[list] = []
    for m in decoder.modules():
        if list(m.children()):
            continue
        if isinstance(m, nn.Linear):
            layers.append([m, False])
        elif isinstance(m, nn.ReLU) and layers:
            layers[-1][1] = True  # a second ReLU in a row changes nothing
        elif not isinstance(m, (nn.Identity, nn.Flatten, nn.Dropout)):
            return None
    return [(m, relu) for m, relu in layers] or None


@torch.inference_mode()
def mlp_spec(ex: Explorer) -> dict | None:
    """The decoder's weights for the page, when the page's plain forward pass reproduces model.decode."""
    model, lik = ex.model, ex.model.likelihood
    layers = linear_layers(model.decoder)
    if layers is None or lik.page_mean is None:  # a mean the page cannot compute
        return None
    z = torch.randn(32, ex.latent_dim, generator=torch.Generator().manual_seed(0)) * 2  # (32, L)
    h = z.double()
    for lin, relu in layers:
        h = h @ lin.weight.double().T.cpu() + lin.bias.double().cpu()
        h = h.clamp_min(0) if relu else h
    try:
        want = torch.cat([p.flatten(1) for p in model.decode(z.to(ex.device))], 1).double().cpu()  # (32, K*C*H*W)
    except RuntimeError:
        return None
    if h.shape != want.shape or not torch.allclose(h, want, rtol=1e-4, atol=1e-4):
        return None
    n_params = want.shape[1] // math.prod(ex.shape)
    return {"kind": "mlp", "n_params": n_params, "mean": lik.page_mean,
            "layers": [{"in": lin.in_features, "out": lin.out_features, "relu": relu, "weight": _b64(lin.weight),
                        "bias": _b64(lin.bias)} for lin, relu in layers]}


def grid_size(shape: tuple[int, ...]) -> int:
    n = int(math.sqrt(GRID_BYTES / math.prod(shape)))
    n = max(GRID_MIN, min(GRID_MAX, n))
    return n if n % 2 else n - 1  # odd: the plane's origin is a grid point


def grid_extent(ex: Explorer) -> float:
    """The half-width of the plane the page shows (the same rule as the live page)."""
    uv = ex.codes @ ex.basis[:2].T  # (N, 2)
    reach = float(np.quantile(np.abs(uv).max(1), 0.99)) * 1.15
    return round(max(3.5, reach), 4)


def grid_spec(ex: Explorer) -> dict:
    """f(z) on an n x n grid over [-R, R]^2 of the default plane, the other directions at the mean code."""
    n, extent = grid_size(ex.shape), grid_extent(ex)
    t = np.linspace(-extent, extent, n)
    plane = ex.basis[:2] if ex.latent_dim > 1 else np.array([[1.0], [0.0]])  # (2, L)
    rest = ex.centre - (ex.centre @ plane.T) @ plane  # the mean code off the plane, (L,)
    rows = []
    for v in t[::-1]:  # top row first: v decreases down the page
        z = (t[:, None] * plane[0] + v * plane[1] + rest).astype(np.float32)  # (n, L)
        rows.append(np.concatenate(list(_decode_batches(ex, z)), axis=0))  # (n, H, W, C)
    tiles = np.stack(rows)  # (n rows, n cols, H, W, C)
    _, _, h, w, c = tiles.shape
    sheet = tiles.transpose(0, 2, 1, 3, 4).reshape(1, n * h, n * w, c)  # one image: row-major tiles
    return {"kind": "grid", "n": n, "extent": extent, "sheet": _data_uri(png_strip(sheet, compress_level=9))}


def _decode_batches(ex: Explorer, z: np.ndarray):
    for i in range(0, len(z), ex.max_batch):
        yield ex.decode(z[i:i + ex.max_batch])
