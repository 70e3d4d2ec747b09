"""The hand-written training step (fused.py) against autograd: same loss, same gradients, same fallbacks."""

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from vaelab import fused
from vaelab.config import TrainConfig
from vaelab.model import VAE, objective

SHAPE = (1, 5, 4)  # odd sizes: nothing may assume square or 28x28 images
LIKELIHOODS = [("bernoulli", "0.1"), ("gaussian", "0.3"), ("gaussian", "learned"), ("gaussian", "learned-pixel"),
               ("gaussian", "optimal"), ("continuous-bernoulli", "0.1"), ("laplace", "0.2"), ("laplace", "learned")]


def _model(lik="bernoulli", sigma="0.1", hidden=(16,), arch="mlp", dtype=torch.float64) -> VAE:
    torch.manual_seed(0)
    cfg = TrainConfig(likelihood=lik, sigma=sigma, hidden=list(hidden), latent_dim=3, arch=arch)
    model = VAE.from_config(cfg, SHAPE).to(dtype).train()
    with torch.no_grad():  # learned scales away from their initial 1, so that their gradients are not special
        for p in model.likelihood.parameters():
            p.fill_(-0.7)
    return model


def _autograd(model, x, beta, free_bits, seed=1):
    torch.manual_seed(seed)
    loss = objective(model.terms(x, extras=False), beta, free_bits)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _fused(model, x, beta, free_bits, seed=1):
    assert fused.applies(model, x)
    torch.manual_seed(seed)
    loss = fused.loss_and_grads(model, x, beta, free_bits)
    return loss, [p.grad for p in model.parameters()]


def _free_bits_between(model, x) -> float:
    """A free-bits level with some latent dimensions below it and some above, so both branches are tested."""
    with torch.no_grad():
        torch.manual_seed(1)
        kl_d, _ = copy.deepcopy(model).terms(x, extras=False).kl_per_dim.mean(0).sort()  # (L,)
    return float(kl_d[0] + kl_d[1]) / 2


@pytest.mark.parametrize("lik,sigma", LIKELIHOODS)
@pytest.mark.parametrize("hidden", [(16,), (12, 7)])
@pytest.mark.parametrize("beta,with_free_bits", [(1.0, False), (0.3, True)])
def test_loss_and_gradients_equal_autograd_in_float64(lik, sigma, hidden, beta, with_free_bits):
    model = _model(lik, sigma, hidden)
    x = torch.rand(6, *SHAPE, dtype=torch.float64)
    if lik == "bernoulli":
        x = x.round()
    free_bits = _free_bits_between(model, x) if with_free_bits else 0.0
    reference = copy.deepcopy(model)
    loss_a, grads_a = _autograd(reference, x, beta, free_bits)
    loss_f, grads_f = _fused(model, x, beta, free_bits)
    torch.testing.assert_close(loss_f, loss_a, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    assert len(grads_f) == len(grads_a) == len(names)
    for name, g_f, g_a in zip(names, grads_f, grads_a, strict=True):
        assert g_f is not None, name
        assert g_f.shape == g_a.shape and g_f.dtype == g_a.dtype, name
        torch.testing.assert_close(g_f, g_a, rtol=1e-10, atol=1e-12, msg=name)
        assert g_f.stride() == g_a.stride(), name  # the layout the optimizer and AccumulateGrad expect
    for buf_f, buf_a in zip(model.buffers(), reference.buffers(), strict=True):  # the optimal-σ running value
        torch.testing.assert_close(buf_f, buf_a)


def test_float32_gradients_are_autograds_to_rounding():
    model = _model(dtype=torch.float32, hidden=(64,))
    x = torch.rand(32, *SHAPE).round()
    reference = copy.deepcopy(model)
    loss_a, grads_a = _autograd(reference, x, 1.0, 0.0)
    loss_f, grads_f = _fused(model, x, 1.0, 0.0)
    torch.testing.assert_close(loss_f, loss_a)
    for g_f, g_a in zip(grads_f, grads_a, strict=True):
        torch.testing.assert_close(g_f, g_a, rtol=1e-4, atol=1e-6)


def test_gradients_replace_old_ones_instead_of_accumulating():
    model = _model()
    x = torch.rand(4, *SHAPE, dtype=torch.float64).round()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e6)
    _, grads_f = _fused(model, x, 1.0, 0.0)
    _, grads_a = _autograd(copy.deepcopy(_model()), x, 1.0, 0.0)
    for g_f, g_a in zip(grads_f, grads_a, strict=True):
        torch.testing.assert_close(g_f, g_a)


