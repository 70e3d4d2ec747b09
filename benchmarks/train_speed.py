"""How fast does vaelab train, against a conventional PyTorch loop and against the machine's matmul floor?

One process, one machine, one model: a 784-400-20 MLP VAE with a Bernoulli likelihood, batch 128, Adam 1e-3,
on Fashion-MNIST's 60,000 training images.

1. vaelab: `vaelab.train`, the function `vaelab train` calls (every step is vaelab.training.step.Step: the
   objective of vaelab.models.objective, its gradients by autograd, the optimizer's update; on a GPU replayed
   as one CUDA graph), one epoch at a time (epoch 1 on a fresh run directory, then `vaelab.resume` to 2, 3,
   ...; resuming is bit-identical to one uninterrupted run).
   Seconds per epoch are the `seconds` field of each epoch's train row in metrics.jsonl: the training loop's
   wall time, excluding the per-epoch train/test evaluation and the checkpoint. Median over the epochs.
2. baseline: the well-known PyTorch example (examples/vae) written the usual way: a Dataset that turns each
   image into a float tensor when it is accessed, exactly as torchvision's FashionMNIST with ToTensor does
   (a PIL image, then ToTensor; torchvision itself is not needed), a DataLoader with shuffle and batch 128,
   the example's VAE (sigmoid decoder, BCE summed + KL) and its loop (`loss.item()` every step). Median over
   the epochs. --lean-baseline converts uint8 -> float directly instead, without PIL.
3. floor: the step's matrix multiplies alone (4 forward addmm, 4 weight-gradient and 3 input-gradient mm
   with the exact shapes autograd uses), times steps per epoch. Timed in blocks of one epoch's steps;
   median over the blocks.
4. vaelab --precision bf16 (skip with --skip-bf16): the same run with the networks' matmuls under bfloat16
   autocast. It is reported on its own lines and never in the goal's ratios: it changes the arithmetic.
5. with --with-autograd, vaelab fp32 once more with the Bernoulli log-density as the plain expression
   (Σ x·l − softplus(l), differentiated by autograd) instead of its closed-form gradient
   (vaelab.models.likelihoods.BernoulliLogProb): what the closed form is worth. (The option once also timed a
   hand-written MLP backward pass against autograd; vaelab no longer has one, so that series is gone.)
6. with --device cuda, vaelab fp32 once more with --no-cuda-graph: every step launched kernel by kernel
   instead of replayed as one CUDA graph, to show what the graph is worth.
7. with --reference SRC, another vaelab source tree (the `src` folder of an older commit, e.g. from
   `git archive`) trained the same way through its own CLI in a child process (`vaelab train`, then
   `vaelab train --resume`), its seconds read from its metrics.jsonl: a before/after comparison in one run.

The trainers take turns: each round runs one epoch of every trainer, then a floor block, so that all
series see the same mix of machine states on a shared machine.
Every trained model is scored with the same function (vaelab.training.evaluation.elbo_metrics, same seed, one z
per image, logits = the decoder's last affine layer) on the 10,000 test images after 3 epochs.
The last line is machine-readable.

    python benchmarks/train_speed.py              # the real measurement: 5 epochs each (a few minutes)
    python benchmarks/train_speed.py --epochs 3   # the shortest run that still compares test -ELBO
    python benchmarks/train_speed.py --device cuda   # trainers and floor on the GPU (scores on the CPU)
    git archive main src | tar -x -C /tmp/before && \
        python benchmarks/train_speed.py --epochs 3 --reference /tmp/before/src   # this tree vs main
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vaelab import TrainConfig, load_run, resume, train
from vaelab.data import load_dataset, to_unit
from vaelab.models.likelihoods import Bernoulli
from vaelab.models.vae import VAE
from vaelab.runs import read_metrics
from vaelab.training.evaluation import elbo_metrics

BATCH, HIDDEN, LATENT, LR, SEED = 128, 400, 20, 1e-3, 0
COMPARE_EPOCH = 3  # test -ELBO compared after this many epochs
EVAL_SEED = 2024


# ------------------------------------------------------------------------------ 2. the conventional baseline
class ExampleDataset(Dataset):
    """What the example's torchvision.datasets.FashionMNIST(transform=ToTensor()) does for each item:
    a PIL image from the stored uint8 array, then ToTensor's conversion to a float tensor in [0, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        self.images = torch.from_numpy(images[:, 0])  # (N, H, W) uint8, as torchvision stores it
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i].numpy())  # mode "L"
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor, for a mode-"L" image:
        x = x.view(img.size[1], img.size[0], 1).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return x, int(self.labels[i]) if self.labels is not None else 0  # (1, H, W)


