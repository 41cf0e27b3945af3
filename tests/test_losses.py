"""Identities of the loss functions and the flow head (float64, single process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regtok.config import ModelConfig
from regtok.flow import VelocityNet, euler_sample, logit_normal, timestep_features
from regtok.losses import (
    flow_matching_loss,
    info_nce,
    mrl_info_nce,
    preservation_loss,
    total_loss,
    uniformity,
    variance_covariance,
)


def unit(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)


def test_info_nce_is_log_batch_for_random_embeddings_at_scale_zero_and_close_for_random():
    a, b = unit(128, 32, 0), unit(128, 32, 1)
    assert info_nce(a, b, torch.tensor(0.0, dtype=torch.float64))["contrastive"].item() == pytest.approx(
        math.log(128), abs=1e-9
    )
    # random high-dimensional unit vectors at a moderate scale: within a few percent of log B
    a, b = unit(256, 512, 2), unit(256, 512, 3)
    value = info_nce(a, b, torch.tensor(1 / 0.07, dtype=torch.float64))["contrastive"].item()
    assert abs(value - math.log(256)) < 0.15 * math.log(256)


def test_info_nce_is_near_zero_for_identical_separated_pairs():
    e = torch.eye(16, dtype=torch.float64)  # orthogonal: cosine 1 with the partner, 0 with the rest
    terms = info_nce(e, e.clone(), torch.tensor(100.0, dtype=torch.float64))
    assert terms["contrastive"].item() < 1e-10
    assert info_nce(e, e.flip(0), torch.tensor(100.0, dtype=torch.float64))["contrastive"].item() > 50


def test_info_nce_is_symmetric_in_a_and_b_and_invariant_to_batch_permutation():
    a, b = unit(32, 16, 4), unit(32, 16, 5)
    scale = torch.tensor(7.0, dtype=torch.float64)
    ab, ba = info_nce(a, b, scale), info_nce(b, a, scale)
    torch.testing.assert_close(ab["contrastive"], ba["contrastive"], rtol=0, atol=1e-12)
    torch.testing.assert_close(ab["contrastive/a_to_b"], ba["contrastive/b_to_a"], rtol=0, atol=1e-12)
    assert not torch.isclose(ab["contrastive/a_to_b"], ab["contrastive/b_to_a"])
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(info_nce(a[perm], b[perm], scale)["contrastive"], ab["contrastive"],
                               rtol=0, atol=1e-12)


def test_mrl_averages_over_prefixes():
    pairs = {1: (unit(8, 4, 0), unit(8, 4, 1)), 2: (unit(8, 4, 2), unit(8, 4, 3))}
    scale = torch.tensor(3.0, dtype=torch.float64)
    terms = mrl_info_nce(pairs, scale)
    parts = [info_nce(a, b, scale)["contrastive"] for a, b in pairs.values()]
    torch.testing.assert_close(terms["contrastive/k1"], parts[0])
    torch.testing.assert_close(terms["contrastive"], (parts[0] + parts[1]) / 2)


def test_preservation_is_one_minus_cosine():
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    orth = torch.zeros(4, 3, 8, dtype=torch.float64)
    x[..., 0], orth[..., 0], orth[..., 1] = 0.0, 0.0, 1.0
    x[..., 1] = 0.0
    assert preservation_loss(x, 2.5 * x).item() == pytest.approx(0.0, abs=1e-12)
    assert preservation_loss(x, -x).item() == pytest.approx(2.0, abs=1e-12)
    assert preservation_loss(orth, x).item() == pytest.approx(1.0, abs=1e-12)
    assert preservation_loss(x, x.to(torch.float16)).dtype == torch.float64


def test_variance_covariance_flags_collapse_not_spread():
    spread = variance_covariance(unit(4096, 8, 0))
    assert spread["variance"].item() < 0.05 and spread["covariance"].item() < 0.05
    point = variance_covariance(F.normalize(torch.ones(64, 8, dtype=torch.float64) + 1e-3 * unit(64, 8, 1), dim=-1))
    assert point["variance"].item() > 0.9
    line = torch.zeros(512, 8, dtype=torch.float64)
    line[:, 0] = torch.sign(torch.randn(512, generator=torch.Generator().manual_seed(0)))
    assert variance_covariance(line)["variance"].item() > 0.8  # one direction used: 7 of 8 dims dead


def test_oracle_velocity_lands_on_target_in_one_euler_step():
    x_a, x_b = unit(10, 6, 0), unit(10, 6, 1)
    target = {0: x_b, 1: x_a}

    def oracle(x, t, d):  # constant straight-line velocity of the pair each row belongs to
        return torch.where((d == 0)[:, None], x_b - x_a, x_a - x_b)

    for direction, x0 in ((0, x_a), (1, x_b)):
        torch.testing.assert_close(euler_sample(oracle, x0, direction, 1), target[direction], rtol=0, atol=1e-12)
        torch.testing.assert_close(euler_sample(oracle, x0, direction, 7), target[direction], rtol=0, atol=1e-12)
    def oracle_both(x, t, d):  # the loss stacks direction 0 (A→B) over direction 1 (B→A)
        assert torch.equal(d, torch.arange(20) // 10)
        return torch.cat([x_b - x_a, x_a - x_b])

    terms = flow_matching_loss(oracle_both, x_a, x_b, torch.Generator().manual_seed(0))
    assert terms["flow"].item() == pytest.approx(0.0, abs=1e-12)
    zero = flow_matching_loss(lambda x, t, d: torch.zeros_like(x), x_a, x_b, torch.Generator().manual_seed(0))
    assert zero["flow"].item() == pytest.approx((x_b - x_a).pow(2).sum(-1).mean().item(), rel=1e-12)


def test_flow_stop_gradient_reaches_only_the_source():
    x_a = unit(6, 4, 0).requires_grad_()
    x_b = unit(6, 4, 1).requires_grad_()
    net = VelocityNet(4, 16, 1).double()
    terms = flow_matching_loss(net, x_a, x_b, torch.Generator().manual_seed(0), stop_grad_target=True)
    (ga,) = torch.autograd.grad(terms["flow/a_to_b"], x_a, retain_graph=True)
    (gb,) = torch.autograd.grad(terms["flow/a_to_b"], x_b, allow_unused=True, materialize_grads=True)
    assert ga.abs().sum() > 0 and gb.abs().sum() == 0
    terms = flow_matching_loss(net, x_a, x_b, torch.Generator().manual_seed(0), stop_grad_target=False)
    (gb,) = torch.autograd.grad(terms["flow/a_to_b"], x_b)
    assert gb.abs().sum() > 0


def test_logit_normal_times_are_seeded_and_inside_the_unit_interval():
    t = logit_normal(20000, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(t, logit_normal(20000, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64))
    assert timestep_features(t[:3], 8).shape == (3, 8)


def test_velocity_net_uses_time_and_direction():
    torch.manual_seed(0)
    net = VelocityNet(4, 16, 2).double()
    x = unit(3, 4, 0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    d0, d1 = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    assert not torch.allclose(net(x, t, d0), net(x, t, d1))
    assert not torch.allclose(net(x, t, d0), net(x, t.flip(0), d0))


@pytest.mark.parametrize("loss_type", ["contrastive", "flow_matching", "combined"])
def test_total_loss_combines_terms_per_loss_type(loss_type):
    cfg = ModelConfig(loss_type=loss_type, preservation_weight=0.5, flow_weight=0.25,
                      flow_var_weight=2.0, flow_cov_weight=0.1, flow_uniformity_weight=0.3)
    t = {k: torch.tensor(v) for k, v in {"preservation": 1.0, "contrastive": 3.0, "flow": 5.0, "variance": 0.5,
                                         "covariance": 10.0, "uniformity": -2.0}.items()}
    flow = 5.0 + 2.0 * 0.5 + 0.1 * 10.0 + 0.3 * -2.0
    expected = {"contrastive": 0.5 + 3.0, "flow_matching": 0.5 + flow, "combined": 0.5 + 3.0 + 0.25 * flow}
    assert total_loss(t, cfg).item() == pytest.approx(expected[loss_type])


def test_uniformity_is_zero_when_collapsed_and_lower_when_spread():
    g = torch.Generator().manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
    point = torch.nn.functional.normalize(torch.ones(64, 16), dim=-1)
    assert uniformity(point).item() == pytest.approx(0.0, abs=1e-6)
    assert uniformity(spread).item() < -2.0
    perm = torch.randperm(64, generator=g)
    torch.testing.assert_close(uniformity(spread[perm]), uniformity(spread))
