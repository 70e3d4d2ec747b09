"""Conv networks for any image size: stages, channels, mirrored decoder, per-example normalization."""

import pytest
import torch
from torch import nn

from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.models.nets import ConvDecoder, ConvEncoder, ResBlock, conv_channels, n_parameters, stage_sizes
from vaelab.models.vae import VAE


@pytest.mark.parametrize(("shape", "channels", "final"), [
    ((1, 28, 28), [32, 64, 128], (4, 4)),
    ((3, 32, 32), [32, 64, 128], (4, 4)),
    ((3, 64, 64), [32, 64, 128, 256], (4, 4)),
    ((3, 128, 128), [32, 64, 128, 256, 256], (4, 4)),
    ((3, 48, 80), [32, 64, 128, 256], (3, 5)),
    ((1, 9, 9), [32], (5, 5)),
])
def test_default_stages_shrink_the_image_to_about_4x4_with_growing_channels(shape, channels, final):
    assert conv_channels(shape, [32]) == channels
    assert stage_sizes(shape, len(channels))[-1] == final


def test_several_numbers_give_the_stages_explicitly():
    assert conv_channels((3, 64, 64), [16, 48]) == [16, 48]
    assert stage_sizes((3, 64, 64), 2) == [(64, 64), (32, 32), (16, 16)]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 128, 128), (3, 48, 80), (1, 9, 9),
                                   (3, 30, 17)])
@pytest.mark.parametrize("blocks", [0, 2])
def test_the_decoder_retraces_the_encoders_sizes_exactly(shape, blocks):
    hidden = [4] if shape[1] >= 64 else [8]  # small widths: the shapes are what is tested
    enc, dec = ConvEncoder(shape, hidden, 3, blocks), ConvDecoder(shape, hidden, 3, 2, blocks)
    x = torch.rand(2, *shape)
    mu, logvar = enc(x)
    assert mu.shape == logvar.shape == (2, 3)
    out = dec(mu)
    assert len(out) == 2
    assert all(o.shape == (2, *shape) for o in out)
    # mirrored: every stride-2 conv has a transposed twin, every residual block a twin
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    ups = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == len(ups) == len(conv_channels(shape, hidden))
    assert [c.out_channels for c in convs][:-1] == [u.in_channels for u in ups][::-1][:-1]


def test_blocks_add_residual_blocks_that_start_as_the_identity():
    shape = (3, 32, 32)
    plain = ConvEncoder(shape, [8], 4, 0)
    deep = ConvEncoder(shape, [8], 4, 2)
    assert n_parameters(deep) > n_parameters(plain)
    with torch.no_grad():  # copy the shared layers: with zeroed residual branches both compute the same
        for name, p in plain.named_parameters():
            dict(deep.named_parameters())[_twin(name, plain, deep)].copy_(p)
    x = torch.rand(3, *shape)
    torch.testing.assert_close(deep(x)[0], plain(x)[0])


def _twin(name, plain, deep):
    """The name in `deep` of the layer that is `name` in `plain`: the bodies are the same layers with residual
    blocks between, so the k-th layer of `plain` is the k-th non-block layer of `deep`."""
    if not name.startswith("body."):
        return name
    index, rest = name.split(".")[1], name.split(".", 2)[2]
    outside_blocks = [i for i, m in enumerate(deep.body) if not isinstance(m, ResBlock)]
    assert len(outside_blocks) == len(plain.body)
    i = outside_blocks[int(index)]
    if type(deep.body[i]) is type(plain.body[int(index)]):
        return f"body.{i}.{rest}"
    raise KeyError(name)


