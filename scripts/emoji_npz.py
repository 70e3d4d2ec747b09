"""Build a 64x64 RGB .npz from an npm emoji set (real colour images, no download beyond the npm registry).

    cd /tmp && npm pack emoji-datasource-google && tar xzf emoji-datasource-google-*.tgz
    python scripts/emoji_npz.py /tmp/package runs/emoji-google.npz

Every 64x64 PNG of the package (RGBA, LA, P, ...) is composited onto white and stored as uint8 (N, 3, 64, 64);
a seeded shuffle puts 3,400 images in train and the rest in test, each labelled with its emoji category.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

N_TRAIN = 3400


def load(package: Path, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    meta = json.loads((package / "emoji.json").read_text())
    category = {e["image"]: e["category"] for e in meta}
    folder = next((package / "img").glob(f"*/{size}"))
    classes = sorted(set(category.values()))
    images, labels = [], []
    for path in sorted(folder.glob("*.png")):
        im = Image.open(path)
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB").resize((size, size), Image.LANCZOS)
        images.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)
        labels.append(classes.index(category.get(path.name, classes[0])))
    return np.stack(images), np.array(labels), classes


def main(package: str, out: str, seed: int = 0) -> None:
    x, y, classes = load(Path(package))
    order = np.random.default_rng(seed).permutation(len(x))
    tr, te = order[:N_TRAIN], order[N_TRAIN:]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te], classes=np.array(classes))
    print(f"{out}: {len(tr)} train, {len(te)} test images, {x.shape[1:]} uint8, {len(classes)} categories")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
