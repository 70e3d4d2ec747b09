"""The ELBO over a hierarchy's latent groups: free bits per group (--free-bits-per group) and NVAE's KL balancing
during warm-up (--kl-balance): values and gradients against hand computations, shares of a batch split over
processes, a learned top prior's estimate in the top group, the settings' checks, and a real model's terms."""

import pytest
import torch

from vaelab import TrainConfig
from vaelab.errors import ConfigError
from vaelab.models.hierarchical import HierarchicalVAE
from vaelab.models.objective import ELBO, Batch, ObjectiveSettings
from vaelab.models.vae import VAE, Terms

SIZES = (2, 3)  # a top group of 2 units, a lower group of 3
REC = torch.tensor([10.0, 20.0], dtype=torch.float64)
# per-example KL per unit; batch means per group: top (0.1 + 0.2 + 0.3 + 0.2) / 2 = 0.4, lower (6 + 6) / 2 = 6
KL = torch.tensor([[0.1, 0.2, 1.0, 2.0, 3.0], [0.3, 0.2, 3.0, 2.0, 1.0]], dtype=torch.float64)


def _terms(kl=KL, rec=REC, estimate=None) -> Terms:
    return Terms(rec, kl, None, None, kl_estimate=estimate, group_sizes=SIZES)


def _elbo(**kw) -> ELBO:
    return ELBO(ObjectiveSettings(**kw))


@pytest.mark.parametrize(("free_bits", "kl"), [(0.0, 6.4), (1.0, 1.0 + 6.0), (7.0, 7.0 + 7.0)])
def test_free_bits_bound_each_groups_batch_mean_kl(free_bits, kl):
    loss = _elbo(free_bits=free_bits, free_bits_per="group")(_terms(), Batch(2, 0.5))
    assert loss.parts["kl"].item() == pytest.approx(kl)
    assert loss.total.item() == pytest.approx(15 + 0.5 * kl)
    per_dim = _elbo(free_bits=free_bits)(_terms(), Batch(2, 0.5))  # per dimension: each unit is bounded instead
    assert per_dim.parts["kl"].item() == pytest.approx(sum(max(k, free_bits) for k in KL.mean(0).tolist()))


def test_a_clamped_group_gets_no_gradient_and_the_others_their_share():
    kl = KL.clone().requires_grad_()
    _elbo(free_bits=1.0, free_bits_per="group")(_terms(kl), Batch(2)).total.backward()
    assert kl.grad is not None
    torch.testing.assert_close(kl.grad[:, :2], torch.zeros(2, 2, dtype=torch.float64))  # top: 0.4 < 1
    torch.testing.assert_close(kl.grad[:, 2:], torch.full((2, 3), 0.5, dtype=torch.float64))


def test_balancing_weighs_each_group_by_its_kl_per_unit_during_warm_up():
    kl = KL.clone().requires_grad_()
    loss = _elbo(kl_warmup=1.0, kl_balance=True)(_terms(kl), Batch(2, 0.5))
    per_unit = torch.tensor([(0.4 + 0.01) / 2, (6.0 + 0.01) / 3], dtype=torch.float64)
    gamma = per_unit / per_unit.mean()  # (G,) mean 1: the top group, 0.4 nats over 2 units, weighs 0.1x as much
    assert loss.parts["kl"].item() == pytest.approx(6.4)  # reported: the KL itself
    assert loss.total.item() == pytest.approx(15 + 0.5 * (gamma[0] * 0.4 + gamma[1] * 6.0).item())
    loss.total.backward()
    assert kl.grad is not None
    torch.testing.assert_close(kl.grad[0], torch.cat([gamma[0].repeat(2), gamma[1].repeat(3)]) * 0.5 / 2)
    done = _elbo(kl_warmup=1.0, kl_balance=True)(_terms(), Batch(2, 1.0))  # warm-up over: the plain ELBO
    assert done.total.item() == pytest.approx(15 + 6.4)


@pytest.mark.parametrize("settings", [dict(free_bits=1.0, free_bits_per="group"),
                                      dict(free_bits=0.5, free_bits_per="group", kl_warmup=1.0, kl_balance=True)])
