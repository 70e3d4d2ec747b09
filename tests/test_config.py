"""Configs per role: built flat or by role, frozen, saved and reloaded exactly, config.json files of the earlier
flat format still load, and the CLI's flags are generated from the same declarations."""

import dataclasses
import json
import typing

import pytest
import torch

from vaelab import DataConfig, ModelConfig, OptimConfig, RuntimeConfig, TrainConfig, load_run
from vaelab.cli import build_parser
from vaelab.config import ROLES, choices_of, flag_fields
from vaelab.errors import ConfigError
from vaelab.models.likelihoods import LIKELIHOODS
from vaelab.models.vae import VAE
from vaelab.runs import CONFIG, WEIGHTS, save_weights

# what a run directory's config.json held before settings were grouped by role
FLAT_CONFIG = {
    "dataset": "fashion-mnist", "data_dir": None, "limit": 500, "binarize": "none", "image_size": None,
    "center_crop": None, "background": "white", "skip_bad_images": False, "arch": "mlp", "hidden": [16],
    "blocks": 0, "latent_dim": 3, "likelihood": "gaussian", "sigma": "0.3", "mixtures": 1, "beta": 1.0,
    "kl_warmup": 0.0, "free_bits": 0.0, "optimizer": "adam", "lr": 0.001, "batch_size": 128, "epochs": 2,
    "seed": 0, "device": "auto", "precision": "fp32", "cuda_graph": True, "handwritten_grads": True,
    "out": "runs/old", "name": None, "tensorboard": None, "data_shape": [1, 6, 5],
}


def test_flat_settings_and_role_configs_build_the_same_config():
    flat = TrainConfig(dataset="shapes", arch="conv", latent_dim=4, beta=0.5, device="cpu")
    by_role = TrainConfig(data=DataConfig(dataset="shapes"), model=ModelConfig(arch="conv", latent_dim=4),
                          optim=OptimConfig(beta=0.5), runtime=RuntimeConfig(device="cpu"))
    assert flat == by_role
    assert (flat.lr, flat.batch_size) == (5e-4, 16)  # the architecture's defaults, resolved once
    mixed = TrainConfig(model=ModelConfig(arch="conv"), latent_dim=4)  # a flat setting overrides its role's
    assert mixed.model.latent_dim == 4
    assert mixed.model.arch == "conv"


def test_configs_are_frozen_and_replace_returns_a_new_one():
    config = TrainConfig(latent_dim=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.latent_dim = 5  # type: ignore[misc]
    other = config.replace(latent_dim=5, out="elsewhere")
    assert (config.model.latent_dim, config.runtime.out) == (3, None)
    assert (other.model.latent_dim, other.runtime.out) == (5, "elsewhere")


def test_save_and_load_round_trip_exactly(tmp_path):
    config = TrainConfig(dataset="shapes", arch="conv", hidden="8,16", likelihood="discretized-logistic",
                         mixtures=3, free_bits=0.1, image_size="32x24", precision="bf16")
    config.save(tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert set(saved) == set(ROLES)
    assert saved["model"]["hidden"] == [8, 16]
    assert TrainConfig.load(tmp_path / "c.json") == config


@pytest.mark.parametrize(("bad", "needle"), [
    ({"model": {"latent": 3}}, r"unknown model config keys \['latent'\]; allowed keys: \["),
    ({"model": {}, "extras": {}}, r"unknown config sections \['extras'\]"),
    ({"latent": 3}, r"unknown config keys \['latent'\]"),
    ({"optim": {"lr": -1.0}}, r"--lr must be a finite number > 0; got -1.0"),
])
def test_bad_config_files_get_one_line(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(bad)


def test_a_run_saved_in_the_flat_format_still_loads(tmp_path):
    (tmp_path / CONFIG).write_text(json.dumps(FLAT_CONFIG))
    config = TrainConfig.load(tmp_path / CONFIG)
    assert config.model.hidden == [16]
    assert config.optim.epochs == 2
    assert config.runtime.out == "runs/old"
    torch.manual_seed(0)
    model = VAE.from_config(config, (1, 6, 5))
    save_weights(model, tmp_path / WEIGHTS)
    run = load_run(tmp_path)
    assert run.config == config
    for (name, p), q in zip(model.state_dict().items(), run.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_every_setting_is_a_train_flag_with_its_declared_choices():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {a.dest: a for a in train._actions}
    for role, f in flag_fields():
        assert f.name in flags, f.name
        allowed = choices_of(f, role)
        if allowed:
            assert tuple(flags[f.name].choices) == allowed, f.name
        assert flags[f.name].help.startswith(f.metadata["help"]), f.name
    likelihood = next(f for f in dataclasses.fields(ModelConfig) if f.name == "likelihood")
    assert choices_of(likelihood, ModelConfig) == tuple(LIKELIHOODS)  # the registry's names, read when asked
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["arch"]) == tuple(flags["arch"].choices)


def test_sigma_study_takes_its_training_flags_from_the_same_declarations():
    sub = build_parser()._subparsers._group_actions[0].choices
    train = {a.dest: a for a in sub["train"]._actions}
    study = {a.dest: a for a in sub["sigma-study"]._actions}
    for name in ("arch", "optimizer", "device", "hidden", "blocks", "lr", "batch_size", "epochs", "seed"):
        assert study[name].choices == train[name].choices, name
        assert study[name].help.split(" (default")[0] == train[name].help.split(" (default")[0], name
    assert "(default 2)" in study["latent_dim"].help  # the study's own default, shown where it differs
    assert "(default 20)" in train["latent_dim"].help
