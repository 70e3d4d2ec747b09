"""Training on memory-mapped data: how fast, against resident data, and how much of the process's own memory.

1. Speed. Fashion-MNIST's training images (the first --limit, default 5,000; and the first 1,000 test images)
   are saved as .npy files and trained on twice per round, with `vaelab.train` and the same config (784-400-20
   MLP, Gaussian σ = 0.1, batch 128, one epoch, seed 0):
   - resident: the arrays in memory (tensors that share them), each batch one index_select;
   - mapped: the same arrays memory-mapped from the .npy files (as the decoded cache and .npy datasets are),
     each batch gathered by a background thread while the previous step runs (vaelab.data.BatchSource).
   The files are read once before timing, so the mapped series runs on page-cached data. Seconds per epoch are
   the `seconds` of the epoch's train row in metrics.jsonl (the training loop alone). The two series take
   turns, --rounds rounds (default 25: short rounds, many pairs), the first of each pair alternating. The
   speed ratio is resident seconds / mapped seconds: 1.0 means the same speed, the target is >= 0.9. Printed:
   the median of the per-round ratios (each round's pair saw nearly the same machine state) and the ratio of
   the two medians. Both runs end with bit-identical weights (checked).
2. Memory. A fresh process trains one epoch (12288-64-8 MLP, batch 256) on a 1.2 GB memory-mapped set (100,000
   random 3x64x64 uint8 images, written as .npy files) and samples its own RssAnon (anonymous memory:
   /proc/self/status) every 20 ms. Pages of the mapped file are page cache (RssFile), which the kernel can drop;
   RssAnon is what the process itself holds. Printed: RssAnon before the data is opened, its peak during the
   epoch's training loop, and its peak over the whole run (the per-epoch evaluation of both splits included).
   A second fresh process does the same on a set 50 times smaller (24 MB): what the 1.2 GB set adds to the
   process's memory is the difference of the two peaks.
3. Folder loads. --folder-images PNG files (64x64 RGB `shapes`, default 20,000) are written to a folder; the
   first `load_dataset` decodes them into the decoded cache, the second finds the cache valid (a listing and a
   stat per file against the manifest) and memory-maps it. Both wall times are printed.

    python benchmarks/data_speed.py                 # all three parts (about 20 minutes on 2 busy cores)
    python benchmarks/data_speed.py --skip-memory --folder-images 0   # the speed part alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from vaelab import TrainConfig, train
from vaelab.data import ImageData, load_dataset

MIB = 1 << 20


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(hidden=[400], latent_dim=20, likelihood="gaussian", sigma="0.1", batch_size=128, epochs=1, seed=0,
                device="cpu", out=str(out))
    return TrainConfig(**{**base, **kw})


def speed(rounds: int, limit: int, tmp: Path) -> dict:
    fashion = load_dataset("fashion-mnist", limit=limit)
    np.save(tmp / "train.npy", fashion.train)
    np.save(tmp / "test.npy", fashion.test[:1000])
    mapped = ImageData("mapped", np.load(tmp / "train.npy", mmap_mode="c"), np.load(tmp / "test.npy", mmap_mode="c"))
    resident = ImageData("resident", np.array(mapped.train), np.array(mapped.test))
    for a in (mapped.train, mapped.test):  # into the page cache
        int(np.asarray(a).sum(dtype=np.int64))
    seconds: dict[str, list[float]] = {"resident": [], "mapped": []}
    weights = {}
    series = (("resident", resident), ("mapped", mapped))
    for r in range(rounds):
        for name, data in series if r % 2 == 0 else series[::-1]:
            run = train(_config(tmp / f"{name}-{r}", dataset=name), progress=False, data=data)
            seconds[name].append(run.metrics[0]["seconds"])
            weights[name] = {k: v.clone() for k, v in run.model.state_dict().items()}
            print(f"round {r + 1}/{rounds} {name:8s} {seconds[name][-1]:.2f} s/epoch", file=sys.stderr, flush=True)
    identical = all(torch.equal(weights["resident"][k], weights["mapped"][k]) for k in weights["resident"])
    med = {k: statistics.median(v) for k, v in seconds.items()}
    paired = statistics.median(a / b for a, b in zip(seconds["resident"], seconds["mapped"], strict=True))
    return {"resident_s": med["resident"], "mapped_s": med["mapped"], "ratio": med["resident"] / med["mapped"],
            "paired_ratio": paired, "identical_weights": identical, "rounds": rounds, "images": len(mapped.train),
            "all": seconds}


def write_big_set(tmp: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """n random 3x64x64 uint8 images as <n>-train.npy (and n // 20 as <n>-test.npy), a block at a time."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, count in ((f"{n}-train.npy", n), (f"{n}-test.npy", max(1, n // 20))):
        path = tmp / name
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, 3, 64, 64))
        for start in range(0, count, 4096):
            block = min(4096, count - start)
            out[start:start + block] = rng.integers(0, 256, (block, 3, 64, 64), dtype=np.uint8)
        out.flush()
        del out
        paths.append(path)
    return paths[0], paths[1]


