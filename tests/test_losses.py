"""Losses against direct float64 computations."""

import numpy as np
import pytest
import torch

from impala import losses
from impala.vtrace import VTraceReturns


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    T, B, A = 5, 3, 4
    return dict(
        logits=rng.normal(size=(T, B, A)), values=rng.normal(size=(T, B)),
        actions=rng.integers(0, A, size=(T, B)), vs=rng.normal(size=(T, B)),
        adv=rng.normal(size=(T, B)),
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_actor_critic_loss_matches_formula(batch, reduction):
    lp = _np_log_softmax(batch["logits"])
    chosen = np.take_along_axis(lp, batch["actions"][..., None], -1)[..., 0]
    policy = -(chosen * batch["adv"]).sum()
    baseline = 0.5 * ((batch["vs"] - batch["values"]) ** 2).sum()
    entropy = (np.exp(lp) * lp).sum()  # negative entropy
    scale = 1.0 if reduction == "sum" else 1.0 / batch["actions"].size
    logits = torch.from_numpy(batch["logits"]).requires_grad_()
    values = torch.from_numpy(batch["values"]).requires_grad_()
    got = losses.actor_critic_loss(
        logits, values, torch.from_numpy(batch["actions"]),
        VTraceReturns(torch.from_numpy(batch["vs"]), torch.from_numpy(batch["adv"])),
        baseline_cost=0.25, entropy_cost=0.03, reduction=reduction,
    )
    assert got.policy.item() == pytest.approx(policy * scale, rel=1e-12)
    assert got.baseline.item() == pytest.approx(baseline * scale, rel=1e-12)
    assert got.entropy.item() == pytest.approx(entropy * scale, rel=1e-12)
    assert got.total.item() == pytest.approx((policy + 0.25 * baseline + 0.03 * entropy) * scale, rel=1e-12)


def test_gradients_flow_where_they_should(batch):
    logits = torch.from_numpy(batch["logits"]).requires_grad_()
    values = torch.from_numpy(batch["values"]).requires_grad_()
    actions = torch.from_numpy(batch["actions"])
    adv = torch.from_numpy(batch["adv"]).requires_grad_()
    vs = torch.from_numpy(batch["vs"]).requires_grad_()
    losses.policy_gradient_loss(logits, actions, adv).backward()
    assert values.grad is None and adv.grad is None and logits.grad is not None
    losses.baseline_loss(vs, values).backward()
    assert vs.grad is None and values.grad is not None


def test_entropy_loss_is_lower_for_more_uniform_policies():
    uniform = torch.zeros(1, 1, 3)
    peaked = torch.tensor([[[5.0, 0.0, 0.0]]])
    assert losses.entropy_loss(uniform) < losses.entropy_loss(peaked)
    assert losses.entropy_loss(uniform).item() == pytest.approx(-np.log(3))


def test_reinforce_loss_is_the_seed_formula():
    rng = np.random.default_rng(1)
    N, A = 32, 2
    logits, values = rng.normal(size=(N, A)), rng.normal(size=N)
    actions, returns = rng.integers(0, A, size=N), rng.normal(size=N) * 5
    chosen = np.take_along_axis(_np_log_softmax(logits), actions[:, None], -1)[:, 0]
    expected = 0.5 * -(chosen * (returns - values)).mean() + 0.4 * (0.5 * (returns - values) ** 2).mean()
    v = torch.from_numpy(values).requires_grad_()
    got = losses.reinforce_loss(torch.from_numpy(logits).requires_grad_(), v, torch.from_numpy(actions), torch.from_numpy(returns))
    assert got.total.item() == pytest.approx(expected, rel=1e-12)
    # the advantage is detached in the policy term: the baseline learns from its own term only
    got.policy.backward()
    assert v.grad is None


def test_discounted_returns_matches_loop_with_episode_ends():
    rng = np.random.default_rng(2)
    T, B = 7, 3
    rewards = rng.normal(size=(T, B))
    discounts = np.where(rng.random((T, B)) < 0.3, 0.0, 0.9)
    bootstrap = rng.normal(size=B)
    expected = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            g, weight = 0.0, 1.0
            for k in range(t, T):
                g += weight * rewards[k, b]
                weight *= discounts[k, b]
            expected[t, b] = g + weight * bootstrap[b]
    got = losses.discounted_returns(*[torch.from_numpy(x) for x in (rewards, discounts, bootstrap)])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_bad_reduction_raises(batch):
    with pytest.raises(ValueError, match="reduction"):
        losses.actor_critic_loss(
            torch.zeros(2, 1, 2), torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long),
            VTraceReturns(torch.zeros(2, 1), torch.zeros(2, 1)), reduction="max",
        )