class LeanDataset(ExampleDataset):
    """The same conversion without the PIL round trip (--lean-baseline)."""

    def __getitem__(self, i: int):
        x = self.images[i].unsqueeze(0).to(torch.float32).div(255)  # (1, H, W)
        return x, int(self.labels[i]) if self.labels is not None else 0


class ExampleVAE(nn.Module):
    """The PyTorch example's VAE (examples/vae/main.py), sized from the data."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.fc1 = nn.Linear(d, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, LATENT)
        self.fc22 = nn.Linear(HIDDEN, LATENT)
        self.fc3 = nn.Linear(LATENT, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, d)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, self.d))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def example_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.shape[1]), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def train_baseline(data, epochs: int, lean: bool = False, device: str = "cpu"):
    """The example's training loop; yields (seconds, model) after each epoch. It keeps its own global-RNG
    state between epochs, so the trainers running in between do not change its shuffles or samples."""
    torch.manual_seed(SEED)
    d = math.prod(data.shape)
    model = ExampleVAE(d).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    dataset = (LeanDataset if lean else ExampleDataset)(data.train, data.train_labels)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    rng = torch.get_rng_state()
    for _ in range(epochs):
        torch.set_rng_state(rng)
        model.train()
        train_loss = 0.0
        t0 = time.perf_counter()
        for x, _ in loader:
            x = x.to(device)  # the example's `data.to(device)`
            optimizer.zero_grad()
            recon, mu, logvar = model(x)
            loss = example_loss(recon, x, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        seconds = time.perf_counter() - t0
        rng = torch.get_rng_state()
        yield seconds, model


def as_vaelab(example: ExampleVAE, shape) -> VAE:
    """The same network as a vaelab VAE: heads concatenated, the sigmoid's input used as Bernoulli logits."""
    cfg = TrainConfig(likelihood="bernoulli", hidden=[HIDDEN], latent_dim=LATENT)
    vae = VAE.from_config(cfg, shape)
    enc_fc, enc_head = vae.encoder.body[1], vae.encoder.head
    dec_fc, dec_out = vae.decoder.body[0], vae.decoder.body[2]
    with torch.no_grad():
        enc_fc.weight.copy_(example.fc1.weight), enc_fc.bias.copy_(example.fc1.bias)
        enc_head.weight.copy_(torch.cat([example.fc21.weight, example.fc22.weight]))
        enc_head.bias.copy_(torch.cat([example.fc21.bias, example.fc22.bias]))
        dec_fc.weight.copy_(example.fc3.weight), dec_fc.bias.copy_(example.fc3.bias)
        dec_out.weight.copy_(example.fc4.weight), dec_out.bias.copy_(example.fc4.bias)
    return vae.eval()