def memory_child(train_path: str, test_path: str, out: str) -> None:
    """Runs in a fresh process: train one epoch on the mapped set, sampling RssAnon throughout and noting the
    peak of the training loop (the steps) apart from that of the whole run (loading, evaluation included)."""
    import vaelab.training.trainer as trainer

    before = rss_anon_mib()
    peak = {"loop": before, "all": before}
    phase = ["setup"]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = rss_anon_mib()
            peak["all"] = max(peak["all"], rss)
            if phase[0] == "loop":
                peak["loop"] = max(peak["loop"], rss)
            time.sleep(0.02)

    run_epoch = trainer._run_epoch

    def marked(*args, **kwargs):  # the training loop of an epoch, between the data setup and the evaluation
        phase[0] = "loop"
        try:
            return run_epoch(*args, **kwargs)
        finally:
            phase[0] = "eval"

    trainer._run_epoch = marked
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    data = ImageData("big", np.load(train_path, mmap_mode="c"), np.load(test_path, mmap_mode="c"))
    t0 = time.perf_counter()
    run = train(_config(Path(out), dataset="big", hidden=[64], latent_dim=8, batch_size=256), progress=False,
                data=data)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    print(json.dumps({"rss_anon_before_mib": before, "rss_anon_loop_peak_mib": peak["loop"],
                      "rss_anon_peak_mib": max(peak["all"], rss_anon_mib()),
                      "set_mib": (data.train.nbytes + data.test.nbytes) / MIB, "seconds": seconds,
                      "train_seconds": run.metrics[0]["seconds"], "images": len(data.train)}))


def memory(n: int, tmp: Path) -> dict:
    out = {}
    for label, count in (("big", n), ("small", max(2, n // 50))):
        train_path, test_path = write_big_set(tmp, count)
        code = [sys.executable, __file__, "--memory-child", str(train_path), str(test_path), str(tmp / f"run-{label}")]
        r = subprocess.run(code, capture_output=True, text=True, env={**os.environ}, check=False)
        if r.returncode != 0:
            raise SystemExit(f"memory run failed:\n{r.stderr}")
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
        train_path.unlink()
        test_path.unlink()
    return out


def folder_loads(n: int, tmp: Path) -> dict:
    from PIL import Image

    from vaelab.data import shapes

    folder = tmp / "folder"
    folder.mkdir()
    for start in range(0, n, 1000):
        images, _ = shapes.generate(min(1000, n - start), seed=start)
        for i, im in enumerate(images):
            Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"{start + i:07d}.png", compress_level=1)
    os.environ["VAELAB_CACHE"] = str(tmp / "cache")
    t0 = time.perf_counter()
    first = load_dataset(str(folder))
    t1 = time.perf_counter()
    second = load_dataset(str(folder))
    t2 = time.perf_counter()
    assert np.array_equal(first.test, second.test)
    return {"images": n, "first_s": t1 - t0, "cached_s": t2 - t1, "cpus": os.cpu_count()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=25, help="epochs of each series (default 25)")
    p.add_argument("--limit", type=int, default=5_000, help="training images of the speed part (default 5,000)")
    p.add_argument("--images", type=int, default=100_000, help="images of the memory run's set (default 100,000: "
                   "1.2 GB)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the batch thread is extra)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--folder-images", type=int, default=20_000, help="PNG files of the folder-load part (default "
                   "20,000; 0 skips it)")
    p.add_argument("--memory-child", nargs=3, metavar=("TRAIN", "TEST", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    results = {"threads": args.threads, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="vaelab-data-speed-") as tmp:
        if not args.skip_speed:
            s = speed(args.rounds, args.limit, Path(tmp))
            results["speed"] = s
            print(f"speed: {s['images']} images, resident {s['resident_s']:.2f} s/epoch, mapped {s['mapped_s']:.2f} "
                  f"s/epoch (medians of {s['rounds']}); mapped runs at {s['paired_ratio']:.3f}x the resident speed "
                  f"(median of per-round ratios; ratio of medians {s['ratio']:.3f}; target >= 0.9); weights "
                  f"bit-identical: {s['identical_weights']}")
        if not args.skip_memory:
            m = memory(args.images, Path(tmp))
            results["memory"] = m
            for label in ("big", "small"):
                r = m[label]
                base = r["rss_anon_before_mib"]
                print(f"memory: a {r['set_mib']:.0f} MiB memory-mapped set ({r['images']} images 3x64x64): RssAnon "
                      f"{base:.0f} MiB before loading, peak {r['rss_anon_loop_peak_mib']:.0f} MiB in the training loop "
                      f"(+{r['rss_anon_loop_peak_mib'] - base:.0f}), {r['rss_anon_peak_mib']:.0f} MiB over the whole "
                      f"run with the per-epoch evaluation (+{r['rss_anon_peak_mib'] - base:.0f}); {r['seconds']:.0f} s")
            big, small = m["big"], m["small"]
            print(f"memory: the {big['set_mib']:.0f} MiB set adds "
                  f"{big['rss_anon_loop_peak_mib'] - small['rss_anon_loop_peak_mib']:+.0f} MiB to the training loop's "
                  f"peak RssAnon and {big['rss_anon_peak_mib'] - small['rss_anon_peak_mib']:+.0f} MiB to the whole "
                  f"run's, against the {small['set_mib']:.0f} MiB set")
        if args.folder_images:
            f = folder_loads(args.folder_images, Path(tmp))
            results["folder"] = f
            print(f"folder: {f['images']} PNG files 64x64; first load (decode into the cache) {f['first_s']:.1f} s, "
                  f"second load (cache valid, mapped) {f['cached_s']:.2f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