def test_shares_of_two_processes_add_up_to_the_whole_batch(settings):
    g = torch.Generator().manual_seed(0)
    rec = torch.rand(7, generator=g, dtype=torch.float64) * 100
    kl = torch.rand(7, 5, generator=g, dtype=torch.float64) * torch.tensor([0.1, 0.1, 1.0, 2.0, 3.0],
                                                                            dtype=torch.float64)
    objective = _elbo(**settings)
    whole_kl = kl.clone().requires_grad_()
    whole = objective(_terms(whole_kl, rec), Batch(7, 0.6)).total
    whole.backward()
    part_kl = kl.clone().requires_grad_()
    group_mean = torch.stack([kl[:, :2].sum(1), kl[:, 2:].sum(1)], 1).sum(0) / 7

    def all_sum(t):  # what the collective returns: the batch-mean KL per group over both processes
        return t.copy_(group_mean)

    total = 0.0
    for rows in (slice(0, 3), slice(3, 7)):
        share = objective(_terms(part_kl[rows], rec[rows]), Batch(7, 0.6, all_sum, 2)).total
        share.backward()
        total += share.item()
    assert total == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(part_kl.grad, whole_kl.grad)


def test_a_learned_top_priors_estimate_counts_in_the_top_group():
    top_zeroed = KL.clone()
    top_zeroed[:, :2] = 0
    estimate = torch.tensor([0.3, 0.5], dtype=torch.float64)  # batch mean 0.4, as the closed form's above
    terms = _terms(top_zeroed, estimate=estimate)
    groups = terms.kl_per_group()
    assert groups is not None
    torch.testing.assert_close(groups, torch.tensor([[0.3, 6.0], [0.5, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(groups.sum(1), terms.kl)
    bounded = _elbo(free_bits=1.0, free_bits_per="group")(terms, Batch(2))
    assert bounded.parts["kl"].item() == pytest.approx(1.0 + 6.0)


@pytest.mark.parametrize(("settings", "match"), [
    (dict(arch="conv", free_bits=1.0, free_bits_per="group"), "--free-bits-per group reads the KL of each latent "
                                                               "group, which --arch hierarchical has; got --arch conv"),
    (dict(arch="mlp", kl_warmup=2.0, kl_balance=True), "--kl-balance reads the KL of each latent group"),
    (dict(arch="hierarchical", kl_balance=True), "--kl-balance weighs the groups' KL during the KL warm-up"),
    (dict(arch="hierarchical", free_bits_per="group"), "give --free-bits too"),
    (dict(arch="hierarchical", kl_warmup=1.0, kl_balance=True, free_bits=1.0), "add --free-bits-per group"),
    (dict(arch="hierarchical", objective="iwae", kl_balance=True), "--kl-balance apply to --objective elbo only"),
    (dict(arch="hierarchical", objective="betatcvae", kl_warmup=1.0, kl_balance=True),
     "--kl-balance applies to --objective elbo only; got it with --objective betatcvae"),
    (dict(arch="hierarchical", objective="dipvae-ii", kl_warmup=1.0, kl_balance=True),
     "--kl-balance applies to --objective elbo only; got it with --objective dipvae-ii"),
    (dict(arch="hierarchical", free_bits_per="groups"), "--free-bits-per must be one of dim, group; got .groups."),
    (dict(arch="hierarchical", prior="mog", free_bits=1.0), "use --prior standard, --free-bits-per group"),
])
def test_bad_group_settings_are_one_line(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**settings)


def test_a_learned_top_prior_takes_free_bits_per_group():
    config = TrainConfig(arch="hierarchical", prior="vamp", free_bits=2.0, free_bits_per="group")
    assert config.optim.objective_settings().free_bits_per == "group"


def test_a_hierarchical_models_terms_carry_its_groups():
    torch.manual_seed(0)
    model = VAE.from_config(TrainConfig(arch="hierarchical", hidden=[16], latent_dim=3, groups=2), (1, 12, 12))
    assert isinstance(model, HierarchicalVAE)
    x = torch.rand(4, 1, 12, 12)
    for t in (model.terms(x), model(x, samples=3)):
        assert t.group_sizes == tuple(model.group_sizes)
        groups = t.kl_per_group()
        assert groups is not None
        assert groups.shape == (4, len(model.group_sizes))
        torch.testing.assert_close(groups.sum(1), t.kl)
        torch.testing.assert_close(groups, model.per_group(t.kl_per_dim))
    loss = ELBO(ObjectiveSettings(free_bits=5.0, free_bits_per="group"))(model.terms(x), Batch(4))
    assert loss.parts["kl"].item() >= 5.0 * len(model.group_sizes)