# --------------------------------------------------------------------------------------- 3. the matmul floor
def floor_block(x: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` repetitions of one training step's GEMMs, on the exact shapes of that step."""
    d = x.shape[1]
    enc1, head, dec1, dec2 = (m.to(x.device) for m in (nn.Linear(d, HIDDEN), nn.Linear(HIDDEN, 2 * LATENT),
                                                       nn.Linear(LATENT, HIDDEN), nn.Linear(HIDDEN, d)))
    w1, b1, wh, bh = enc1.weight.detach(), enc1.bias.detach(), head.weight.detach(), head.bias.detach()
    w3, b3, w4, b4 = dec1.weight.detach(), dec1.bias.detach(), dec2.weight.detach(), dec2.bias.detach()
    g_out = torch.randn(x.shape[0], d, device=x.device) * 1e-2  # stand-ins for the gradients flowing back
    g_head = torch.randn(x.shape[0], 2 * LATENT, device=x.device) * 1e-2
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        h = torch.addmm(b1, x, w1.t())  # (B, 400)
        e = torch.addmm(bh, h, wh.t())  # (B, 40)
        z = e[:, :LATENT].contiguous()  # (B, 20)
        h2 = torch.addmm(b3, z, w3.t())  # (B, 400)
        torch.addmm(b4, h2, w4.t())  # (B, 784)
        torch.mm(g_out.t(), h2)  # dW4 (784, 400)
        g_h2 = torch.mm(g_out, w4)  # dh2 (B, 400)
        torch.mm(g_h2.t(), z)  # dW3 (400, 20)
        torch.mm(g_h2, w3)  # dz (B, 20)
        torch.mm(g_head.t(), h)  # dWh (40, 400)
        g_h = torch.mm(g_head, wh)  # dh (B, 400)
        torch.mm(g_h.t(), x)  # dW1 (400, 784); no dx: the data needs no gradient
    _sync(x.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_blocks(x: torch.Tensor, steps: int, blocks: int, warm: bool = True) -> list[float]:
    if warm:
        floor_block(x, 20)
    return [floor_block(x, steps) for _ in range(blocks)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs for each trainer (>= 3; default 5)")
    p.add_argument("--floor-blocks", type=int, default=1,
                   help="floor blocks of one epoch's steps at the start and after each round (default 1)")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST is (default: vaelab's lookup)")
    p.add_argument("--lean-baseline", action="store_true",
                   help="baseline Dataset converts uint8 -> float directly instead of through PIL + ToTensor")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where every trainer and the floor run (default cpu); test scores are computed on the CPU")
    p.add_argument("--skip-bf16", action="store_true", help="do not also time vaelab with --precision bf16")
    p.add_argument("--with-autograd", action="store_true",
                   help="also time vaelab fp32 with the Bernoulli log-density as the plain expression, "
                   "differentiated by autograd instead of by its closed-form gradient")
    p.add_argument("--reference", metavar="SRC", default=None,
                   help="also time the vaelab package in this source folder (e.g. an older commit's src/) through "
                   "its CLI in a child process")
    args = p.parse_args(argv)
    if args.epochs < COMPARE_EPOCH:
        p.error(f"--epochs must be >= {COMPARE_EPOCH} (the test -ELBO is compared after epoch "
                f"{COMPARE_EPOCH}); got {args.epochs}")
    if args.reference and not (Path(args.reference) / "vaelab" / "cli.py").is_file():
        p.error(f"--reference must be a source folder holding vaelab/cli.py; got {args.reference}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here; allowed: cpu, cuda")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_dataset("fashion-mnist", args.data_dir)
    n = data.train.shape[0]
    steps = math.ceil(n / BATCH)
    test = torch.from_numpy(np.ascontiguousarray(data.test))
    where = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    print(f"machine: {where}{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"Fashion-MNIST {n} train / {test.shape[0]} test images, {steps} steps of {BATCH} per epoch",
          flush=True)

    x_floor = to_unit(torch.from_numpy(data.train[:BATCH])).flatten(1).to(device)  # (B, 784)
    floor = floor_blocks(x_floor, steps, args.floor_blocks)

    def score(model: VAE) -> float:  # on the CPU, whatever device trained the model
        return elbo_metrics(copy.deepcopy(model).cpu(), test, 1000, to_unit, seed=EVAL_SEED)["loss"]

    # The trainers take turns, one epoch each per round, with floor blocks in between, so that every series
    # samples the same mix of machine states (a shared 2-core machine drifts between fast and slow phases).
    baseline_test = math.nan
    baseline_epochs: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [VaelabRun(Path(tmp), args, "fp32")]
        bf16 = None if args.skip_bf16 else VaelabRun(Path(tmp), args, "bf16")
        plain = VaelabRun(Path(tmp), args, "fp32", plain=True) if args.with_autograd else None
        eager = VaelabRun(Path(tmp), args, "fp32", graphs=False) if device.type == "cuda" else None
        ref = ReferenceRun(Path(tmp), args) if args.reference else None
        runs += [r for r in (bf16, plain, eager, ref) if r is not None]
        baseline = train_baseline(data, args.epochs, args.lean_baseline, device)
        for epoch in range(1, args.epochs + 1):
            for run in runs:
                run.epoch(epoch, score)
            seconds, model = next(baseline)
            baseline_epochs.append(seconds)
            if epoch == COMPARE_EPOCH:
                baseline_test = score(as_vaelab(model, data.shape))
            floor += floor_blocks(x_floor, steps, args.floor_blocks, warm=False)
            print(f"round {epoch}/{args.epochs}: " + ", ".join(f"vaelab {r.label} {r.seconds[-1]:.2f} s"
                  for r in runs) + f", baseline {seconds:.2f} s, floor {floor[-1]:.2f} s", flush=True)
    vaelab = runs[0]
    vaelab_s, vaelab_test = statistics.median(vaelab.seconds), vaelab.test
    baseline_s, floor_s = statistics.median(baseline_epochs), statistics.median(floor)
    how = "uint8 -> float per image" if args.lean_baseline else "PIL image + ToTensor per image, as torchvision"
    print(f"\nvaelab  : {_fmt(vaelab.seconds)}  (train-loop seconds per epoch from metrics.jsonl)")
    if bf16:
        print(f"bf16    : {_fmt(bf16.seconds)}  (vaelab --precision bf16: matmuls in bfloat16; not the same "
              "maths, so not the goal's number)")
    if plain:
        pl = statistics.median(plain.seconds)
        print(f"plain   : {_fmt(plain.seconds)}  (vaelab fp32 with the Bernoulli log-density differentiated by "
              f"autograd, not its closed form; test -ELBO {plain.test:.2f} nats)")
        print(f"vaelab / plain = {vaelab_s / pl:.3f} (the closed-form likelihood gradient)")
    if ref:
        r = statistics.median(ref.seconds)
        print(f"before  : {_fmt(ref.seconds)}  (vaelab from {args.reference}, through its CLI; test -ELBO "
              f"{ref.test:.2f} nats)")
        print(f"vaelab / before = {vaelab_s / r:.3f} (before / floor = {r / floor_s:.3f}, before / baseline = "
              f"{r / baseline_s:.3f})")
    if eager:
        print(f"eager   : {_fmt(eager.seconds)}  (vaelab fp32 without the CUDA graph: each step launched kernel by "
              f"kernel; test -ELBO {eager.test:.2f} nats)")
    print(f"baseline: {_fmt(baseline_epochs)}  (Dataset: {how}; DataLoader shuffle; the example's VAE, loss "
          f"and loop)")
    print(f"floor   : {_fmt(floor)}  (11 GEMMs per step x {steps} steps, median of {len(floor)} blocks)")

    speedup, over_floor = baseline_s / vaelab_s, vaelab_s / floor_s
    diff = vaelab_test - baseline_test
    print(f"\nseconds per epoch (median): vaelab {vaelab_s:.2f}, baseline {baseline_s:.2f}, floor {floor_s:.2f}")
    print(f"vaelab / baseline = {vaelab_s / baseline_s:.3f} (vaelab is {speedup:.2f}x faster; goal >= 4x)")
    print(f"vaelab / floor    = {over_floor:.3f} (goal <= 1.6)")
    print(f"baseline / floor  = {baseline_s / floor_s:.2f} (the speedup of a trainer that did nothing but the "
          "matmuls)")
    if bf16:
        b = statistics.median(bf16.seconds)
        print(f"bf16: {b:.2f} s/epoch, {baseline_s / b:.2f}x faster than the baseline, {b / floor_s:.2f}x the "
              f"float32 floor; test -ELBO {bf16.test:.2f} nats ({bf16.test - baseline_test:+.2f} vs the baseline)")
    print(f"test -ELBO after {COMPARE_EPOCH} epochs (elbo_metrics, seed {EVAL_SEED}, one z per image): "
          f"vaelab {vaelab_test:.2f} nats, baseline {baseline_test:.2f} nats, difference {diff:+.2f} "
          f"({'within' if abs(diff) <= 1 else 'NOT within'} 1 nat)")
    print(f"peak memory (RSS, whole process): {peak_rss_mib():.0f} MiB; total benchmark time "
          f"{time.perf_counter() - t_start:.0f} s")
    print(f"vaelab_s={vaelab_s:.3f} baseline_s={baseline_s:.3f} floor_s={floor_s:.3f} speedup={speedup:.2f} "
          f"over_floor={over_floor:.2f} vaelab_test={vaelab_test:.2f} baseline_test={baseline_test:.2f}")


class VaelabRun:
    """One vaelab run trained an epoch at a time: `vaelab train --epochs 1`, then `vaelab train --resume RUN
    --epochs N` (bit-identical to one uninterrupted run). Seconds are each epoch's train-loop time from
    metrics.jsonl, without the per-epoch evaluation and checkpoint."""

    def __init__(self, tmp: Path, args, precision: str, graphs: bool = True, plain: bool = False):
        self.label = "plain" if plain else precision if graphs else "eager"
        self.plain, self.path = plain, tmp / self.label
        self.cfg = dict(dataset="fashion-mnist", data_dir=args.data_dir, likelihood="bernoulli", hidden=[HIDDEN],
                        latent_dim=LATENT, batch_size=BATCH, lr=LR, optimizer="adam", seed=SEED, device=args.device,
                        precision=precision, cuda_graph=graphs)
        self.seconds: list[float] = []
        self.test = math.nan

    def epoch(self, epoch: int, score) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Bernoulli-on-grey-pixels warning; the example does the same
            plain = mock.patch.object(Bernoulli, "log_prob", plain_bernoulli_log_prob) if self.plain else None
            with plain or contextlib.nullcontext():
                if epoch == 1:
                    run = train(TrainConfig(**self.cfg, epochs=1, out=str(self.path)), progress=False)
                else:
                    run = resume(self.path, progress=False, epochs=epoch)
        self.seconds.append([r for r in run.metrics if r["split"] == "train"][-1]["seconds"])
        if epoch == COMPARE_EPOCH:
            self.test = score(run.model)


def plain_bernoulli_log_prob(self, params, x):
    """Bernoulli.log_prob as the plain expression, for autograd to differentiate (--with-autograd)."""
    logits = params[0]
    return (x * logits).sum(dim=(-3, -2, -1)) - F.softplus(logits).sum(dim=(-3, -2, -1))


class ReferenceRun:
    """vaelab from another source folder, run as `vaelab train` in a child process, one epoch per call (the
    first on a fresh run directory, then --resume to the next total). Seconds are its train-loop time per epoch
    from metrics.jsonl, as for VaelabRun; the child's start-up and data loading are not in them."""

    def __init__(self, tmp: Path, args):
        self.label, self.path, self.src = "before", tmp / "before", str(Path(args.reference).resolve())
        self.flags = ["--dataset", "fashion-mnist", "--likelihood", "bernoulli", "--hidden", str(HIDDEN),
                      "--latent-dim", str(LATENT), "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(SEED),
                      "--device", args.device, "--precision", "fp32", "--quiet"]
        if args.data_dir:
            self.flags += ["--data-dir", args.data_dir]
        self.threads = ["--threads", str(args.threads)] if args.threads else []
        self.flags += self.threads
        self.seconds: list[float] = []
        self.test = math.nan

    def epoch(self, epoch: int, score) -> None:
        cmd = [sys.executable, "-m", "vaelab.cli", "train"]
        if epoch == 1:
            cmd += [*self.flags, "--epochs", "1", "--out", str(self.path)]
        else:
            cmd += ["--resume", str(self.path), "--epochs", str(epoch), "--quiet", *self.threads]
        env = {**os.environ, "PYTHONPATH": self.src}
        check = subprocess.run([sys.executable, "-c", "import vaelab; print(vaelab.__file__)"], env=env,
                               capture_output=True, text=True, check=True)
        if not check.stdout.startswith(self.src):
            raise SystemExit(f"--reference: the child imported vaelab from {check.stdout.strip()}, not {self.src}")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"--reference: {' '.join(cmd)} failed:\n{done.stderr}")
        rows = [r for r in read_metrics(self.path / "metrics.jsonl") if r["split"] == "train"]
        self.seconds.append(rows[-1]["seconds"])
        if epoch == COMPARE_EPOCH:
            self.test = score(load_run(self.path).model)


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s/epoch median of [" + ", ".join(f"{v:.2f}" for v in values) + "]"


if __name__ == "__main__":
    main()
