"""How closely does a model trained by W processes match the one trained by one process?

Each case trains the same configuration twice on a Fashion-MNIST subset (the first 400 training and 200 test
images, or 501 / 300 where said): with `torchrun --nproc-per-node W -m vaelab train` and with `vaelab train`
alone. It prints the largest relative weight difference over the model's tensors (max |a − b| / max |a| per
tensor) and the difference of the last test −ELBO. The last line is machine-readable.

    python benchmarks/ddp_agreement.py     # 4 cases, a few minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from vaelab.data import load_dataset

SMALL = ["--hidden", "32", "--latent-dim", "3", "--epochs", "2"]
CASES = [  # (label, processes, training images, flags)
    ("Gaussian, σ optimal, free bits 0.2, KL warm-up, batch 64", 2, 501,
     [*SMALL, "--batch-size", "64", "--sigma", "optimal", "--free-bits", "0.2", "--kl-warmup", "1"]),
    ("conv net (8,16), σ learned, batch 48", 2, 400,
     ["--arch", "conv", "--hidden", "8,16", "--latent-dim", "3", "--epochs", "2", "--batch-size", "48",
      "--sigma", "learned"]),
    ("Bernoulli, dynamic binarization, batch 48 (last batch 16 = 5+5+6)", 3, 400,
     [*SMALL, "--batch-size", "48", "--likelihood", "bernoulli", "--binarize", "dynamic"]),
    ("the same with SGD (lr 0.001)", 3, 400,
     [*SMALL, "--batch-size", "48", "--likelihood", "bernoulli", "--binarize", "dynamic", "--optimizer", "sgd",
      "--lr", "0.001"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(nproc: int, args: list[str]) -> None:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "vaelab", "train", *args, "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def compare(a: Path, b: Path) -> tuple[float, float]:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diff = max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max()).item() for k in wa)
    last = [json.loads((p / "metrics.jsonl").read_text().splitlines()[-1])["loss"] for p in (a, b)]
    return diff, abs(last[0] - last[1])


def main() -> None:
    fashion = load_dataset("fashion-mnist")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, nproc, n, flags) in enumerate(CASES):
            data = Path(tmp) / f"fashion-{n}.npz"
            if not data.exists():
                np.savez(data, x_train=fashion.train[:n], x_test=fashion.test[:300 if n == 501 else 200])
            runs = [Path(tmp) / f"{i}-{w}" for w in (1, nproc)]
            for w, out in zip((1, nproc), runs, strict=True):
                train(w, ["--dataset", str(data), *flags, "--out", str(out)])
            diff, loss = compare(*runs)
            results.append({"case": label, "processes": nproc, "max_rel_weight_diff": diff, "test_loss_diff": loss})
            print(f"{nproc} processes vs 1, {label}: max relative weight difference {diff:.1e}, "
                  f"test -ELBO difference {loss:.1e} nats", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
