"""How long from a pointer event over the explorer's plane to the new f(z) on screen?

Two runs, trained here in a few seconds each (what matters is the decoder's cost and the image size):
  1. a 2-D MLP VAE (784-128-2, Gaussian σ = 0.1) on 4,000 Fashion-MNIST images, 2 epochs; target <= 50 ms;
  2. a conv VAE (channels 16,32, latent 4) on 768 generated 64x64 RGB images, 1 epoch; target <= 150 ms.
For each, `vaelab.explorer.start` serves the page on 127.0.0.1 and Debian's Chromium (headless, driven by
Playwright) opens it. The pointer then moves through --moves points at a 60 Hz pointer's pace (--pause between moves),
--rounds times. The page itself measures each latency: from the pointer event's timeStamp to the first
animation frame after the new image is drawn (window.vaelabExplorer.latencies). Reported: the median over all
moves, the median of each round, and, for context, the browser's own fetch time of /api/decode (Resource
Timing) and the server's time per decode request seen from a Python client on a kept-alive connection.
Medians: the machine is shared and noisy. The load average is printed with the numbers.

    python benchmarks/explore_latency.py                # 3 rounds of 100 moves per model
    python benchmarks/explore_latency.py --rounds 1 --moves 50
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from explorer_helpers import colour_npz
from vaelab import TrainConfig, load_run, train
from vaelab.explorer import start

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync"]


def runs(tmp: Path) -> list[tuple[str, Path, float]]:
    mlp = TrainConfig(dataset="fashion-mnist", likelihood="gaussian", sigma="0.1", latent_dim=2, hidden=[128],
                      epochs=2, limit=4000, batch_size=100, device="cpu", out=str(tmp / "mlp"))
    conv = TrainConfig(dataset=str(colour_npz(tmp)), arch="conv", hidden=[16, 32], latent_dim=4,
                       likelihood="gaussian", sigma="0.1", epochs=1, batch_size=64, device="cpu", out=str(tmp / "conv"))
    for config in (mlp, conv):
        train(config, progress=False)
    return [("2-D MLP, 1x28x28", tmp / "mlp", 50.0), ("conv latent 4, 3x64x64", tmp / "conv", 150.0)]


def server_ms(port: int, latent_dim: int, n: int = 200) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    times = []
    for k in range(n):
        z = ",".join(f"{math.sin(k + d):.4f}" for d in range(latent_dim))
        t = time.perf_counter()
        conn.request("GET", f"/api/decode?z={z}")
        conn.getresponse().read()
        times.append((time.perf_counter() - t) * 1000)
    conn.close()
    return statistics.median(times)


def measure(browser, name: str, path: Path, target: float, moves: int, rounds: int, pause: float) -> None:
    srv = start(load_run(path), port=0, n_codes=2000)
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']")
        page.evaluate("performance.setResourceTimingBufferSize(100000)")
        box = page.locator("#plane").bounding_box()
        all_lat, per_round, fetches = [], [], []
        for r in range(rounds):
            page.evaluate("window.vaelabExplorer.latencies.length = 0; performance.clearResourceTimings()")
            for k in range(moves):
                t = k / moves
                page.mouse.move(box["x"] + box["width"] * (0.15 + 0.7 * t),
                                box["y"] + box["height"] * (0.5 + 0.3 * math.sin(6 * t + r)))
                time.sleep(pause)
            page.wait_for_timeout(300)
            lat = page.evaluate("window.vaelabExplorer.latencies")
            fetches += page.evaluate("performance.getEntriesByType('resource')"
                                     ".filter(e => e.name.includes('/api/decode')).map(e => e.duration)")
            all_lat += lat
            per_round.append(statistics.median(lat))
        page.close()
        median, server = statistics.median(all_lat), server_ms(srv.port, srv.app.ex.latent_dim)
        print(f"{name}: median {median:.1f} ms pointer -> screen over {len(all_lat)} moves "
              f"({median / target:.2f}x the {target:.0f} ms target); rounds "
              f"{', '.join(f'{m:.1f}' for m in per_round)} ms; browser fetch of /api/decode "
              f"{statistics.median(fetches):.1f} ms; server per decode request {server:.2f} ms")
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moves", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.016,
                    help="seconds between pointer moves (default 0.016: a 60 Hz pointer)")
    ap.add_argument("--browser", default=os.environ.get("VAELAB_BROWSER", "/usr/bin/chromium"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        todo = runs(Path(tmp))
        browser = p.chromium.launch(executable_path=args.browser, args=FLAGS)
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
        for name, path, target in todo:
            measure(browser, name, path, target, args.moves, args.rounds, args.pause)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        browser.close()


if __name__ == "__main__":
    main()
