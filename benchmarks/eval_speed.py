"""How fast is `vaelab eval --iw-samples K`, measured against this machine's own matrix-multiply rate?

Trains a 784-400-20 MLP VAE with a Bernoulli likelihood (dynamic binarization) briefly on Fashion-MNIST
(default: 1 epoch on 10,000 images; --train-epochs 0 keeps the fresh initialisation), then times the code path
of `vaelab eval` (vaelab.api.evaluate) on the test images with K importance samples. The matmul FLOPs of
that evaluation are counted from the network's layer sizes (and checked against torch's FLOP counter on a
small evaluation); achieved GFLOP/s is printed next to a large sgemm measured in the same process, with the
same threads. The last line is one JSON object.

    python benchmarks/eval_speed.py                      # 10,000 test images, K = 1000
    python benchmarks/eval_speed.py --images 1000 --threads 1

--arch conv times the IWAE alone (vaelab.analysis.metrics.iwae_log_px) on the default conv VAE for 32x32x3
images (stages of 32-64-128 channels, one residual block each, latent 20, Gaussian σ = 0.1), trained briefly on
`shapes` pooled to 32x32 (--train-epochs 0: fresh init). Series, interleaved over --rounds rounds on the same
--images test images and K, medians of wall and CPU seconds:
  vaelab     iwae_log_px;
  reference  the implementation before 2026-12-06, kept below (IW_ROWS = 1024 decoder rows per step and thread);
  floor      the decoder's forward pass alone on the same N·K rows, in vaelab's rows per call;
  bf16       (--with-bf16) vaelab under torch.autocast(bfloat16), with its change in log p(x) on the same noise.

    python benchmarks/eval_speed.py --arch conv                     # 128 images, K = 100, 5 rounds
    python benchmarks/eval_speed.py --arch conv --threads 1 --with-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def sgemm_gflops(device: str = "cpu", reps: int = 8, trials: int = 3) -> tuple[float, float]:
    """Best-of-`trials` rate of an n x n x n float32 matmul on `device` (n = 2048 on the CPU, 8192 on a GPU),
    GFLOP/s per wall second and per CPU second (the GPU is synchronized before each clock is read)."""
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = best_cpu = 0.0
    for _ in range(trials):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        _sync(device)
        flop = 2 * n**3 * reps / 1e9
        best = max(best, flop / (time.perf_counter() - t))
        best_cpu = max(best_cpu, flop / (time.process_time() - c))
    return best, best_cpu


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def linear_flops(module: nn.Module) -> int:
    """Matmul FLOPs of one example through the module's Linear layers (2 per multiply-add)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def eval_flops(model, n: int, k: int) -> int:
    """FLOPs of vaelab.analysis.metrics.evaluate on n images with K samples: matmuls of the ELBO pass (encode, decode),
    the IWAE (encode, K decodes), the posterior means (encode), reconstructions and prior samples (decode),
    plus the 3x3 Laplacian of the sharpness measure on data, reconstructions and samples."""
    enc, dec = linear_flops(model.encoder), linear_flops(model.decoder)
    c, h, w = model.shape
    laplacian = 3 * c * 2 * 9 * (h - 2) * (w - 2)
    return n * (3 * enc + (k + 3) * dec + laplacian)


def counted_flops(model, x: torch.Tensor, k: int) -> int:
    """The same count from torch's FLOP counter on a real (small) evaluation."""
    from torch.utils.flop_counter import FlopCounterMode

    from vaelab.analysis.metrics import evaluate

    with FlopCounterMode(display=False) as counter:
        evaluate(model, x, lambda t: t.float() / 255, None, k, batch_size=len(x))
    return counter.get_total_flops()


def resident_seconds(run_dir: Path, args) -> float:
    """Seconds of vaelab.analysis.metrics.evaluate alone (the work inside `vaelab eval`) on the run's test images
    already on the device: on a GPU, loading the run and decompressing the dataset outweigh the arithmetic."""
    from vaelab.analysis.metrics import evaluate, split_data
    from vaelab.runs import load_run

    run = load_run(run_dir, device=args.device)
    s = split_data(run.config, "test", torch.device(args.device), args.images)
    _sync(args.device)
    t = time.perf_counter()
    evaluate(run.model, s.x, s.prepare, s.labels, args.iw_samples, args.batch_size)
    _sync(args.device)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------- --arch conv
