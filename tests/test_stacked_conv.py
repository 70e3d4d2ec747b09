"""The conv networks of a batched ensemble (vaelab.training.stacked_conv): one grouped pass equals each member's own
network, outputs and gradients; what it does not know trains alone; a conv member of `vaelab sweep --batched`
equals its run trained alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import vaelab
from vaelab.data import load_dataset
from vaelab.models.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vaelab.runs import Run, load_run
from vaelab.training import stacked_conv
from vaelab.training.ensemble import group_key, groups, share_weights, train_ensemble


def _close(a: torch.Tensor, b: torch.Tensor, name: str, scaled: float = 1e-5) -> None:
    """Equal up to float rounding (grouped and plain convolutions sum in different orders): within `scaled` of
    the largest value of b."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=scaled * float(b.detach().abs().max()) + 1e-7, msg=name)


@pytest.mark.parametrize(("shape", "hidden", "blocks", "n_params"), [
    ((1, 28, 28), [4], 1, 1),
    ((3, 20, 28), [4], 0, 2),  # odd, non-square: the transposed convs' output padding differs per side
    ((3, 32, 32), [4, 6], 2, 1),
])
def test_stacked_conv_matches_each_member_with_its_gradients(shape, hidden, blocks, n_params):
    torch.manual_seed(0)
    m, latent, batch = 3, 5, 4
    encs = [ConvEncoder(shape, hidden, latent, blocks) for _ in range(m)]
    decs = [ConvDecoder(shape, hidden, latent, n_params, blocks) for _ in range(m)]
    with torch.no_grad():  # blocks start as the identity: give their zeroed convs a gradient path of their own
        for p in (p for net in (*encs, *decs) for p in net.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    assert stacked_conv.stackable(encs[0], decs[0])
    enc_w, dec_w = share_weights(encs), share_weights(decs)  # each member's parameters: views of the stacks
    conv = enc_w["body.0.weight"]
    assert conv[0].is_contiguous(memory_format=torch.channels_last)  # each member's weights keep their layout
    xs, zs = torch.randn(m, batch, *shape), torch.randn(m, batch, latent)  # (M, B, C, H, W), (M, B, L)
    mean, logvar = stacked_conv.encode(encs[0], enc_w, xs)
    outs = stacked_conv.decode(decs[0], dec_w, zs)
    assert mean.shape == logvar.shape == (m, batch, latent)
    assert [o.shape for o in outs] == [(m, batch, *shape)] * n_params
    weights = torch.randn(m, batch, latent)  # an arbitrary loss, to compare gradients

    def loss(k, mu, lv, out):
        return (mu * weights[k]).sum() + (lv ** 2).sum() + sum((o ** 2).sum() for o in out)

    sum(loss(k, mean[k], logvar[k], [o[k] for o in outs]) for k in range(m)).backward()
    for k in range(m):
        mu_k, lv_k = encs[k](xs[k])
        outs_k = decs[k](zs[k])
        _close(mean[k], mu_k, "mean")
        _close(logvar[k], lv_k, "logvar")
        for a, b in zip(outs, outs_k, strict=True):
            _close(a[k], b, "decoder output")
        loss(k, mu_k, lv_k, outs_k).backward()
        for net, w in ((encs[k], enc_w), (decs[k], dec_w)):
            for name, p in net.named_parameters():
                _close(w[name].grad[k], p.grad, name)
    assert conv.grad is not None
    assert conv.grad.stride() == conv.stride()


class _Scaled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_only_networks_it_knows_are_stacked():
    shape, enc, dec = (1, 12, 12), ConvEncoder((1, 12, 12), [4], 3), ConvDecoder((1, 12, 12), [4], 3, 1)
    assert stacked_conv.stackable(enc, dec)
    assert not stacked_conv.stackable(MLPEncoder(shape, [8], 3), MLPDecoder(shape, [8], 3, 1))
    for change in (lambda e, d: e.body.insert(1, nn.BatchNorm2d(4)),  # a layer it does not know
                   lambda e, d: e.body.__setitem__(0, _Scaled(1, 4, 3, stride=2, padding=1)),  # a subclass
                   lambda e, d: setattr(d.body[-1], "padding_mode", "circular")):  # a setting it does not reproduce
        enc, dec = ConvEncoder(shape, [4], 3), ConvDecoder(shape, [4], 3, 1)
        change(enc, dec)
        assert not stacked_conv.stackable(enc, dec)


def test_conv_runs_of_the_same_shapes_share_an_ensemble():
    base = vaelab.TrainConfig(dataset="fashion-mnist", arch="conv", hidden=[8], out="x")
    configs = [base.replace(sigma="0.1"), base.replace(sigma="1", beta=4.0, seed=3, lr=3e-3),
               base.replace(sigma="0.1", blocks=0), base.replace(sigma="0.1", arch="mlp", hidden=[8], blocks=0),
               base.replace(sigma="0.1", blocks=0, free_bits=0.5)]
    assert group_key(configs[0]) is not None
    assert groups(configs) == [[0, 1], [2, 4], [3]]
    assert group_key(vaelab.TrainConfig(dataset="fashion-mnist", arch="hierarchical", out="x")) is None


def test_a_network_without_a_batched_pass_trains_alone(monkeypatch):
    from vaelab.training import ensemble

    config = vaelab.TrainConfig(dataset="fashion-mnist", arch="conv", hidden=[8], sigma="0.1", out="x")
    monkeypatch.setattr(stacked_conv, "stackable", lambda encoder, decoder: False)  # as for a layer it does not know
    ensemble._stackable.cache_clear()
    try:
        assert group_key(config) is None
    finally:
        ensemble._stackable.cache_clear()


@pytest.mark.slow
def test_a_conv_ensemble_member_equals_the_run_trained_alone(tmp_path, fashion_dir):
    """The ensemble `vaelab sweep --batched` trains (train_ensemble), on 256 real training images; each epoch's
    evaluation on the first 500 test images, which keeps the test short (the sweep's own evaluation of 10,000
    conv reconstructions would take a minute)."""
    from safetensors.torch import load_file

    data = load_dataset("fashion-mnist")
    data = dataclasses.replace(data, test=data.test[:500], test_labels=None)
    base = vaelab.TrainConfig(dataset="fashion-mnist", arch="conv", limit=256, hidden=[8], batch_size=64, epochs=2,
                              beta=2.0)
    configs = [base.replace(sigma="0.1", seed=0, out=str(tmp_path / "m0")),
               base.replace(sigma="0.3", seed=1, out=str(tmp_path / "m1"))]
    assert groups(configs) == [[0, 1]]
    results = train_ensemble(configs, progress=False, data=data)
    assert all(isinstance(r, Run) for r in results)
    alone = vaelab.train(configs[1].replace(out=str(tmp_path / "alone")), progress=False, data=data)
    member = load_run(tmp_path / "m1")
    a, b = (load_file(d / "model.safetensors") for d in (tmp_path / "m1", tmp_path / "alone"))
    assert a.keys() == b.keys()
    for k in a:  # 8 steps apart only in the rounding of grouped convolutions, which Adam amplifies where a
        # gradient is near zero (a step moves a weight by up to lr = 1e-3 whatever its gradient's size)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)
    for m, r in zip(member.metrics, alone.metrics, strict=True):
        assert (m["epoch"], m["split"]) == (r["epoch"], r["split"])
        assert m.keys() == r.keys()
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert m["kl"] == pytest.approx(r["kl"], rel=1e-5)
    ck_a, ck_b = (load_file(d / "checkpoint.safetensors") for d in (tmp_path / "m1", tmp_path / "alone"))
    assert torch.equal(ck_a["rng.cpu"], ck_b["rng.cpu"])
    assert torch.equal(ck_a["rng.shuffle"], ck_b["rng.shuffle"])
    moments = [k for k in ck_b if k.startswith("optim.")]
    assert moments
    assert set(moments) == {k for k in ck_a if k.startswith("optim.")}
    for k in moments:
        _close(ck_a[k], ck_b[k], k, scaled=1e-4)
    other = load_file(tmp_path / "m0" / "model.safetensors")
    assert not torch.allclose(other["encoder.body.0.weight"], a["encoder.body.0.weight"])
