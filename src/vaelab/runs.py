"""The run directory: config.json, model.safetensors, metrics.jsonl, checkpoint.safetensors; load_run().

No pickle anywhere: weights, optimizer state and RNG states are tensors in safetensors files; everything
else is JSON (in the file's metadata for the checkpoint). Every file is written to a temporary name and
moved into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .config import TrainConfig
from .errors import ConfigError, RunError
from .models.vae import VAE

CONFIG, WEIGHTS, METRICS, CHECKPOINT = "config.json", "model.safetensors", "metrics.jsonl", "checkpoint.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then move tmp_path onto path (same folder, so the move is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "x") creates the file with the mode open() gives any new file (the umask applied); writers such
    # as safetensors' save_file replace it with a private 0600 file, so that mode is put back before the move
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    open(tmp, "x").close()
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights(model: VAE, path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(_contiguous(model.state_dict()), tmp, metadata={"format": "pt"}))


def save_checkpoint(path: Path, model: VAE, optimizer: torch.optim.Optimizer, meta: dict,
                    rng: dict[str, torch.Tensor], extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Weights (as trained: not the moving average), optimizer state, RNG states and progress (epoch, step) in one
    safetensors file; `extra` adds named groups of tensors (the weights' moving average, the guard's counts), each
    stored under its name as a prefix and returned by load_checkpoint."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for group, part in (extra or {}).items():
        tensors.update({f"{group}.{k}": v for k, v in part.items()})
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    metadata = {"meta": json.dumps(meta), "param_groups": json.dumps(opt["param_groups"])}
    atomic_write(path, lambda tmp: save_file(_contiguous(tensors), tmp, metadata=metadata))


def load_checkpoint(path: Path, model: VAE, optimizer: torch.optim.Optimizer,
                    extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Restore model and optimizer in place; return (meta, rng tensors). The groups named in `extra` come back in
    meta["extra"] (group -> {name: tensor}; a group the checkpoint lacks is absent)."""
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as fh:
            metadata = fh.metadata()
    except (SafetensorError, OSError) as e:
        raise RunError(f"{path}: unreadable checkpoint ({e})") from e
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            # a copy: load_file's tensors are views into the file's mapping at 4-byte-aligned offsets (Adam on
            # them ran ~5 % slower per training step than on torch's own 64-byte-aligned memory); the copy takes
            # its parameter's memory layout (channels-last convs), as the moments of a fresh run do
            p = params[int(idx)] if int(idx) < len(params) else None
            if key == "step":
                state.setdefault(int(idx), {})[key] = v
            elif p is not None and v.shape == p.shape:
                state.setdefault(int(idx), {})[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)
            else:
                state.setdefault(int(idx), {})[key] = v.to(device, copy=True)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    meta = json.loads(metadata["meta"])
    meta["extra"] = {g: {k[len(g) + 1:]: v.to(device, copy=True) for k, v in tensors.items() if k.startswith(g + ".")}
                     for g in extra if any(k.startswith(g + ".") for k in tensors)}
    return meta, rng


def checkpoint_epoch(path: Path) -> int:
    """Completed epochs recorded in a checkpoint, read from its metadata without loading any tensor."""
    try:
        with safe_open(path, "pt") as fh:
            return int(json.loads(fh.metadata()["meta"])["epoch"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise RunError(f"{path}: unreadable checkpoint ({e})") from e


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Run:
    """A trained (or training) run: its folder, config, model and metrics."""

    path: Path
    config: TrainConfig
    model: VAE
    metrics: list[dict] = field(default_factory=list)

    def last(self, split: str = "test") -> dict | None:
        rows = [r for r in self.metrics if r["split"] == split]
        return rows[-1] if rows else None

    def __repr__(self) -> str:
        last = self.last()
        tail = (f", test −ELBO {last['loss']:.2f} nats/image = {last['bits_per_dim']:.3f} bits/dim at epoch "
                f"{last['epoch']}") if last else ""
        return f"Run({str(self.path)!r}, {self.config.model.likelihood}, latent {self.config.model.latent_dim}{tail})"


def _mismatch(expected: dict, saved: dict) -> str:
    """'' when `saved` has exactly the tensors and shapes of `expected`; else a short account of the difference."""
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(v)} {what}, e.g. {v[0]}" for v, what in
             ((missing, "missing"), (extra, "unexpected"), (reshaped, "of another shape")) if v]
    return "; ".join(parts)


def load_run(path: str | os.PathLike, device: str = "cpu") -> Run:
    """Rebuild a run's model from config.json and model.safetensors (no pickle, no training code needed)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise RunError(f"{path}: not a vaelab run directory (no {CONFIG}); give the folder passed to --out")
    try:
        config = TrainConfig.load(path / CONFIG)
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise RunError(f"{path / CONFIG}: invalid config ({e})") from e
    if config.model.data_shape is None:
        raise RunError(f"{path / CONFIG}: no data_shape; the run never started training")
    if len(config.model.data_shape) != 3:
        raise RunError(f"{path / CONFIG}: data_shape must be [channels, height, width], got {config.model.data_shape}")
    c, h, w = config.model.data_shape
    model = VAE.from_config(config, (c, h, w))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{path}: no {WEIGHTS} yet; the run has not finished an epoch")
    try:
        saved = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise RunError(f"{weights}: cannot load weights ({e})") from e
    try:
        model.load_state_dict(saved)
    except RuntimeError as e:
        mismatch = _mismatch(model.state_dict(), saved)
        if not mismatch:
            raise RunError(f"{weights}: cannot load weights ({e})") from e
        raise RunError(f"{weights}: the saved weights do not fit the network config.json describes ({mismatch}); "
                       "the run was saved by a vaelab with another network design: train it again with this one"
                       ) from None
    model.to(device).eval()
    return Run(path, config, model, read_metrics(path / METRICS))
