"""`shapes`: generated colour images with known factors, deterministic from a seed; it trains and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vaelab.cli import main
from vaelab.data import load_dataset
from vaelab.data import shapes as S


def test_same_seed_same_images_other_seed_other_images():
    a, fa = S.generate(40, seed=3)
    b, fb = S.generate(40, seed=3)
    c, _ = S.generate(40, seed=4)
    assert np.array_equal(a, b)
    assert np.array_equal(fa, fb)
    assert not np.array_equal(a, c)
    assert a.shape == (40, 3, 64, 64)
    assert a.dtype == np.uint8
    assert fa.shape == (40, len(S.FACTORS))


def test_factors_cover_their_ranges():
    f = S.sample_factors(4000, seed=0)
    col = {name: f[:, i] for i, name in enumerate(S.FACTORS)}
    assert set(np.unique(col["shape"])) == set(range(len(S.SHAPES)))
    assert set(np.unique(col["background"])) == set(range(len(S.BACKGROUNDS)))
    assert col["hue"].min() >= 0
    assert col["hue"].max() < 1
    assert col["scale"].min() >= 0.5
    assert col["scale"].max() <= 1
    assert col["x"].min() >= 0.25
    assert col["x"].max() <= 0.75
    assert 0 <= col["rotation"].min() < col["rotation"].max() < 90


@pytest.mark.parametrize("shape", range(len(S.SHAPES)))
def test_drawn_object_has_its_colour_position_and_background(shape):
    # hue 1/3 is pure green; the object sits left of centre on a black background
    f = np.array([[shape, 1 / 3, 1.0, 0.35, 0.5, 0.0, 0]], dtype=np.float32)
    img = S.render(f)[0]  # (3, 64, 64)
    cx, cy = int(0.35 * 64), 32
    assert img[:, cy, cx].tolist() == [0, 255, 0]  # the object's centre
    assert img[:, 2, 62].tolist() == [0, 0, 0]
    assert img[:, 62, 2].tolist() == [0, 0, 0]  # background corners
    assert img[:, cy, 60].tolist() == [0, 0, 0]  # right of the object: background
    covered = (img[1] > 128).mean()
    assert 0.02 < covered < 0.2  # an object, not a dot nor the whole image


def test_shapes_differ_from_each_other():
    f = np.array([[k, 0.0, 1.0, 0.5, 0.5, 0.0, 3] for k in range(len(S.SHAPES))], dtype=np.float32)
    masks = S.render(f)[:, 1] < 128  # red on white: the object is where green is low
    areas = masks.reshape(len(S.SHAPES), -1).sum(1)
    assert len(set(areas.tolist())) == len(S.SHAPES)


def test_rotation_turns_the_square():
    f = np.array([[0, 0.0, 1.0, 0.5, 0.5, a, 0] for a in (0.0, 45.0)], dtype=np.float32)
    upright, turned = S.render(f)[:, 0] > 128
    # half-side 0.8 x 0.22 x 64 = 11.3 pixels; turned by 45°, the corner reaches 11.3 x √2 = 15.9 pixels
    assert upright[32, 32 + 10]
    assert not upright[32, 32 + 13]
    assert turned[32, 32 + 14]
    assert not turned[32, 32 + 17]


def test_dataset_has_labels_factors_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(S, "N_TRAIN", 300)
    monkeypatch.setattr(S, "N_TEST", 50)
    data = load_dataset("shapes")
    assert data.shape == (3, 64, 64)
    assert len(data.train) == 300
    assert len(data.test) == 50
    assert data.factor_names == list(S.FACTORS)
    assert data.classes == list(S.SHAPES)
    assert np.array_equal(data.train_labels, data.train_factors[:, 0].astype(np.int64))
    assert isinstance(data.train, np.memmap)
    x, f = S.generate(300, seed=0)
    assert np.array_equal(data.train, x)
    assert np.array_equal(data.train_factors, f)
    small = data.limited(10)
    assert small.train_factors.shape == (10, len(S.FACTORS))
    assert len(small.train_labels) == 10


@pytest.mark.slow
def test_shapes_trains_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "N_TRAIN", 600)
    monkeypatch.setattr(S, "N_TEST", 120)
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "c"))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "shapes", "--arch", "conv", "--hidden", "8", "--epochs", "1",
                 "--latent-dim", "2", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["data_shape"] == [3, 64, 64]
    assert main(["report", str(out), "--iw-samples", "2", "--quiet"]) == 0
    html = (out / "report.html").read_text()
    for figure in ("manifold", "scatter", "factors", "reconstructions", "samples", "traversals"):
        assert f'id="{figure}"' in html
        assert (out / f"{figure}.png").stat().st_size > 5000
    from PIL import Image

    with Image.open(out / "reconstructions.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 60).mean() > 0.001  # the figure is in colour


@pytest.mark.slow
def test_discretized_logistic_trains_and_evaluates_on_shapes(tmp_path, monkeypatch, capsys):
    """The exact 8-bit likelihood on colour images: after two short epochs the model already beats the uniform
    distribution over the 256 levels (8 bits/dim), and eval's numbers agree with the run's last test line."""
    monkeypatch.setattr(S, "N_TRAIN", 512)
    monkeypatch.setattr(S, "N_TEST", 128)
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "c"))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "shapes", "--arch", "conv", "--hidden", "8", "--epochs", "2",
                 "--latent-dim", "8", "--likelihood", "discretized-logistic", "--out", str(out), "--quiet"]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["split"] == "test"
    assert last["bits_per_dim"] < 8.0
    numbers = out / "eval.json"
    assert main(["eval", str(out), "--iw-samples", "4", "--json", str(numbers), "--quiet"]) == 0
    got = json.loads(numbers.read_text())
    assert got["bits_per_dim"] == pytest.approx(last["bits_per_dim"], rel=1e-3)  # other z draws, same model
    assert got["log_px"] >= got["elbo"] - 1e-3 * abs(got["elbo"])  # IWAE with K = 4 bounds log p(x) more tightly


def test_read_label_reads_outlines_not_blobs():
    """A redraw of each image's factors with every shape: the images themselves read back their own shape; the
    same images with the object replaced by a disc of its colour read as circles (whatever they were); a 9x9 box
    blur still reads its shape (soft edges are not a lost outline)."""
    from vaelab.analysis.factors import read_label

    images, f = S.generate(200, seed=5)
    levels = np.arange(len(S.SHAPES))
    assert np.array_equal(read_label(images, f, S.render, levels), f[:, 0])
    discs = f.copy()
    discs[:, 0] = S.SHAPES.index("circle")
    assert (read_label(S.render(discs), f, S.render, levels) == S.SHAPES.index("circle")).all()
    x = torch.from_numpy(images).float() / 255
    blurred = torch.nn.functional.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False)
    assert (read_label(blurred, f, S.render, levels) == f[:, 0]).mean() > 0.9


def test_eval_says_how_often_reconstructions_keep_the_shape(monkeypatch, tmp_path):
    from vaelab.analysis.factors import kept_rows
    from vaelab.analysis.metrics import evaluate
    from vaelab.models.likelihoods import make_likelihood
    from vaelab.models.vae import VAE

    images, f = S.generate(120, seed=6)
    x = torch.from_numpy(images)
    model = VAE((3, 64, 64), "conv", [4], 2, make_likelihood("gaussian", "0.1", 1))

    def numbers(reconstruct):
        monkeypatch.setattr(model, "reconstruct", reconstruct)
        return evaluate(model, x, lambda b: b.float() / 255, torch.as_tensor(f[:, 0]), iw_samples=1,
                        batch_size=50, factors=f, factor_names=list(S.FACTORS), renderer=S.render)["label_kept"]

    exact = numbers(lambda b: b)
    assert exact == {"factor": "shape", "share": 1.0, "levels": 4}
    flat = numbers(lambda b: b.mean((2, 3), keepdim=True).expand_as(b))  # colour only, no object
    assert flat["share"] < 0.6
    assert "shape kept in reconstructions" in kept_rows(flat)[0][0]
