"""Golden tests for rlt_pl.grpo: hand-computed advantages and losses, PPO clipping, aggregations, gradients."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlt_pl.grpo import PolicyLossConfig, group_advantages, kl_k1, kl_k3, policy_loss

# ----------------------------------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_hand_computed() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 0: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4); group 1 has zero variance -> exact zeros
    want = torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, group_size=3), want)
    torch.testing.assert_close(group_advantages(rewards, 3, scale="none"), torch.tensor([-1.0, 0, 1, 0, 0, 0]))


def test_group_advantages_zero_variance_and_singletons_are_exact_zeros() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, -7.3, -7.3, -7.3])  # 0.1 * 3 / 3 != 0.1 in floating point
    for scale in ("std", "none"):
        out = group_advantages(rewards, 3, scale=scale)
        assert torch.equal(out, torch.zeros(6)) and not torch.isnan(out).any()
    assert torch.equal(group_advantages(torch.tensor([1.0, -2.0, 3.0]), 1), torch.zeros(3))


def test_group_advantages_match_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(64, generator=g) * 3
    out = group_advantages(rewards, 16)
    for k in range(4):
        grp = rewards[16 * k : 16 * (k + 1)].double().tolist()
        mean, std = statistics.fmean(grp), statistics.stdev(grp)
        for i, r in enumerate(grp):
            assert float(out[16 * k + i]) == pytest.approx((r - mean) / (std + 1e-4), abs=1e-5)


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"indices \[1, 3\]"):
        group_advantages(torch.tensor([0.0, float("nan"), 1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_kl_estimators() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.1])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, 0.0, -0.4]))
    want = torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.4) - 0.4 - 1])
    torch.testing.assert_close(kl_k3(logp, ref), want)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# Policy loss

# Tiny case: B = 2, T = 2, the second row has one token. Ratio = 1 (old_logp = None).
LOGP = [[-1.0, -2.0], [-0.5, float("-inf")]]  # off-mask -inf must not leak
REF = [[-1.5, -2.0], [-0.5, 0.0]]
MASK = [[1, 1], [1, 0]]
ADV = [1.0, -2.0]
K3_00 = math.exp(-0.5) + 0.5 - 1  # k3 of the only token whose policy and reference differ
BETA = 0.04


def tiny_loss(**cfg) -> tuple[torch.Tensor, dict]:
    logp = torch.tensor(LOGP, requires_grad=True)
    out = policy_loss(logp, None, torch.tensor(REF), torch.tensor(ADV), torch.tensor(MASK), PolicyLossConfig(**cfg))
    out.loss.backward()
    return out.loss.detach(), {**out.metrics, "grad": logp.grad}


def test_policy_loss_hand_computed_sequence_mean_with_kl() -> None:
    loss, m = tiny_loss(beta=BETA)
    # row 0: (-1 - 1 + 0.04 * K3_00) / 2; row 1: (+2) / 1; mean over the two rows
    want = ((-2 + BETA * K3_00) / 2 + 2.0) / 2
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert float(m["kl"]) == pytest.approx((K3_00 / 2 + 0.0) / 2, abs=1e-6)
    assert float(m["policy_loss"]) == pytest.approx(0.5, abs=1e-6)
    assert float(m["kl_loss"]) == pytest.approx(BETA * K3_00 / 4, abs=1e-6)
    assert float(m["ratio_mean"]) == 1.0 and float(m["clip_fraction"]) == 0.0
    assert torch.isfinite(m["grad"]).all() and float(m["grad"][1, 1]) == 0.0


def test_policy_loss_token_mean_constant_and_k1() -> None:
    loss, _ = tiny_loss(beta=BETA, aggregation="token_mean")
    assert float(loss) == pytest.approx((-2 + 2 + BETA * K3_00) / 3, abs=1e-7)
    loss, _ = tiny_loss(beta=BETA, aggregation="constant", constant_normalizer=4)
    assert float(loss) == pytest.approx((-2 + 2 + BETA * K3_00) / (2 * 4), abs=1e-7)
    loss, m = tiny_loss(beta=BETA, kl_estimator="k1")  # k1 of token (0, 0) = -1 - (-1.5) = 0.5
    assert float(loss) == pytest.approx(((-2 + BETA * 0.5) / 2 + 2.0) / 2, abs=1e-6)
    assert float(m["kl"]) == pytest.approx(0.5 / 2 / 2, abs=1e-6)


def test_policy_loss_ppo_clipping() -> None:
    ratios = torch.tensor([[1.5, 0.5], [1.5, 0.5]])
    old = torch.zeros(2, 2)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = policy_loss(logp, old, None, adv, mask, PolicyLossConfig(beta=0.0, clip_eps_low=0.2))
    out.loss.backward()
    # A > 0: ratio 1.5 -> clipped to 1.2 (active); ratio 0.5 -> min(0.5, 0.8) = 0.5 (not active)
    # A < 0: ratio 1.5 -> min(-1.5, -1.2) = -1.5 (not active); ratio 0.5 -> min(-0.5, -0.8) = -0.8 (active)
    pg = [[-1.2, -0.5], [1.5, 0.8]]
    assert float(out.loss.detach()) == pytest.approx((sum(pg[0]) / 2 + sum(pg[1]) / 2) / 2, abs=1e-6)
    assert float(out.metrics["clip_fraction"]) == 0.5
    assert float(out.metrics["ratio_mean"]) == pytest.approx(1.0)
    # clipped tokens get no gradient; others d/dlogp (-ratio * A / |o| / B) = -ratio * A / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]]))
    # clip-higher: eps_high = 0.6 releases the 1.5 ratio with A > 0
    out = policy_loss(logp, old, None, adv, mask, PolicyLossConfig(beta=0.0, clip_eps_low=0.2, clip_eps_high=0.6))
    assert float(out.metrics["clip_fraction"]) == 0.25
    assert float(out.loss.detach()) == pytest.approx(((-1.5 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2, abs=1e-6)


def test_gradient_is_minus_advantage_over_length() -> None:
    g = torch.Generator().manual_seed(0)
    bsz, t = 5, 9
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = torch.arange(t)[None] < lengths[:, None]
    logp = (-3 * torch.rand(bsz, t, generator=g)).requires_grad_(True)
    adv = torch.randn(bsz, generator=g)
    out = policy_loss(logp, None, None, adv, mask, PolicyLossConfig(beta=0.0))
    out.loss.backward()
    want = -adv[:, None] / lengths[:, None] / bsz * mask  # sequence mean: d L / d logp_it = -A_i / (B |o_i|)
    torch.testing.assert_close(logp.grad, want)
    assert float(out.loss.detach()) == pytest.approx(-float(adv.mean()), abs=1e-6)  # value: mean of -A (ratio == 1)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_empty_rows_give_no_nan(aggregation: str) -> None:
    cfg = PolicyLossConfig(aggregation=aggregation, constant_normalizer=3 if aggregation == "constant" else None)
    logp = torch.full((2, 3), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 3)
    out = policy_loss(logp, None, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, cfg)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.equal(logp.grad, torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(beta=-0.1), "beta"),
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(clip_eps_high=0.2), "clip_eps_high"),
        (dict(clip_eps_low=1.5), "clip_eps_low"),
        (dict(aggregation="constant"), "constant_normalizer"),
        (dict(constant_normalizer=8), "constant_normalizer"),
        (dict(aggregation="mean"), "aggregation"),
    ],
)
def test_policy_loss_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kwargs)


def test_policy_loss_input_validation() -> None:
    logp, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="ref_logp is required"):
        policy_loss(logp, None, None, adv, mask, PolicyLossConfig())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, None, None, torch.zeros(3), mask, PolicyLossConfig(beta=0.0))
    with pytest.raises(ValueError, match="0/1"):
        policy_loss(logp, None, None, adv, mask * 0.5, PolicyLossConfig(beta=0.0))
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, torch.zeros(2, 2), None, adv, mask, PolicyLossConfig(beta=0.0))
    assert PolicyLossConfig(clip_eps_low=0.2).clip_eps_high == 0.2


@pytest.mark.parametrize("eps", [0.0, -1e-4])
def test_group_advantages_refuses_a_non_positive_eps(eps: float) -> None:
    # eps 0 divides a zero-variance group by 0 (NaN advantages); eps < 0 can flip signs
    with pytest.raises(ValueError, match="eps must be > 0"):
        group_advantages(torch.zeros(4), group_size=2, eps=eps)