@torch.no_grad()
def reference_iwae_log_px(model, x: torch.Tensor, k: int, batch_size: int, prepare) -> torch.Tensor:
    """iwae_log_px and VAE.iwae_bound as they were before 2026-12-06: IW_ROWS = 1024 decoder rows per step and
    CPU thread whatever the decoder, under no_grad."""
    rows = 1024 * (torch.get_num_threads() if x.device.type == "cpu" else 64)
    group = min(batch_size, max(1, rows // min(k, 16)))
    chunk = max(1, min(k, rows // group))
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[0], group):
        xb = prepare(x[start:start + group])
        q = model.encode(xb)
        total = torch.full((xb.shape[0],), -math.inf, device=xb.device)
        done = 0
        while done < k:
            n = min(chunk, k - done)
            _, log_w = model.importance_terms(xb, q, q.sample(n))  # (n, B)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
            done += n
        out[start:start + xb.shape[0]] = (total - math.log(k)).double().cpu()
    return out


def conv_model(args, tmp: Path):
    """The default conv VAE for 32x32x3 images, trained --train-epochs on 2,048 `shapes` images pooled to
    32x32, and 512 such test images (uint8)."""
    import numpy as np

    from vaelab.config import TrainConfig
    from vaelab.data.shapes import render, sample_factors
    from vaelab.models.vae import VAE
    from vaelab.training.trainer import train

    def images(n: int, seed: int) -> np.ndarray:
        big = torch.as_tensor(render(sample_factors(n, seed))).float()  # (n, 3, 64, 64)
        return torch.nn.functional.avg_pool2d(big, 2).round().to(torch.uint8).numpy()

    npz = tmp / "shapes32.npz"
    np.savez(npz, x_train=images(2048, 0), x_test=images(512, 1))
    config = TrainConfig(dataset=str(npz), arch="conv", likelihood="gaussian", sigma="0.1", latent_dim=20,
                         epochs=max(1, args.train_epochs), out=str(tmp / "run"), device=args.device)
    model = (train(config, progress=False).model if args.train_epochs
             else VAE.from_config(config, (3, 32, 32)).to(args.device))
    return model.eval(), torch.as_tensor(np.load(npz)["x_test"][:args.images]).to(args.device)


def conv_main(args) -> dict:
    from vaelab.analysis.metrics import iwae_log_px, iwae_sizes

    with tempfile.TemporaryDirectory() as tmp:
        model, x = conv_model(args, Path(tmp))
    n, k = len(x), args.iw_samples
    group, chunk = iwae_sizes(model, n, k, args.batch_size, x.device)

    def prepare(t: torch.Tensor) -> torch.Tensor:
        return t.float() / 255

    def floor() -> None:
        with torch.inference_mode():
            z = torch.randn(group * chunk, model.latent_dim, device=x.device)
            for _ in range(-(-n * k // (group * chunk))):
                model.decoder(z)

    def bf16() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            iwae_log_px(model, x, k, args.batch_size, prepare)

    series = {"vaelab": lambda: iwae_log_px(model, x, k, args.batch_size, prepare),
              "reference": lambda: reference_iwae_log_px(model, x, k, args.batch_size, prepare), "floor": floor}
    if args.with_bf16:
        series["bf16"] = bf16
    wall: dict[str, list[float]] = {s: [] for s in series}
    cpu: dict[str, list[float]] = {s: [] for s in series}
    for _ in range(args.rounds):
        for name, run in series.items():
            _sync(args.device)
            t, c = time.perf_counter(), time.process_time()
            run()
            _sync(args.device)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return conv_report(args, model, x, prepare, (group, chunk), wall, cpu)


def conv_report(args, model, x, prepare, sizes, wall, cpu) -> dict:
    from vaelab.analysis.metrics import iwae_log_px

    n, k = len(x), args.iw_samples
    eps = torch.randn(k, n, model.latent_dim, generator=torch.Generator().manual_seed(0)).to(x.device)
    lp = iwae_log_px(model, x, k, args.batch_size, prepare, eps=eps)
    med = {s: statistics.median(v) for s, v in wall.items()}
    med_cpu = {s: statistics.median(v) for s, v in cpu.items()}
    result = {
        "bench": "eval_speed", "model": "conv 32x32x3 32-64-128 latent 20 gaussian 0.1", "device": args.device,
        "weights": f"trained {args.train_epochs} epoch(s) on 2048 shapes-32" if args.train_epochs else "fresh init",
        "threads": torch.get_num_threads(), "images": n, "iw_samples": k, "rounds": args.rounds,
        "rows_per_step": sizes[0] * sizes[1], "reference_rows_per_step": None,
        "images_per_s": {s: round(n / t, 3) for s, t in med.items()},
        "speedup_vs_reference": round(med["reference"] / med["vaelab"], 3),
        "over_floor": round(med["vaelab"] / med["floor"], 3),
        "speedup_vs_reference_cpu": round(med_cpu["reference"] / med_cpu["vaelab"], 3),
        "over_floor_cpu": round(med_cpu["vaelab"] / med_cpu["floor"], 3),
        "seconds": {s: [round(t, 3) for t in v] for s, v in wall.items()},
        "log_px": round(lp.mean().item(), 3), "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    rows_ref = 1024 * (torch.get_num_threads() if args.device == "cpu" else 64)
    group_ref = min(args.batch_size, max(1, rows_ref // min(k, 16)))
    result["reference_rows_per_step"] = min(group_ref, n) * max(1, min(k, rows_ref // group_ref))
    print(f"IWAE of {n} images x K={k} ({n * k} decoder rows), conv 32x32x3, {result['weights']}, "
          f"{result['threads']} thread(s) on {args.device}, medians of {args.rounds} interleaved rounds:")
    for s in med:
        print(f"  {s:9s} {n / med[s]:8.2f} images/s  {med[s]:7.2f} s  ({med_cpu[s]:.2f} CPU s)")
    print(f"  vaelab / reference: {result['speedup_vs_reference']:.2f}x faster "
          f"({result['speedup_vs_reference_cpu']:.2f}x per CPU second); vaelab / floor: "
          f"{result['over_floor']:.2f}x the time ({result['over_floor_cpu']:.2f}x "
          f"per CPU second); rows per decoder call {result['rows_per_step']} (reference "
          f"{result['reference_rows_per_step']})")
    if "bf16" in med:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            d = iwae_log_px(model, x, k, args.batch_size, prepare, eps=eps) - lp
        result["bf16_log_px_change"] = {"mean": round(d.mean().item(), 4), "mean_abs": round(d.abs().mean().item(), 4),
                                        "max_abs": round(d.abs().max().item(), 4)}
        print(f"  bf16 autocast: {med['vaelab'] / med['bf16']:.2f}x vaelab's speed; log p(x) changes by "
              f"{d.mean().item():+.3f} nats/image on average, {d.abs().mean().item():.3f} per image (same noise)")
    _finish(result)
    return result


def _finish(result: dict, why: str = "") -> None:
    """A note when other processes shared the machine, then the machine-readable line."""
    if result["load_average"] > result["cpus"]:
        print(f"  note: load average {result['load_average']} on {result['cpus']} CPUs: other processes shared "
              f"the machine{why}")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, help="test images to evaluate (default 10000; --arch conv: 128)")
    p.add_argument("--iw-samples", type=int, help="K (default 1000; --arch conv: 100)")
    p.add_argument("--batch-size", type=int, default=500, help="as `vaelab eval --batch-size` (default 500)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    p.add_argument("--train-epochs", type=int, default=1, help="epochs of training first; 0 = fresh init")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv"],
                   help="mlp: the whole `vaelab eval` against sgemm (default); conv: the IWAE alone, see above")
    p.add_argument("--rounds", type=int, default=5, help="--arch conv: interleaved rounds (default 5)")
    p.add_argument("--with-bf16", action="store_true", help="--arch conv: also time bf16 autocast")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here; allowed: cpu, cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "conv":
        args.images, args.iw_samples = args.images or 128, args.iw_samples or 100
        return conv_main(args)
    args.images, args.iw_samples = args.images or 10_000, args.iw_samples or 1000

    from vaelab import api
    from vaelab.config import TrainConfig
    from vaelab.models.vae import VAE
    from vaelab.runs import CONFIG, WEIGHTS, save_weights
    from vaelab.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        config = TrainConfig(dataset="fashion-mnist", likelihood="bernoulli", binarize="dynamic", hidden=[400],
                             latent_dim=20, batch_size=128, epochs=max(1, args.train_epochs), limit=10_000,
                             out=str(out), device=args.device)
        if args.train_epochs:
            model = train(config, progress=False).model
        else:  # a fresh initialisation written as a run directory, so `eval` loads it the usual way
            config = config.replace(data_shape=[1, 28, 28])
            out.mkdir()
            config.save(out / CONFIG)
            model = VAE.from_config(config, (1, 28, 28)).to(args.device)
            save_weights(model, out / WEIGHTS)
        x_small = (torch.rand(32, 1, 28, 28) > 0.5).to(torch.uint8).mul(255).to(args.device)
        counted, formula = counted_flops(model, x_small, 8), eval_flops(model, len(x_small), 8)

        before = sgemm_gflops(args.device)
        _sync(args.device)
        t, c = time.perf_counter(), time.process_time()
        numbers = api.evaluate(out, "test", args.iw_samples, args.batch_size, args.images, device=args.device,
                               progress=False)
        _sync(args.device)
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
        after = sgemm_gflops(args.device)
        peak, peak_cpu = max(before[0], after[0]), max(before[1], after[1])
        resident = resident_seconds(out, args) if args.device == "cuda" else None

    flops = eval_flops(model, numbers["n_images"], args.iw_samples)
    achieved, achieved_cpu = flops / seconds / 1e9, flops / cpu_seconds / 1e9
    result = {
        "bench": "eval_speed", "model": "mlp 784-400-20 bernoulli",
        "weights": f"trained {args.train_epochs} epoch(s) on 10000 images" if args.train_epochs else "fresh init",
        "device": args.device, "threads": torch.get_num_threads(), "images": numbers["n_images"],
        "iw_samples": args.iw_samples, "seconds": round(seconds, 3), "gflop": round(flops / 1e9, 1),
        "gflops_achieved": round(achieved, 1), "gflops_sgemm": round(peak, 1),
        "ratio": round(achieved / peak, 3),
        "ratio_per_cpu_second": round(achieved_cpu / peak_cpu, 3),
        "flop_count_check": {"counted": counted, "formula": formula},
        "log_px": round(numbers["log_px"], 2), "elbo": round(numbers["elbo"], 2),
        "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    if resident is not None:
        result["seconds_resident"] = round(resident, 3)
        result["ratio_resident"] = round(flops / resident / 1e9 / peak, 3)
    print(f"eval of {result['images']} test images, K={args.iw_samples}, {result['weights']}, "
          f"{result['threads']} thread(s) on {args.device}: {seconds:.1f} s")
    print(f"  ELBO {numbers['elbo']:.2f}, IWAE log p(x) {numbers['log_px']:.2f} nats/image (binarized test set)")
    print(f"  matmul work {flops / 1e9:.0f} GFLOP (counter check on 32 images: {counted} vs formula {formula})")
    n = 8192 if args.device == "cuda" else 2048
    where = torch.cuda.get_device_name() if args.device == "cuda" else "this machine"
    print(f"  achieved {achieved:.1f} GFLOP/s; float32 sgemm {n}^3 on {where} {peak:.1f} GFLOP/s; "
          f"ratio {achieved / peak:.1%} (aim: >= 70%)")
    if resident is not None:
        print(f"  the evaluation alone, on the test set already on the GPU (without loading the run and the data): "
              f"{resident:.3f} s, {flops / resident / 1e9:.1f} GFLOP/s, ratio {result['ratio_resident']:.1%}")
    if args.device == "cpu":
        print(f"  per CPU second (robust to other processes on a shared machine): {achieved_cpu:.1f} vs "
              f"{peak_cpu:.1f} GFLOP/s, ratio {achieved_cpu / peak_cpu:.1%}")
    _finish(result, ", so the wall-clock ratio understates the code's efficiency")
    return result


if __name__ == "__main__":
    main()
