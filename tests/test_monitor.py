"""--tensorboard: the event files hold each epoch's numbers and image grids, read back with TensorBoard's own reader."""

import json
import sys

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from vaelab import TrainConfig, train
from vaelab.cli import main
from vaelab.training.monitor import grid


def test_event_files_hold_the_epochs_numbers_and_images(tmp_path, fashion):
    board = tmp_path / "tb"
    run = train(TrainConfig(dataset="fashion-mnist", limit=300, hidden=[32], latent_dim=2, epochs=2, batch_size=100,
                            sigma="learned", out=str(tmp_path / "run"), tensorboard=str(board)),
                progress=False, data=fashion)
    acc = event_accumulator.EventAccumulator(str(board), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("loss", "rec", "kl", "bits_per_dim", "mse", "sigma"):
            events = {e.step: e.value for e in acc.Scalars(f"{key}/{row['split']}")}
            assert events[row["epoch"]] == pytest.approx(row[key], rel=1e-6), (key, row["split"])
    speed = {e.step: e.value for e in acc.Scalars("time/samples_per_second")}
    assert speed[1] == pytest.approx(300 / rows[0]["seconds"], rel=1e-6)
    assert set(tags["images"]) == {"reconstructions", "prior_samples"}
    recon = acc.Images("reconstructions")
    prior = acc.Images("prior_samples")
    assert [e.step for e in recon] == [1, 2]
    assert [e.step for e in prior] == [1, 2]
    # 2 rows of 8 images of 28 x 28 with 1-pixel white borders; 8 x 8 prior samples
    assert (recon[0].height, recon[0].width) == (2 * 29 + 1, 8 * 29 + 1)
    assert (prior[0].height, prior[0].width) == (8 * 29 + 1, 8 * 29 + 1)
    assert recon[0].encoded_image_string != recon[1].encoded_image_string  # the model changed between epochs


def test_grid_places_images_row_major():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1) / 2  # three 1x1 images: 0, 0.5, 1
    g = grid(images, ncol=2, pad=1)
    assert g.shape == (1, 5, 5)
    assert g[0, 1, 1] == 0.0
    assert g[0, 1, 3] == 0.5
    assert g[0, 3, 1] == 1.0
    assert g[0, 3, 3] == 1.0
    assert g[0, 0].eq(1).all()  # the empty slot and the borders are white


def test_missing_tensorboard_package_is_one_line(tmp_path, tiny_npz, monkeypatch, capsys):
    for name in ("tensorboard", "torch.utils.tensorboard"):  # as if not installed: importing them fails
        monkeypatch.setitem(sys.modules, name, None)
    code = main(["train", "--dataset", str(tiny_npz), "--epochs", "1", "--quiet", "--out", str(tmp_path / "run"),
                 "--tensorboard", str(tmp_path / "tb")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vaelab: error: --tensorboard needs the tensorboard package: pip install 'vaelab[tensorboard]' "
        "(or pip install tensorboard)"]
    assert not (tmp_path / "run").exists()