def test_no_batch_statistics_an_examples_elbo_ignores_the_rest_of_its_batch():
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(arch="conv", hidden=[8], blocks=1, latent_dim=4), (3, 32, 32)).double()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        alone = model.encoder(x[:1])[0]
        in_batch = model.encoder(x)[0][:1]
        torch.testing.assert_close(alone, in_batch)
        torch.testing.assert_close(model.decoder(alone)[0], model.decoder(in_batch)[0])


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"arch": "mlp", "blocks": 2}, "--blocks .* applies to --arch conv only"),
    ({"arch": "conv", "blocks": -1}, "--blocks must be an integer >= 0"),
    ({"likelihood": "gaussian", "mixtures": 3}, "--mixtures 3 applies to discretized-logistic only"),
])
def test_config_rejects_what_does_not_apply(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)


def test_defaults_per_family():
    assert TrainConfig(arch="mlp").model.hidden == [400]
    assert TrainConfig(arch="mlp").model.blocks == 0
    conv = TrainConfig(arch="conv")
    assert conv.model.hidden == [32]
    assert conv.model.blocks == 1
    assert (conv.lr, conv.batch_size) == (5e-4, 16)
    mlp = TrainConfig(arch="mlp")
    assert (mlp.lr, mlp.batch_size) == (1e-3, 128)
    given = TrainConfig(arch="conv", lr=2e-3, batch_size=16)
    assert (given.lr, given.batch_size) == (2e-3, 16)
    again = TrainConfig.from_dict(given.to_dict())  # config.json keeps the resolved values
    assert (again.lr, again.batch_size) == (2e-3, 16)
    assert TrainConfig(likelihood="discretized-logistic").model.sigma == "learned-pixel"
    assert TrainConfig(likelihood="gaussian").model.sigma == "0.1"


@pytest.mark.parametrize(("version", "blind"), [(1, True), (2, False)])
def test_only_the_old_design_is_blind_to_the_scale_of_its_input(version, blind):
    """Version 1 normalised each image on the main path, right after the first linear map of x (encoder) and of z
    (decoder) too: with that map's bias at 0 its encoder sees flat images of grey 0.25 and 1 as one image, and its
    decoder reads only the direction of z. The current design keeps both (docs/models.md, shapes)."""
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(arch="conv", hidden=[8], latent_dim=4, net_version=version), (3, 32, 32))
    enc, dec = model.encoder, model.decoder
    with torch.no_grad():
        first = enc.body[0]
        assert isinstance(first, nn.Conv2d)
        assert first.bias is not None
        first.bias.zero_()
        dec.fc.bias.zero_()
        flat = torch.tensor([0.0, 0.25, 1.0])[:, None, None, None].expand(3, 3, 32, 32)
        black, grey, white = enc(flat)[0]
        z = torch.randn(5, 4)
        at_zero = dec(torch.zeros(1, 4))[0]
        rescaled = (dec(3 * z)[0] - dec(z)[0]).norm() / (dec(z)[0] - at_zero).norm()
    grey_to_white = (white - grey).norm() / (white - black).norm()
    assert (grey_to_white < 0.01) == blind, grey_to_white  # version 2: 0.69
    assert (rescaled < 0.01) == blind, rescaled  # version 2: 2.7 (3z is about 3 times as far from 0 as z)


def test_a_run_saved_before_net_version_loads_as_version_1(tmp_path):
    """config.json of runs saved before the field existed has no net_version: it loads as version 1, whose
    weights (a GroupNorm more on each side) load exactly."""
    import json

    from vaelab.runs import CONFIG, WEIGHTS, load_run, save_weights

    old = TrainConfig(arch="conv", hidden=[8], latent_dim=4, data_shape=[3, 16, 16], net_version=1)
    model = VAE.from_config(old, (3, 16, 16))
    save_weights(model, tmp_path / WEIGHTS)
    d = old.to_dict()
    del d["model"]["net_version"]
    (tmp_path / CONFIG).write_text(json.dumps(d))
    run = load_run(tmp_path)
    assert run.config.model.net_version == 1
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(run.model.reconstruct(x), model.eval().reconstruct(x))
    assert TrainConfig(arch="conv").model.net_version == 3  # conv: the same design as version 2
    with pytest.raises(ConfigError, match="net_version must be an integer from 1 to 3; got 4"):
        TrainConfig(net_version=4)
