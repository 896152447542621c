"""Losses against direct float64 computations (numpy and explicit loops), and where their
gradients go."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impala import losses, vtrace
from impala.vtrace import VTraceReturns

T, B, A = 5, 3, 4


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def chosen_log_probs(logits, actions):
    """log pi(a|x) by explicit loops over every leading index."""
    lp = np_log_softmax(logits)
    out = np.zeros(actions.shape)
    for index in np.ndindex(*actions.shape):
        out[index] = lp[index][actions[index]]
    return out


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return {
        "logits": rng.normal(size=(T, B, A)) * 2,
        "values": rng.normal(size=(T, B)),
        "actions": rng.integers(0, A, size=(T, B)),
        "vs": rng.normal(size=(T, B)),
        "adv": rng.normal(size=(T, B)),
    }


def tensors(batch, grad=("logits", "values")):
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    for k in grad:
        out[k].requires_grad_()
    return out


# ---------------------------------------------------------------------------------------------
# The three terms


def test_policy_gradient_loss_matches_numpy(batch):
    expected = -(chosen_log_probs(batch["logits"], batch["actions"]) * batch["adv"]).sum()
    t = tensors(batch)
    got = losses.policy_gradient_loss(t["logits"], t["actions"], t["adv"])
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_policy_gradient_loss_gradient(batch):
    """d/dz [-A log softmax(z)_a] = -A (onehot(a) - softmax(z)); nothing reaches the advantages."""
    t = tensors(batch, grad=("logits", "adv"))
    losses.policy_gradient_loss(t["logits"], t["actions"], t["adv"]).backward()
    probs = np.exp(np_log_softmax(batch["logits"]))
    onehot = np.eye(A)[batch["actions"]]
    expected = -batch["adv"][..., None] * (onehot - probs)
    np.testing.assert_allclose(t["logits"].grad.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert t["adv"].grad is None


def test_baseline_loss_matches_numpy_and_gradient(batch):
    expected = 0.5 * sum(
        (batch["vs"][i, j] - batch["values"][i, j]) ** 2 for i in range(T) for j in range(B)
    )
    t = tensors(batch, grad=("values", "vs"))
    got = losses.baseline_loss(t["vs"], t["values"])
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    np.testing.assert_allclose(
        t["values"].grad.numpy(), batch["values"] - batch["vs"], rtol=1e-12, atol=1e-12
    )
    assert t["vs"].grad is None  # the target is a constant


def test_entropy_loss_matches_numpy(batch):
    lp = np_log_softmax(batch["logits"])
    entropy = -(np.exp(lp) * lp).sum(-1)  # H per step, [T, B]
    got = losses.entropy_loss(torch.from_numpy(batch["logits"]))
    assert got.item() == pytest.approx(-entropy.sum(), rel=1e-12)


def test_entropy_loss_sign_rewards_entropy():
    uniform = torch.zeros(2, 3, A)
    peaked = torch.tensor([8.0, 0.0, 0.0, 0.0]).expand(2, 3, A)
    mild = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(2, 3, A)
    values = [losses.entropy_loss(x).item() for x in (uniform, mild, peaked)]
    assert values[0] < values[1] < values[2] <= 0.0  # higher entropy -> lower loss
    assert values[0] == pytest.approx(-2 * 3 * np.log(A), rel=1e-6)
    # one gradient step on the loss raises the entropy
    logits = mild.clone().requires_grad_()
    losses.entropy_loss(logits).backward()
    with torch.no_grad():
        assert losses.entropy_loss(logits - 0.1 * logits.grad) < losses.entropy_loss(logits)


# ---------------------------------------------------------------------------------------------
# actor_critic_loss


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("baseline_cost, entropy_cost", [(0.5, 0.01), (0.25, 0.03)])
def test_actor_critic_loss_matches_formula(batch, reduction, baseline_cost, entropy_cost):
    lp = np_log_softmax(batch["logits"])
    policy = -(chosen_log_probs(batch["logits"], batch["actions"]) * batch["adv"]).sum()
    baseline = 0.5 * ((batch["vs"] - batch["values"]) ** 2).sum()
    entropy = (np.exp(lp) * lp).sum()  # negative entropy
    scale = 1.0 if reduction == "sum" else 1.0 / (T * B)
    t = tensors(batch)
    got = losses.actor_critic_loss(
        t["logits"],
        t["values"],
        t["actions"],
        VTraceReturns(t["vs"], t["adv"]),
        baseline_cost=baseline_cost,
        entropy_cost=entropy_cost,
        reduction=reduction,
    )
    assert isinstance(got, losses.ActorCriticLoss)
    assert got.policy.item() == pytest.approx(policy * scale, rel=1e-12)
    assert got.baseline.item() == pytest.approx(baseline * scale, rel=1e-12)
    assert got.entropy.item() == pytest.approx(entropy * scale, rel=1e-12)
    total = (policy + baseline_cost * baseline + entropy_cost * entropy) * scale
    assert got.total.item() == pytest.approx(total, rel=1e-12)


def test_without_an_entropy_cost_the_entropy_is_reported_and_left_out_of_the_graph(batch):
    """entropy_cost 0 (CartPole's preset): the same total and gradient as the formula's, the
    entropy still reported, and no backward pass through it."""
    t = tensors(batch, grad=())
    logits, values = t["logits"].requires_grad_(), t["values"].requires_grad_()
    got = losses.actor_critic_loss(
        logits, values, t["actions"], VTraceReturns(t["vs"], t["adv"]), entropy_cost=0.0
    )
    lp = np_log_softmax(batch["logits"])
    assert got.entropy.item() == pytest.approx((np.exp(lp) * lp).sum(), rel=1e-12)
    assert got.entropy.grad_fn is None
    got.total.backward()
    # d total / d logits of policy + 0.5 baseline: -adv (onehot(a) - softmax) per step
    probs = np.exp(lp)
    onehot = np.eye(A)[batch["actions"]]
    want = -(batch["adv"][..., None]) * (onehot - probs)
    np.testing.assert_allclose(logits.grad.numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        values.grad.numpy(), -0.5 * (batch["vs"] - batch["values"]), rtol=1e-10, atol=1e-12
    )


def test_actor_critic_defaults_are_sum_and_paper_costs(batch):
    t = tensors(batch)
    returns = VTraceReturns(t["vs"], t["adv"])
    default = losses.actor_critic_loss(t["logits"], t["values"], t["actions"], returns)
    explicit = losses.actor_critic_loss(
        t["logits"],
        t["values"],
        t["actions"],
        returns,
        baseline_cost=0.5,
        entropy_cost=0.01,
        reduction="sum",
    )
    assert default.total.item() == explicit.total.item()


def test_mean_is_sum_over_t_times_b(batch):
    t = tensors(batch)
    returns = VTraceReturns(t["vs"], t["adv"])
    total_sum = losses.actor_critic_loss(t["logits"], t["values"], t["actions"], returns).total
    total_mean = losses.actor_critic_loss(
        t["logits"], t["values"], t["actions"], returns, reduction="mean"
    ).total
    assert total_mean.item() == pytest.approx(total_sum.item() / (T * B), rel=1e-12)


def test_actor_critic_gradients_flow_where_they_should(batch):
    """Policy and entropy terms: logits only. Baseline term: values only. V-trace targets and
    advantages: nothing (even when they require grad)."""
    t = tensors(batch, grad=("logits", "values", "vs", "adv"))
    got = losses.actor_critic_loss(
        t["logits"], t["values"], t["actions"], VTraceReturns(t["vs"], t["adv"])
    )
    inputs = (t["logits"], t["values"], t["vs"], t["adv"])

    def grads(term):
        return torch.autograd.grad(term, inputs, retain_graph=True, allow_unused=True)

    g_logits, g_values, g_vs, g_adv = grads(got.policy)
    assert g_logits is not None and g_values is None and g_vs is None and g_adv is None
    g_logits, g_values, g_vs, g_adv = grads(got.baseline)
    assert g_logits is None and g_values is not None and g_vs is None and g_adv is None
    g_logits, g_values, g_vs, g_adv = grads(got.entropy)
    assert g_logits is not None and g_values is None and g_vs is None and g_adv is None
    g_logits, g_values, g_vs, g_adv = grads(got.total)
    assert g_vs is None and g_adv is None


def test_actor_critic_end_to_end_with_vtrace(batch):
    """from_logits targets feed the loss; the value gradient is (V - vs) * baseline_cost, i.e. the
    targets stay constants although computed from the same values."""
    rng = np.random.default_rng(4)
    t = tensors(batch)
    behaviour = torch.from_numpy(rng.normal(size=(T, B, A)))
    discounts = torch.full((T, B), 0.9, dtype=torch.float64)
    rewards = torch.from_numpy(rng.normal(size=(T, B)))
    bootstrap = torch.from_numpy(rng.normal(size=B))
    returns = vtrace.from_logits(
        behaviour, t["logits"], t["actions"], discounts, rewards, t["values"], bootstrap
    )
    got = losses.actor_critic_loss(
        t["logits"],
        t["values"],
        t["actions"],
        VTraceReturns(returns.vs, returns.pg_advantages),
        baseline_cost=0.5,
    )
    got.total.backward()
    np.testing.assert_allclose(
        t["values"].grad.numpy(), 0.5 * (batch["values"] - returns.vs.numpy()), rtol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# discounted_returns


def test_discounted_returns_matches_loop_with_episode_ends():
    rng = np.random.default_rng(2)
    T_, B_ = 9, 4
    rewards = rng.normal(size=(T_, B_))
    discounts = np.where(rng.random((T_, B_)) < 0.3, 0.0, 0.9)
    discounts[3, 0] = 0.0
    bootstrap = rng.normal(size=B_)
    expected = np.zeros((T_, B_))
    for b in range(B_):
        for t in range(T_):
            g, weight = 0.0, 1.0
            for k in range(t, T_):
                g += weight * rewards[k, b]
                weight *= discounts[k, b]
            expected[t, b] = g + weight * bootstrap[b]
    got = losses.discounted_returns(*[torch.from_numpy(x) for x in (rewards, discounts, bootstrap)])
    assert got.shape == (T_, B_) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Monte-Carlo: with discount 0 at step 3 of column 0, steps 0..3 ignore everything later
    later = rewards.copy()
    later[4:, 0] += 100.0
    bootstrap_changed = bootstrap.copy()
    bootstrap_changed[0] += 100.0
    again = losses.discounted_returns(
        *[torch.from_numpy(x) for x in (later, discounts, bootstrap_changed)]
    )
    assert torch.equal(again[:4, 0], got[:4, 0])


def test_discounted_returns_carry_no_gradient():
    rewards = torch.randn(4, 2, requires_grad=True)
    bootstrap = torch.randn(2, requires_grad=True)
    got = losses.discounted_returns(rewards, torch.full((4, 2), 0.9), bootstrap)
    assert not got.requires_grad and got.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# reinforce_loss (the seed)


@pytest.mark.parametrize("leading", [(32,), (4, 3)], ids=["N", "TxB"])
def test_reinforce_loss_is_the_seed_formula(leading):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(*leading, 2))
    values = rng.normal(size=leading)
    actions = rng.integers(0, 2, size=leading)
    returns = rng.normal(size=leading) * 5
    log_pi = chosen_log_probs(logits, actions)
    policy = -(log_pi * (returns - values)).mean()
    baseline = (0.5 * (returns - values) ** 2).mean()
    got = losses.reinforce_loss(*[torch.from_numpy(x) for x in (logits, values, actions, returns)])
    assert isinstance(got, losses.ReinforceLoss)
    assert got.policy.item() == pytest.approx(policy, rel=1e-12)
    assert got.baseline.item() == pytest.approx(baseline, rel=1e-12)
    assert got.total.item() == pytest.approx(0.5 * policy + 0.4 * baseline, rel=1e-12)
    weighted = losses.reinforce_loss(
        *[torch.from_numpy(x) for x in (logits, values, actions, returns)],
        policy_weight=1.0,
        baseline_weight=2.0,
    )
    assert weighted.total.item() == pytest.approx(policy + 2.0 * baseline, rel=1e-12)


def test_reinforce_gradients():
    """The advantage is detached in the policy term: the baseline learns from its own term only,
    and that term does not touch the logits."""
    rng = np.random.default_rng(5)
    N = 16
    logits = torch.from_numpy(rng.normal(size=(N, 3))).requires_grad_()
    values = torch.from_numpy(rng.normal(size=N)).requires_grad_()
    returns = torch.from_numpy(rng.normal(size=N)).requires_grad_()
    actions = torch.from_numpy(rng.integers(0, 3, size=N))
    got = losses.reinforce_loss(logits, values, actions, returns)
    g = torch.autograd.grad(
        got.policy, (logits, values, returns), retain_graph=True, allow_unused=True
    )
    assert g[0] is not None and g[1] is None and g[2] is None
    g = torch.autograd.grad(got.baseline, (logits, values, returns), allow_unused=True)
    assert g[0] is None and g[2] is None
    np.testing.assert_allclose(g[1].numpy(), (values - returns).detach().numpy() / N, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_reduction_raises(batch):
    t = tensors(batch)
    with pytest.raises(ValueError, match="reduction"):
        losses.actor_critic_loss(
            t["logits"],
            t["values"],
            t["actions"],
            VTraceReturns(t["vs"], t["adv"]),
            reduction="max",
        )


@pytest.mark.parametrize(
    "call, message",
    [
        pytest.param(
            lambda t: losses.policy_gradient_loss(t["logits"], t["actions"][:2], t["adv"]),
            r"actions shape \(2, 3\)",
            id="pg-actions",
        ),
        pytest.param(
            lambda t: losses.policy_gradient_loss(t["logits"], t["actions"], t["adv"][:, :1]),
            r"advantages shape \(5, 1\)",
            id="pg-advantages",
        ),
        pytest.param(
            lambda t: losses.policy_gradient_loss(t["logits"][0], t["actions"][0], t["adv"][0]),
            "target_logits must be",
            id="pg-rank",
        ),
        pytest.param(
            lambda t: losses.baseline_loss(t["vs"][1:], t["values"]),
            r"vs shape \(4, 3\)",
            id="baseline",
        ),
        pytest.param(
            lambda t: losses.entropy_loss(t["logits"][0]),
            "target_logits must be",
            id="entropy-rank",
        ),
        pytest.param(
            lambda t: losses.actor_critic_loss(
                t["logits"], t["values"][:, :2], t["actions"], VTraceReturns(t["vs"], t["adv"])
            ),
            "values shape",
            id="ac-values",
        ),
        pytest.param(
            lambda t: losses.actor_critic_loss(
                t["logits"], t["values"], t["actions"], VTraceReturns(t["vs"][:1], t["adv"])
            ),
            "vtrace_returns.vs shape",
            id="ac-vs",
        ),
        pytest.param(
            lambda t: losses.discounted_returns(t["vs"], t["adv"][:2], t["values"][0]),
            "discounts shape",
            id="returns-discounts",
        ),
        pytest.param(
            lambda t: losses.discounted_returns(t["vs"], t["adv"], t["values"][:, 0]),
            "bootstrap_value shape",
            id="returns-bootstrap",
        ),
        pytest.param(
            lambda t: losses.reinforce_loss(t["logits"], t["values"], t["actions"], t["vs"][:2]),
            "returns shape",
            id="reinforce-returns",
        ),
        pytest.param(
            lambda t: losses.reinforce_loss(t["logits"], t["values"][0], t["actions"], t["vs"]),
            "values shape",
            id="reinforce-values",
        ),
    ],
)
def test_shape_errors_name_the_argument(batch, call, message):
    with pytest.raises(ValueError, match=message):
        call(tensors(batch))


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_the_learner_weights_the_entropy_by_its_schedule(schedule):
    from test_appo import cartpole_batch, make_learner

    cost = 0.1
    learner = make_learner(loss="impala", entropy_cost=cost, entropy_schedule=schedule)
    batch = cartpole_batch(np.random.default_rng(0))
    for progress in (0.0, 0.25, 0.9):
        m = learner.update(batch, int(progress * learner.total_steps))
        weight = cost * (1 - progress) if schedule == "linear" else cost
        expected = m["policy_loss"] + 0.5 * m["baseline_loss"] + weight * m["entropy_loss"]
        assert m["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert m.get("entropy_cost", cost) == pytest.approx(weight)
