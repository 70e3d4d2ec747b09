"""What `vaelab info` prints about a run: its model, the size of each network, its config and last metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..models.hierarchical import MAX_LATENT_SIDE
from ..models.nets import conv_channels, n_parameters, stage_sizes
from ..runs import load_run
from ..training.evaluation import NEGATIVE_NOTE, loss_text


def _network(config) -> tuple[str, list[int] | None, int]:
    """(arch, hidden widths or channels, residual blocks per stage) of a run's config: the one place that knows
    where the network's settings live in the config."""
    return config.model.arch, config.model.hidden, config.model.blocks


def run_summary(path: str | Path) -> str:
    """The model, each network's parameter count, the config and the last train/test metrics of the run in
    `path`, as lines of text (what `vaelab info` prints)."""
    run = load_run(path)
    arch, hidden, blocks = _network(run.config)
    lines = [f"run: {run.path}", f"model: {arch} {hidden} -> z{run.config.model.latent_dim}, "
             f"{run.model.likelihood.describe()}"]
    lines += [f"  {line}" for line in network_lines(run.model, arch, hidden, blocks)]
    lines.append("config:")
    lines += [f"  {k}: {json.dumps(v)}" for k, v in run.config.settings().items()]  # one line per setting
    for split in ("train", "test"):
        last = run.last(split)
        if last:
            parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
                     if k not in ("split", "kl_per_dim")]
            lines.append(f"last {split}: " + " ".join(parts))
            if last.get("normalized") is False:
                lines.append("  (Bernoulli on non-binary pixels: loss is a cross-entropy, not a normalized "
                             "negative log-likelihood)")
    test = run.last("test")
    if test:  # the same words as training's epoch lines and `vaelab eval`
        lines.append(f"loss is the −ELBO in nats per image, lower is better: test {loss_text(test)}")
        if test["loss"] < 0:
            lines.append(f"  ({NEGATIVE_NOTE})")
    if not run.metrics:
        lines.append("no metrics yet")
    return "\n".join(lines)


def network_lines(model, arch: str, hidden: Sequence[int] | None, blocks: int) -> list[str]:
    """What each network of `model` is and how many parameters it has (and the likelihood's own, if any);
    `arch`, `hidden` and `blocks` are the settings it was built from."""
    shape: tuple[int, int, int] = model.shape
    hidden = list(hidden or [])
    if arch == "hierarchical":
        return _hierarchy_lines(model, hidden, blocks)
    if arch == "conv":
        chans = conv_channels(shape, hidden)
        sizes = stage_sizes(shape, len(chans))
        what = (f"{len(chans)} stride-2 stages, channels {','.join(map(str, chans))}, {blocks} residual "
                f"block(s) each, {shape[1]}x{shape[2]} -> {sizes[-1][0]}x{sizes[-1][1]}")
    else:
        what = f"hidden widths {','.join(map(str, hidden))}"
    out = [f"encoder: {n_parameters(model.encoder):,} parameters ({what})",
           f"decoder: {n_parameters(model.decoder):,} parameters (mirrored, {model.likelihood.n_params} output "
           f"tensor(s) per pixel)"]
    own = n_parameters(model.likelihood)
    if own:
        out.append(f"likelihood: {own:,} parameter(s)")
    return out + _prior_lines(model)


def _prior_lines(model) -> list[str]:
    """A learned prior's line (the VampPrior's encoder is the model's, counted above); none for N(0, I)."""
    prior = n_parameters(model.prior)
    return [f"prior: {model.prior.describe()}, {prior:,} parameters"] if prior else []


def _hierarchy_lines(model, hidden: list[int], blocks: int) -> list[str]:
    """network_lines for --arch hierarchical: both passes and the latent groups."""
    names = model.group_names()
    own = n_parameters(model.likelihood)
    lik = [f"likelihood: {own:,} parameter(s)"] if own else []
    return [*lik, f"encoder (bottom-up): {n_parameters(model.encoder):,} parameters ({_widths(model, hidden[0])}, "
            f"{blocks} bottleneck block(s) per stride-2 stage)",
            f"decoder (top-down): {n_parameters(model.decoder):,} parameters ({len(names)} latent groups, "
            f"{', '.join(names)}, {model.code_dim} channels each: {model.latent_dim:,} latent units; "
            f"{model.likelihood.n_params} output tensor(s) per pixel)", *_prior_lines(model)]


def _widths(model, width: int) -> str:
    """'width 64' where both passes have `width` channels at every size, else 'width 64 at ≤16 px, 32 at 32x32,
    16 at 64x64': the sizes above the latents that are narrower (model.widths, from size_widths)."""
    narrow = [(s, c) for s, c in reversed(model.widths.items()) if c != width]
    if not narrow:
        return f"width {width}"
    return ", ".join([f"width {width} at ≤{MAX_LATENT_SIDE} px", *(f"{c} at {h}x{w}" for (h, w), c in narrow)])
