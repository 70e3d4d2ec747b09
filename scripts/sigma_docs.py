"""Write σ-study results into docs/sigma-study.md (between the sigma-study markers), figures into docs/sigma-*/.

    python scripts/sigma_docs.py runs/sigma-adam runs/sigma-sgd

Each argument is a folder written by `vaelab sigma-study`; its table, summary and figures go in as they are,
with the command that regenerates them, so no number in that part of the page is typed by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- sigma-study:begin -->", "<!-- sigma-study:end -->"
FIGURES = [("recon_samples.png", "Reconstructions f(mean z) and prior samples per σ"),
           ("manifolds.png", "The 2-D manifold per σ"), ("curves.png", "Test MSE and KL against epoch"),
           ("vs_sigma.png", "KL and sharpness against σ")]


def command(cfg: dict) -> str:
    parts = ["vaelab sigma-study", f"--dataset {cfg['dataset']}", "--sigmas " + ",".join(f"{s:g}" for s in
                                                                                       cfg["sigmas"])]
    if cfg["also"]:
        parts.append("--also " + ",".join(cfg["also"]))
    parts += [f"--latent-dim {cfg['latent_dim']}", f"--epochs {cfg['epochs']}", f"--optimizer {cfg['optimizer']}",
              f"--lr {cfg['lr']:g}"]
    # settings away from the study's defaults, so the command reproduces the numbers it is shown with
    defaults = {"hidden": [400], "batch_size": 128, "limit": None, "seed": 0, "iw_samples": 100,
                "mse_threshold": None}
    for key, default in defaults.items():
        value = cfg.get(key, default)
        if value is not None and value != default:  # None: the study's default
            shown = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
            parts.append(f"--{key.replace('_', '-')} {shown}")
    parts.append(f"--out runs/sigma-{cfg['optimizer']}")
    return " ".join(parts)


def section(folder: Path) -> str:
    study = json.loads((folder / "study.json").read_text())
    cfg = study["config"]
    name = f"{cfg['optimizer']}"
    docs = ROOT / "docs" / f"sigma-{name}"
    docs.mkdir(parents=True, exist_ok=True)
    figs = []
    for fname, caption in FIGURES:
        if (folder / fname).exists():
            shutil.copyfile(folder / fname, docs / fname)
            figs.append(f"![{caption}](sigma-{name}/{fname})")
    summary = (folder / "summary.md").read_text().strip()
    return (f"### {cfg['optimizer']}, lr {cfg['lr']:g}, {cfg['epochs']} epochs, latent {cfg['latent_dim']}, "
            f"{cfg['dataset']}\n\n```bash\n{command(cfg)}\n```\n\n{(folder / 'table.md').read_text().strip()}\n\n"
            f"The study's own summary of this run (its summary.md):\n\n{summary}\n\n"
            + "\n\n".join(figs) + "\n")


def main(folders: list[str]) -> None:
    page = ROOT / "docs" / "sigma-study.md"
    text = page.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{page} has no {BEGIN} ... {END} markers")
    body = "\n".join(section(Path(f)) for f in folders)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")


if __name__ == "__main__":
    main(sys.argv[1:])
