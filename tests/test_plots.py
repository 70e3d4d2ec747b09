"""plots.py draws each figure from arrays alone; views.py makes those arrays from a model."""

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.analysis import plots, views
from vaelab.config import TrainConfig
from vaelab.models.vae import VAE


def _png(path):
    """The written PNG as an (H, W, 3) float array; fails unless it is a real, non-blank image."""
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    assert img.shape[0] > 100
    assert img.shape[1] > 100
    assert img.std() > 0.05, "blank figure"
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"
    return img


def _images(n, c=1, h=12, w=10, seed=0):
    return np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)


def test_tile_places_images_row_major_with_padding():
    imgs = np.zeros((5, 1, 2, 3), np.float32)
    for i in range(5):
        imgs[i] = i / 10
    out = plots.tile(imgs, ncol=3, pad=1, pad_value=1.0)
    assert out.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert out[1, 1, 0] == 0.0
    assert out[1, 5, 0] == pytest.approx(0.1)
    assert out[4, 5, 0] == pytest.approx(0.4)
    assert out[4, 9, 0] == 1.0  # the empty sixth cell stays padding


def test_manifold(tmp_path):
    z = views.gaussian_quantiles(6)
    img = _png(plots.manifold(_images(36), z, z[::-1], tmp_path / "m.png"))
    assert img.shape[1] > 300


def test_image_rows_and_grid_in_colour(tmp_path):
    rows = [("input", _images(7, c=3)), ("f(z)", _images(7, c=3, seed=1))]
    img = _png(plots.image_rows(rows, tmp_path / "rows.png", "title"))
    assert (np.abs(img[..., 0] - img[..., 1]) > 0.1).any(), "colour images drawn in colour"
    _png(plots.image_grid(_images(20), tmp_path / "grid.png", ncol=5, title="samples"))


@pytest.mark.parametrize("labelled", [True, False])
def test_latent_scatter_colours_labels_and_draws_radius_circles(tmp_path, labelled):
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(300, 2))
    labels = rng.integers(0, 3, 300) if labelled else None
    circles = [(1.5, "68 %: r=1.51"), (3.4, "99.7 %: r=3.41")]
    img = _png(plots.latent_scatter(coords, labels, tmp_path / "s.png", ["a", "b", "c"] if labelled else None,
                                    circles))
    saturated = (img.max(-1) - img.min(-1)) > 0.3
    assert saturated.any() == labelled  # coloured points only when there are labels


def test_training_curves_from_metrics_rows(tmp_path):
    rows = [{"epoch": e, "split": s, "loss": 300 - 10 * e + (s == "test"), "rec": 280 - 12 * e, "kl": 20 + 2 * e}
            for e in range(1, 6) for s in ("train", "test")]
    _png(plots.training_curves(rows, tmp_path / "c.png"))
    _png(plots.training_curves([], tmp_path / "empty.png"))  # a run with no finished epoch still draws


def test_kl_per_dim_greys_inactive_dimensions(tmp_path):
    img = _png(plots.kl_per_dim([3.0, 0.01, 2.0, 0.5], tmp_path / "kl.png", variance=[1.0, 0.0, 0.5, 0.2]))
    blue = (img[..., 2] > 0.6) & (img[..., 0] < 0.3)
    assert blue.sum() > 500


def test_a_failed_figure_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="expected 4"):
        plots.image_rows([("bad", np.zeros((3, 12, 10)))], tmp_path / "bad.png")  # rank 3, not (N, C, H, W)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ views: arrays from a model
@pytest.fixture
def gaussian_model():
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(hidden=[16], latent_dim=3, likelihood="gaussian", sigma="0.1"), (1, 6, 5))
    model.decoder.body[-1].bias.data.fill_(0.5)  # decoder means near mid-grey, away from the clipping at 0 and 1
    return model.eval()


def test_stochastic_rows_show_f_z_and_draws_with_noise_sigma(gaussian_model):
    z = torch.randn(500, 3)
    rows = views.stochastic_rows(gaussian_model, gaussian_model.decode(z), n_draws=2)
    assert [r[0] for r in rows] == ["f(z)", "x~p(x|z) #1", "x~p(x|z) #2"]
    mean, draw = rows[0][1], rows[1][1]
    assert mean.shape == draw.shape == (500, 1, 6, 5)
    inside = (mean > 0.35) & (mean < 0.65)
    assert (draw - mean)[inside].std() == pytest.approx(0.1, rel=0.1)  # f(z) + σ·ε with σ = 0.1


def test_traversals_interpolations_and_prior_samples(gaussian_model):
    rows = views.traversals(gaussian_model, [0, 2], steps=5)
    assert [r[0] for r in rows] == ["z1", "z3"]
    assert rows[0][1].shape == (5, 1, 6, 5)
    x = torch.rand(4, 1, 6, 5)
    inter = views.interpolations(gaussian_model, x[:2], x[2:], steps=6)
    assert len(inter) == 2
    assert inter[0][1].shape == (8, 1, 6, 5)
    np.testing.assert_array_equal(inter[1][1][0], x[1].numpy())  # x_a | ... | x_b
    np.testing.assert_array_equal(inter[1][1][-1], x[3].numpy())
    samples = views.prior_samples(gaussian_model, 9)
    assert samples.shape == (9, 1, 6, 5)
    assert samples.min() >= 0
    assert samples.max() <= 1


def test_decode_images_are_the_decoder_means_clipped_to_0_1(gaussian_model):
    """decode_mean(z) of a Gaussian decoder is unbounded; decode_images(z) is what the figures show."""
    gaussian_model.decoder.body[-1].bias.data.fill_(0.9)  # means around 0.9: many above 1, none clipped yet
    z = 3 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    means = gaussian_model.decode_mean(z).detach()
    assert means.max() > 1, "the setting must produce means outside [0, 1] for the test to mean anything"
    images = views.decode_images(gaussian_model, z)
    assert images.shape == (64, 1, 6, 5)  # (N, C, H, W) of the model's images
    assert images.min() >= 0
    assert images.max() <= 1
    torch.testing.assert_close(images, means.clamp(0, 1), rtol=0, atol=0)
    assert not images.requires_grad


def test_plane_coords_keep_the_origin():
    axes = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    codes = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 2.0]])
    np.testing.assert_allclose(views.plane_coords(codes, axes), [[0, 0], [5, 2]])