def _hooked(model):
    model.decoder.body[0].register_forward_hook(lambda *a: None)


def _frozen(model):
    model.encoder.head.bias.requires_grad_(False)


def _other_activation(model):
    model.decoder.body[1] = nn.Tanh()  # a user's change: the hand-written step only knows ReLU


@pytest.mark.parametrize("case", ["conv", "hook", "frozen", "activation", "autocast", "disabled"])
def test_falls_back_to_autograd_where_the_hand_written_step_does_not_apply(case, monkeypatch):
    model = _model(arch="conv", hidden=(4,)) if case == "conv" else _model()
    x = torch.rand(4, *SHAPE, dtype=torch.float64).round()
    {"hook": _hooked, "frozen": _frozen, "activation": _other_activation}.get(case, lambda m: None)(model)
    if case == "disabled":
        monkeypatch.setattr(fused, "ENABLED", False)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else None
    with context or nullcontext():
        assert not fused.applies(model, x)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    loss = fused.loss_and_grads(model, x, 1.0, 0.0, forward_context=context)
    with context or nullcontext():
        torch.manual_seed(1)
        terms = reference.terms(x, extras=False)
    expected = objective(terms, 1.0, 0.0)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("lik,sigma", [("bernoulli", "0.1"), ("gaussian", "learned")])
def test_training_on_real_data_matches_the_autograd_trainer(lik, sigma, fashion, tmp_path, monkeypatch):
    """The trainer wired to the hand-written step reaches the autograd trainer's weights and test loss (20 Adam
    steps of ~1e-3 each: a missing or wrong gradient would move a weight far beyond these tolerances)."""
    from vaelab import train

    def run(name):
        cfg = TrainConfig(dataset="fashion-mnist", limit=1000, hidden=[48], latent_dim=4, epochs=1, batch_size=50,
                          likelihood=lik, sigma=sigma, binarize="dynamic" if lik == "bernoulli" else "none",
                          out=str(tmp_path / name))
        return train(cfg, progress=False, data=fashion)

    hand = run("hand")
    monkeypatch.setattr(fused, "ENABLED", False)
    auto = run("auto")
    for (name, p), q in zip(hand.model.state_dict().items(), auto.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    test_hand, test_auto = hand.last("test")["loss"], auto.last("test")["loss"]
    assert test_hand == pytest.approx(test_auto, rel=1e-5)



@pytest.mark.parametrize("lik,sigma", LIKELIHOODS)
@pytest.mark.parametrize("free_bits", [False, True])
def test_gradients_only_step_gives_the_same_gradients(lik, sigma, free_bits):
    """value=False (the trainer's steps between progress reports) skips the objective's value where a closed
    form allows it, and changes no gradient and no running buffer."""
    model = _model(lik, sigma, (12, 7))
    x = torch.rand(6, *SHAPE, dtype=torch.float64)
    if lik == "bernoulli":
        x = x.round()
    fb = _free_bits_between(model, x) if free_bits else 0.0
    other = copy.deepcopy(model)
    torch.manual_seed(3)
    loss = fused.loss_and_grads(model, x, 0.5, fb)
    torch.manual_seed(3)
    skipped = fused.loss_and_grads(other, x, 0.5, fb, value=False)
    assert loss is not None
    if (lik, sigma) in (("bernoulli", "0.1"), ("gaussian", "0.3"), ("gaussian", "learned")):
        assert skipped is None  # the closed forms skip it
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(model.buffers(), other.buffers(), strict=True):
        assert torch.equal(a, b)
