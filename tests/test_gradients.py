"""Gradients of the training step: the closed-form likelihood gradients (autograd.Functions inside the
likelihoods) against autograd on torch.distributions, and the trainer's step on models autograd must handle as
they are (conv networks, hooks, frozen parameters, bf16 autocast)."""

import copy
import types

import pytest
import torch
import torch.distributions as D

from vaelab.config import TrainConfig
from vaelab.models.likelihoods import BernoulliLogProb, SharedSigmaGaussianLogProb, make_likelihood
from vaelab.models.objective import ELBO, Batch, ObjectiveSettings
from vaelab.models.vae import VAE
from vaelab.training.step import Step, local_inputs

SHAPE = (2, 3, 5)  # (C, H, W), odd sizes: nothing may assume square or 28x28 images
B, K = 4, 3


def _pixels(t):
    return t.sum(dim=(-3, -2, -1))


def _scale(lik, params):
    return torch.exp(lik.log_scale_for(params))


# likelihood spec -> its log-density written with torch.distributions (autograd differentiates it)
REFERENCE = {
    "bernoulli": lambda lik, p, x: _pixels(D.Bernoulli(logits=p[0], validate_args=False).log_prob(x)),
    "gaussian": lambda lik, p, x: _pixels(D.Normal(p[0], _scale(lik, p)).log_prob(x)),
    "laplace": lambda lik, p, x: _pixels(D.Laplace(p[0], _scale(lik, p)).log_prob(x)),
}
# (likelihood, --sigma, the closed-form Function its log_prob must use, or None for plain autograd)
SPECS = [
    ("bernoulli", "0.1", BernoulliLogProb),
    ("gaussian", "0.3", SharedSigmaGaussianLogProb),
    ("gaussian", "learned", SharedSigmaGaussianLogProb),
    ("gaussian", "learned-pixel", None),  # σ per pixel: no shared-σ closed form
    ("laplace", "0.2", None),
    ("laplace", "learned", None),
]
IDS = [f"{name}-{sigma}" for name, sigma, _ in SPECS]


def _likelihood(name, sigma):
    lik = make_likelihood(name, sigma).double()
    with torch.no_grad():  # learned scales away from their initial 1, so that their gradients are not special
        for p in lik.parameters():
            p.fill_(-0.7)
    return lik


