"""How fast does vaelab train the default 64x64 RGB conv VAE, against the same network in a plain PyTorch loop?

One process, one machine, one model: `--arch conv` with its defaults (4 stride-2 stages of 32-64-128-256
channels, one residual block each, mirrored decoder), latent 32, Gaussian σ = 0.1, batch 128, Adam at the
conv default 5e-4 in every series (weights that take other paths can run at other speeds on a CPU).

1. vaelab: `vaelab.train`, the function `vaelab train` calls, one epoch per round (epoch 1 on a fresh run
   directory, then `vaelab.resume`). Seconds per epoch are the `seconds` field of the epoch's train row in
   metrics.jsonl: the training loop alone (batch gather from the resident uint8 set, scaling, forward, backward,
   Adam), without the per-epoch evaluation and checkpoint.
2. plain: the same network (vaelab's ConvEncoder/ConvDecoder, the same initial weights) in the loop anyone would
   write: float images resident in memory, a shuffled index per epoch, autograd, torch.optim.Adam(fused=True),
   the negative ELBO written out (Gaussian log-density summed over pixels + KL), `zero_grad`, `backward`, `step`.
   Run twice, with the tensors in the default layout (NCHW) and in channels_last (NHWC).

The series take turns, one epoch each per round, so all see the same mix of machine states on a shared
machine; the numbers are medians over the rounds. Images are random uint8 noise by default (speed does not
depend on what the pixels show); --dataset trains on a real .npz instead. The last line is machine-readable.

    python benchmarks/conv_speed.py                       # 3 rounds of 640 images (a few minutes on 2 cores)
    python benchmarks/conv_speed.py --rounds 5 --images 1280 --dataset runs/emoji-google.npz
    python benchmarks/conv_speed.py --device cuda --images 12800 --rounds 5   # adds bf16 and CUDA-graph series

On a GPU, vaelab runs three ways (fp32 with its CUDA graph, fp32 launching every kernel, bf16 with the graph) and
the plain loop two (fp32, and bf16 under torch.autocast), all channels_last; the timers wait for the device.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vaelab import TrainConfig, resume, train
from vaelab.data import ImageData, load_dataset, to_unit
from vaelab.models.vae import VAE

LATENT, BATCH, SIGMA = 32, 128, 0.1


def plain_epoch(model: VAE, opt: torch.optim.Optimizer, x: torch.Tensor, gen: torch.Generator,
                bf16: bool = False) -> float:
    """One epoch of the textbook loop; returns its wall time (after the device has finished)."""
    d = x[0].numel()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    order = torch.randperm(len(x), generator=gen).to(x.device)
    for i in range(0, len(x), BATCH):
        xb = x[order[i:i + BATCH]]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            mu, logvar = model.encoder(xb)
            mu, logvar = mu.float(), logvar.float()
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            mean = model.decoder(z)[0].float()
        rec = 0.5 * (xb - mean).square().flatten(1).sum(1) / SIGMA**2 + d * math.log(SIGMA * math.sqrt(2 * math.pi))
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
        loss = (rec + kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=640, help="training images per epoch (default 640: 5 steps)")
    ap.add_argument("--dataset", help="a .npz of 64x64 RGB images (default: random uint8 images)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"

    if args.dataset:
        data = load_dataset(args.dataset)
        data = ImageData(data.name, data.train[:args.images], data.test[:256])
    else:
        rng = np.random.default_rng(0)
        data = ImageData("noise", rng.integers(0, 256, (args.images, 3, 64, 64), dtype=np.uint8),
                         rng.integers(0, 256, (256, 3, 64, 64), dtype=np.uint8))
    assert data.shape == (3, 64, 64), data.shape
    cfg = dict(arch="conv", latent_dim=LATENT, likelihood="gaussian", sigma=str(SIGMA), batch_size=BATCH,
               device=args.device, seed=0)
    x = to_unit(data.train).to(args.device)

    # series name -> extra vaelab options; plain loops: (layout, bf16)
    ours = {"vaelab": {}}
    plain_kinds = {"plain nchw": ("nchw", False), "plain channels_last": ("channels_last", False)}
    if cuda:
        ours = {"vaelab": {}, "vaelab no graph": {"cuda_graph": False}, "vaelab bf16": {"precision": "bf16"}}
        plain_kinds = {"plain channels_last": ("channels_last", False), "plain bf16": ("channels_last", True)}
    plains = {}
    for name, (layout, bf16) in plain_kinds.items():
        torch.manual_seed(0)
        model = VAE.from_config(TrainConfig(**cfg), data.shape).to(args.device)
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        xs = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()
        plains[name] = (model, torch.optim.Adam(model.parameters(), lr=TrainConfig(**cfg).lr, fused=True), xs,
                        torch.Generator().manual_seed(0), bf16)

    times: dict[str, list[float]] = {k: [] for k in [*ours, *plains]}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "images.npz", x_train=data.train, x_test=data.test)  # what resume reloads
        for r in range(args.rounds + 1):  # round 0 warms up every series and is not counted
            for name, extra in ours.items():
                out = Path(tmp) / name.replace(" ", "-")
                if r == 0:
                    run = train(TrainConfig(**cfg, **extra, dataset=str(Path(tmp) / "images.npz"), epochs=1,
                                            out=str(out)), progress=False)
                else:
                    run = resume(out, progress=False, epochs=r + 1)
                if r:
                    times[name].append([m["seconds"] for m in run.metrics if m["split"] == "train"][-1])
            for name, (model, opt, xs, gen, bf16) in plains.items():
                t = plain_epoch(model, opt, xs, gen, bf16)
                if r:
                    times[name].append(t)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v and r), flush=True)

    n = len(data.train)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    best_plain = max(rate["plain channels_last"], rate.get("plain nchw", 0.0))
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, " \
        f"{args.threads} thread(s)"
    print(f"\n{where}, torch {torch.__version__}, {n} images/epoch, batch {BATCH}, medians over {args.rounds} rounds")
    for k, v in rate.items():
        print(f"  {k:<22} {v:9.1f} images/s")
    print(f"  vaelab / plain (faster fp32 loop): {rate['vaelab'] / best_plain:.3f}x   (goal >= 0.9x)")
    if cuda:
        print(f"  vaelab bf16 / plain bf16: {rate['vaelab bf16'] / rate['plain bf16']:.3f}x; "
              f"CUDA graph / no graph: {rate['vaelab'] / rate['vaelab no graph']:.3f}x; "
              f"bf16 / fp32 (vaelab): {rate['vaelab bf16'] / rate['vaelab']:.3f}x")
    else:
        print(f"  plain channels_last / nchw: {rate['plain channels_last'] / rate['plain nchw']:.3f}x")
    print(json.dumps({"images_per_s": rate, "ratio": rate["vaelab"] / best_plain, "threads": args.threads,
                      "rounds": args.rounds, "images": n, "device": args.device}))


if __name__ == "__main__":
    main()
