"""The hand-written MLP step (vaelab.training.fused.MLPStep) against the autograd step: same loss, same gradients, same
update, and chosen only where it computes exactly what autograd would."""

import copy

import pytest
import torch
from torch import nn

from vaelab.config import TrainConfig
from vaelab.models.vae import VAE, objective
from vaelab.training.fused import MLPStep
from vaelab.training.trainer import TrainStep, make_step

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
    loss = objective(model(x), beta, free_bits)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _hand(model, x, beta, free_bits, seed=1):
    step = MLPStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda idx: x, free_bits)
    torch.manual_seed(seed)
    loss = step.loss_and_grads(x, beta)
    return loss, [p.grad for p in model.parameters()]


def _free_bits_between(model, x) -> float:
    """A free-bits level with some latent dimensions below it and some above, so both branches are tested."""
    with torch.no_grad():
        torch.manual_seed(1)
        kl_d, _ = copy.deepcopy(model)(x).kl_per_dim.mean(0).sort()  # (L,)
    return float(kl_d[0] + kl_d[1]) / 2


@pytest.mark.parametrize(("lik", "sigma"), LIKELIHOODS)
@pytest.mark.parametrize("hidden", [(16,), (12, 7)])
@pytest.mark.parametrize(("beta", "with_free_bits"), [(1.0, False), (0.3, True)])
def test_loss_and_gradients_equal_autograd_in_float64(lik, sigma, hidden, beta, with_free_bits):
    model = _model(lik, sigma, hidden)
    x = torch.rand(6, *SHAPE, dtype=torch.float64)
    if lik == "bernoulli":
        x = x.round()
    free_bits = _free_bits_between(model, x) if with_free_bits else 0.0
    reference = copy.deepcopy(model)
    loss_a, grads_a = _autograd(reference, x, beta, free_bits)
    loss_h, grads_h = _hand(model, x, beta, free_bits)
    torch.testing.assert_close(loss_h, loss_a, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    assert len(grads_h) == len(grads_a) == len(names)
    for name, g_h, g_a in zip(names, grads_h, grads_a, strict=True):
        assert g_h is not None, name
        assert g_h.shape == g_a.shape, name
        assert g_h.dtype == g_a.dtype, name
        torch.testing.assert_close(g_h, g_a, rtol=1e-10, atol=1e-12, msg=name)
        assert g_h.stride() == g_a.stride(), name  # the layout the optimizer and AccumulateGrad expect
    for buf_h, buf_a in zip(model.buffers(), reference.buffers(), strict=True):  # the optimal-σ running value
        torch.testing.assert_close(buf_h, buf_a)


def test_float32_gradients_are_autograds_to_rounding():
    model = _model(dtype=torch.float32, hidden=(64,))
    x = torch.rand(32, *SHAPE).round()
    reference = copy.deepcopy(model)
    loss_a, grads_a = _autograd(reference, x, 1.0, 0.0)
    loss_h, grads_h = _hand(model, x, 1.0, 0.0)
    torch.testing.assert_close(loss_h, loss_a)
    for g_h, g_a in zip(grads_h, grads_a, strict=True):
        torch.testing.assert_close(g_h, g_a, rtol=1e-4, atol=1e-6)


def test_gradients_replace_old_ones_instead_of_accumulating():
    model = _model("gaussian", "learned")
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e6)
    _, grads_h = _hand(model, x, 1.0, 0.0)
    _, grads_a = _autograd(_model("gaussian", "learned"), x, 1.0, 0.0)
    for g_h, g_a in zip(grads_h, grads_a, strict=True):
        torch.testing.assert_close(g_h, g_a)


def test_a_step_with_adam_equals_the_autograd_step():
    """Three MLPStep calls (gather, loss and gradients, Adam) reach TrainStep's parameters."""
    data = torch.rand(12, *SHAPE, dtype=torch.float64)
    models = [_model("gaussian", "learned", (12, 7)) for _ in range(2)]
    steps = []
    for cls, m in zip((MLPStep, TrainStep), models, strict=True):
        steps.append(cls(m, torch.optim.Adam(m.parameters(), lr=1e-2), lambda idx: data.index_select(0, idx), 0.05))
    for step in steps:
        torch.manual_seed(4)
        losses = [step(torch.arange(i, i + 4), 0.7) for i in (0, 4, 8)]
        step.losses = torch.stack(losses)
    torch.testing.assert_close(steps[0].losses, steps[1].losses, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def _hooked(model):
    model.decoder.body[0].register_forward_hook(lambda *a: None)


def _frozen(model):
    model.encoder.head.bias.requires_grad_(False)


def _other_activation(model):
    model.decoder.body[1] = nn.Tanh()  # a user's change: the hand-written step only knows ReLU


@pytest.mark.parametrize("case", ["mlp", "conv", "hook", "frozen", "activation", "bf16", "cuda", "disabled"])
def test_the_trainer_chooses_the_hand_written_step_only_where_it_is_exact(case):
    from vaelab.data import BatchSource, Prepared

    cfg = TrainConfig(likelihood="bernoulli", hidden=[4, 6] if case == "conv" else [16], latent_dim=3,
                      arch="conv" if case == "conv" else "mlp", precision="bf16" if case == "bf16" else "fp32",
                      handwritten_grads=case != "disabled")
    model = VAE.from_config(cfg, SHAPE)
    {"hook": _hooked, "frozen": _frozen, "activation": _other_activation}.get(case, lambda m: None)(model)
    device = torch.device("cuda" if case == "cuda" else "cpu")
    assert MLPStep.applies(model, device, autocast=case == "bf16") == (case in ("mlp", "disabled"))
    if case == "cuda":
        return  # make_step would also look for a CUDA graph, which needs the device
    train = torch.zeros(8, *SHAPE)
    prep = Prepared(None, train, train, train, lambda x: x, lambda x: x, True, BatchSource(train, 8))
    step = make_step(cfg, model, torch.optim.Adam(model.parameters()), prep, device)
    assert type(step) is (MLPStep if case == "mlp" else TrainStep)


@pytest.mark.parametrize(("lik", "sigma"), [("bernoulli", "0.1"), ("gaussian", "learned")])
def test_training_on_real_data_matches_the_autograd_trainer(lik, sigma, fashion, tmp_path):
    """The trainer with the hand-written step reaches the autograd trainer's weights and test loss (20 Adam
    steps of ~1e-3 each: a missing or wrong gradient would move a weight far beyond these tolerances)."""
    from vaelab import train

    def run(name, handwritten):
        cfg = TrainConfig(dataset="fashion-mnist", limit=1000, hidden=[48], latent_dim=4, epochs=1, batch_size=50,
                          likelihood=lik, sigma=sigma, binarize="dynamic" if lik == "bernoulli" else "none",
                          handwritten_grads=handwritten, out=str(tmp_path / name))
        return train(cfg, progress=False, data=fashion)

    hand, auto = run("hand", True), run("auto", False)
    for (name, p), q in zip(hand.model.state_dict().items(), auto.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert hand.last("test")["loss"] == pytest.approx(auto.last("test")["loss"], rel=1e-5)