def _inputs(lik, name, lead, seed=0):
    """Decoder outputs shaped (*lead, B, C, H, W) and data x (B, C, H, W), all float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*lead, B, *SHAPE, generator=g, dtype=torch.float64).requires_grad_()
              for _ in range(lik.n_params)]
    x = torch.rand(B, *SHAPE, generator=g, dtype=torch.float64)
    if name == "bernoulli":
        x = x.round()
    return params, x.requires_grad_()


def check_against_reference(lik, reference, params, x, rtol=1e-10):
    """Value and every gradient (decoder outputs, data, the likelihood's own σ) of lik.log_prob equal those
    autograd takes through `reference`, under a random upstream gradient."""
    own = list(lik.parameters())
    copies = [p.detach().clone().requires_grad_() for p in params]
    x_copy = x.detach().clone().requires_grad_()
    value = lik.log_prob(params, x)
    ref_lik = copy.deepcopy(lik)
    expected = reference(ref_lik, copies, x_copy)
    assert value.shape == expected.shape == params[0].shape[:-3]  # (..., B)
    torch.testing.assert_close(value, expected, rtol=rtol, atol=1e-9)
    upstream = torch.randn(value.shape, generator=torch.Generator().manual_seed(7), dtype=value.dtype).to(
        value.device)
    got = torch.autograd.grad((value * upstream).sum(), [*params, x, *own])
    want = torch.autograd.grad((expected * upstream).sum(), [*copies, x_copy, *ref_lik.parameters()])
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("lead", [(), (K,)], ids=["(B,C,H,W)", "(K,B,C,H,W)"])
@pytest.mark.parametrize(("name", "sigma", "function"), SPECS, ids=IDS)
def test_log_prob_value_and_gradients_equal_autograd_on_torch_distributions(name, sigma, function, lead):
    lik = _likelihood(name, sigma)
    params, x = _inputs(lik, name, lead)
    check_against_reference(lik, REFERENCE[name], params, x)


@pytest.mark.parametrize(("name", "sigma", "function"), SPECS, ids=IDS)
def test_log_prob_uses_its_closed_form_where_there_is_one(name, sigma, function):
    lik = _likelihood(name, sigma)
    params, x = _inputs(lik, name, ())
    node = type(lik.log_prob(params, x).grad_fn).__name__
    if function is None:
        assert "LogProb" not in node, node
    else:
        assert node == function.__name__ + "Backward", node


@pytest.mark.parametrize("lead", [(), (K,)], ids=["(B,C,H,W)", "(K,B,C,H,W)"])
def test_bernoulli_function_passes_gradcheck(lead):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*lead, 2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BernoulliLogProb.apply, (logits, x))


@pytest.mark.parametrize("lead", [(), (K,)], ids=["(B,C,H,W)", "(K,B,C,H,W)"])
@pytest.mark.parametrize("learned", [False, True])
def test_shared_sigma_gaussian_function_passes_gradcheck(lead, learned):
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(*lead, 2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(-0.4, dtype=torch.float64, requires_grad=learned)
    assert torch.autograd.gradcheck(SharedSigmaGaussianLogProb.apply, (mu, x, log_sigma))


class _WrongSign(BernoulliLogProb):
    @staticmethod
    def backward(ctx, grad):
        d_logits, d_x = BernoulliLogProb.backward(ctx, grad)
        return -d_logits, d_x


class _WrongScaleGrad(SharedSigmaGaussianLogProb):
    @staticmethod
    def backward(ctx, grad):
        d_mu, d_x, d_log_sigma = SharedSigmaGaussianLogProb.backward(ctx, grad)
        return d_mu, d_x, d_log_sigma + ctx.d  # forgets the −D


@pytest.mark.parametrize(("name", "sigma", "broken"), [("bernoulli", "0.1", _WrongSign),
                                                       ("gaussian", "learned", _WrongScaleGrad)])
def test_the_checks_catch_a_wrong_closed_form(name, sigma, broken):
    lik = _likelihood(name, sigma)
    params, x = _inputs(lik, name, ())
    scale = [lik.log_scale] if name == "gaussian" else []
    lik.log_prob = types.MethodType(lambda self, p, x: broken.apply(p[0], x, *scale), lik)
    with pytest.raises(AssertionError):
        check_against_reference(lik, REFERENCE[name], params, x)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(broken.apply, (params[0], x, *scale))


# ------------------------------------------------------------------------------- the trainer's step on models
def _model(name="bernoulli", sigma="0.1", arch="mlp", hidden=(16,), dtype=torch.float64) -> VAE:
    torch.manual_seed(0)
    cfg = TrainConfig(likelihood=name, sigma=sigma, hidden=list(hidden), latent_dim=3, arch=arch)
    model = VAE.from_config(cfg, (1, 8, 6)).to(dtype).train()
    with torch.no_grad():
        for p in model.likelihood.parameters():
            p.fill_(-0.7)
    return model


def _plain(model: VAE, name: str) -> VAE:
    """A copy of `model` whose likelihood computes the torch.distributions expression, differentiated by autograd."""
    ref = copy.deepcopy(model)
    ref.likelihood.log_prob = types.MethodType(REFERENCE[name], ref.likelihood)
    return ref


def _hook(model, seen):
    model.decoder.body[0].register_forward_hook(lambda *a: seen.append(1))


def _freeze(model, seen):
    model.encoder.head.bias.requires_grad_(False)


CASES = {  # name -> (model kwargs, change made to the model, autocast)
    "mlp-bernoulli": (dict(), None, False),
    "mlp-gaussian-learned": (dict(name="gaussian", sigma="learned", hidden=(12, 7)), None, False),
    "conv-bernoulli": (dict(arch="conv", hidden=(4, 6)), None, False),
    "conv-gaussian": (dict(name="gaussian", sigma="0.3", arch="conv", hidden=(4,)), None, False),
    "hooked": (dict(), _hook, False),
    "frozen": (dict(name="gaussian", sigma="learned"), _freeze, False),
    "bf16": (dict(dtype=torch.float32, hidden=(32,)), None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_equals_autograd_on_the_plain_likelihood(case):
    """Two Steps (objective, backward, Adam) reach the parameters of the same steps with the likelihood's
    plain expression: the closed forms need no special case for networks, hooks, frozen weights or autocast."""
    kwargs, change, bf16 = CASES[case]
    name = kwargs.get("name", "bernoulli")
    model = _model(**kwargs)
    seen: list[int] = []
    if change:
        change(model, seen)
    ref = _plain(model, name)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(3)
    data = torch.rand(8, 1, 8, 6, generator=g, dtype=next(model.parameters()).dtype)
    if name == "bernoulli":
        data = data.round()
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
    losses = []
    for m in (model, ref):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        inputs = local_inputs(lambda idx: data.index_select(0, idx))
        step = Step(m, opt, ELBO(ObjectiveSettings(free_bits=0.05)), inputs,
                    **({"autocast": context} if context else {}))
        torch.manual_seed(5)
        losses.append([step(torch.arange(i, i + 4), 0.5) for i in (0, 4)])
    rtol, atol = (1e-3, 1e-5) if bf16 else (1e-9, 1e-11)
    torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=atol)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=n)
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), n
    if change is _hook:
        assert len(seen) == 2 * 2  # both models, two steps each: the hook ran on every forward


def test_train_step_replaces_old_gradients():
    model = _model(name="gaussian", sigma="learned")
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e6)
    ref = _model(name="gaussian", sigma="learned")
    x = torch.rand(4, 1, 8, 6, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(1)
    Step(model, opt, ELBO(), local_inputs(lambda idx: x))(torch.arange(4), 1.0)
    torch.manual_seed(1)
    ELBO()(ref(x), Batch(4)).total.backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
