"""APPO (`--loss appo`): the clipped surrogate against an explicit float64 loop written from
PPO's eq. 7, its gradient case by case, and the learner's target network and circular buffer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from impala import losses, vtrace
from impala.agent.factory import build_model, settle
from impala.agent.learner import Learner, appo_target_due
from impala.agent.params import ParameterStore
from impala.config import resolve
from impala.envs import probe_env
from impala.errors import ConfigError
from impala.vtrace import VTraceReturns

T, B, A = 6, 4, 3
CLIP = 0.2


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def oracle(logits, reference, actions, adv, clip):
    """Loss and its gradient with respect to the logits, one step at a time."""
    loss, grad = 0.0, np.zeros_like(logits)
    lp, lp_ref = np_log_softmax(logits), np_log_softmax(reference)
    for t in range(logits.shape[0]):
        for b in range(logits.shape[1]):
            a = actions[t, b]
            r = np.exp(lp[t, b, a] - lp_ref[t, b, a])
            unclipped, clipped = r * adv[t, b], min(max(r, 1 - clip), 1 + clip) * adv[t, b]
            loss -= min(unclipped, clipped)
            if unclipped <= clipped:  # the unclipped term is the minimum: d r = r d log pi
                onehot = np.eye(logits.shape[-1])[a]
                grad[t, b] -= adv[t, b] * r * (onehot - np.exp(lp[t, b]))
    return loss, grad


@pytest.fixture
def case():
    """Logits near the reference and far from it, advantages of both signs: every branch of
    the min and the clip occurs."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(T, B, A))
    logits = reference + rng.normal(size=(T, B, A)) * np.linspace(0.0, 0.6, T)[:, None, None]
    return {
        "logits": logits,
        "reference": reference,
        "actions": rng.integers(0, A, size=(T, B)),
        "adv": rng.normal(size=(T, B)),
    }


def test_clipped_surrogate_matches_the_loop_oracle(case):
    ratio = np.exp(
        np.take_along_axis(np_log_softmax(case["logits"]), case["actions"][..., None], -1)
        - np.take_along_axis(np_log_softmax(case["reference"]), case["actions"][..., None], -1)
    )[..., 0]
    # the case reaches every branch: inside the range, clipped above and below, both signs
    assert ((ratio > 1 + CLIP) & (case["adv"] > 0)).any()
    assert ((ratio < 1 - CLIP) & (case["adv"] < 0)).any()
    assert ((ratio > 1 + CLIP) & (case["adv"] < 0)).any()
    assert (abs(ratio - 1) < CLIP).any()
    expected_loss, expected_grad = oracle(
        case["logits"], case["reference"], case["actions"], case["adv"], CLIP
    )
    logits = torch.tensor(case["logits"], requires_grad=True)
    reference = torch.tensor(case["reference"], requires_grad=True)
    adv = torch.tensor(case["adv"], requires_grad=True)
    loss = losses.clipped_surrogate_loss(
        logits, reference, torch.from_numpy(case["actions"]), adv, CLIP
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(logits.grad.numpy(), expected_grad, rtol=1e-10, atol=1e-14)
    assert reference.grad is None and adv.grad is None  # constants


def test_at_the_reference_the_gradient_is_the_policy_gradient(case):
    """pi = pi_target (a freshly refreshed target): the first step is IMPALA's."""
    actions, adv = torch.from_numpy(case["actions"]), torch.from_numpy(case["adv"])
    a = torch.tensor(case["reference"], requires_grad=True)
    losses.clipped_surrogate_loss(a, a.detach().clone(), actions, adv, CLIP).backward()
    b = torch.tensor(case["reference"], requires_grad=True)
    losses.policy_gradient_loss(b, actions, adv).backward()
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_appo_loss_adds_the_baseline_and_entropy_terms(case, reduction):
    rng = np.random.default_rng(1)
    values, vs = rng.normal(size=(T, B)), rng.normal(size=(T, B))
    t = {k: torch.from_numpy(v) for k, v in case.items()}
    got = losses.appo_loss(
        t["logits"],
        t["reference"],
        torch.from_numpy(values),
        t["actions"],
        VTraceReturns(torch.from_numpy(vs), t["adv"]),
        clip=CLIP,
        baseline_cost=0.25,
        entropy_cost=0.03,
        reduction=reduction,
    )
    scale = 1.0 if reduction == "sum" else 1.0 / (T * B)
    policy = oracle(case["logits"], case["reference"], case["actions"], case["adv"], CLIP)[0]
    lp = np_log_softmax(case["logits"])
    baseline, entropy = 0.5 * ((vs - values) ** 2).sum(), (np.exp(lp) * lp).sum()
    assert got.policy.item() == pytest.approx(policy * scale, rel=1e-12)
    assert got.baseline.item() == pytest.approx(baseline * scale, rel=1e-12)
    assert got.entropy.item() == pytest.approx(entropy * scale, rel=1e-12)
    total = (policy + 0.25 * baseline + 0.03 * entropy) * scale
    assert got.total.item() == pytest.approx(total, rel=1e-12)


def test_reference_of_another_shape_is_named(case):
    t = {k: torch.from_numpy(v) for k, v in case.items()}
    with pytest.raises(ValueError, match="reference_logits shape"):
        losses.clipped_surrogate_loss(t["logits"], t["reference"][1:], t["actions"], t["adv"], 0.2)


# ---------------------------------------------------------------------------------------------
# The learner: target network and circular buffer


def cartpole_batch(rng: np.random.Generator, T_: int = 5, B_: int = 4) -> dict[str, torch.Tensor]:
    return {
        "obs": torch.tensor(rng.normal(size=(T_ + 1, B_, 4)), dtype=torch.float32),
        "action": torch.tensor(rng.integers(0, 2, size=(T_, B_))),
        "behaviour_logits": torch.tensor(rng.normal(size=(T_, B_, 2)), dtype=torch.float32),
        "reward": torch.tensor(rng.normal(size=(T_, B_)), dtype=torch.float32),
        "discount": torch.full((T_, B_), 0.99),
        "truncation_value": torch.zeros(T_, B_),
        "policy_version": torch.zeros(B_, dtype=torch.int64),
    }


def make_learner(**settings) -> Learner:
    cfg = resolve({"env": "CartPole-v1", "loss": "appo", **settings})
    cfg = settle(cfg, probe_env(cfg.env, **cfg.env_options))
    torch.manual_seed(0)
    model = build_model(cfg, probe_env(cfg.env, **cfg.env_options))
    return Learner(cfg, model, ParameterStore(*ParameterStore.allocate(model)))


def flat(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def test_target_network_follows_pi_every_interval_updates():
    learner = make_learner(appo_target_interval=3)
    rng = np.random.default_rng(0)
    start = flat(learner.model)
    for update in range(1, 8):
        learner.learn(cartpole_batch(rng))
        refreshed = update - update % 3  # the update after which it was last copied
        assert torch.equal(flat(learner.target), flat(learner.model)) == (update % 3 == 0)
        if refreshed == 0:
            assert torch.equal(flat(learner.target), start)


def test_a_growing_interval_refreshes_at_powers_of_two_of_the_updates_fraction():
    """--appo-target-growth 0.25: refreshed after each of updates 1..8, then every 2 up to 16
    updates (0.25 u is 2 to 4), every 4 up to 32, ..., never more than the cap apart; against a
    stepwise loop over the rule as the help text words it."""
    growth, cap = 0.25, 16
    due = [u for u in range(1, 200) if appo_target_due(u, cap, growth)]
    expected = []
    for u in range(1, 200):
        interval = 1
        while interval * 2 <= growth * u:
            interval *= 2
        interval = min(interval, cap)
        if u % interval == 0:
            expected.append(u)
    assert due == expected
    assert due[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 10] and 18 not in due and 20 in due
    assert max(b - a for a, b in zip(due, due[1:], strict=False)) == cap
    assert [u for u in range(1, 50) if appo_target_due(u, 7, 0.0)] == [7, 14, 21, 28, 35, 42, 49]


def test_learner_refreshes_on_the_growing_schedule():
    learner = make_learner(appo_target_interval=4, appo_target_growth=0.5)
    rng = np.random.default_rng(0)
    for update in range(1, 12):
        learner.learn(cartpole_batch(rng))
        same = torch.equal(flat(learner.target), flat(learner.model))
        assert same == appo_target_due(update, 4, 0.5), update


def test_vtrace_and_the_clip_use_the_target_policy(monkeypatch):
    """V-trace's target policy and the surrogate's reference are pi_target's logits, not pi's
    (they differ once pi has moved since the last refresh)."""
    learner = make_learner(appo_target_interval=100)
    rng = np.random.default_rng(1)
    learner.learn(cartpole_batch(rng))  # pi moves, the target stays at the start
    batch = cartpole_batch(rng)
    seen = {}
    real_appo = losses.appo_loss

    def spy(logits, reference, *args, **kwargs):
        seen["reference"] = reference
        return real_appo(logits, reference, *args, **kwargs)

    real_vtrace = vtrace.from_importance_weights

    def spy_vtrace(**kwargs):
        seen["log_rhos"] = kwargs["log_rhos"]
        return real_vtrace(**kwargs)

    monkeypatch.setattr(losses, "appo_loss", spy)
    monkeypatch.setattr(vtrace, "from_importance_weights", spy_vtrace)
    learner.update(batch)
    with torch.no_grad():
        expected = learner.target(batch["obs"].flatten(0, 1))[0].view(6, 4, 2)[:-1]
        pi_logits = learner.model(batch["obs"].flatten(0, 1))[0].view(6, 4, 2)[:-1]
    torch.testing.assert_close(seen["reference"], expected)
    log_mu = vtrace.action_log_probs(batch["behaviour_logits"], batch["action"])
    target_log_rhos = vtrace.action_log_probs(expected, batch["action"]) - log_mu
    torch.testing.assert_close(seen["log_rhos"], target_log_rhos)
    assert not torch.allclose(expected, pi_logits)


def test_passes_draw_from_a_circular_buffer_of_recent_batches():
    learner = make_learner(appo_passes=3, appo_buffer=2)
    rng = np.random.default_rng(2)
    batches = [cartpole_batch(rng) for _ in range(4)]
    seen = []
    real_update = learner.update
    learner.update = lambda batch, steps=0: seen.append(batch) or real_update(batch)
    for i, batch in enumerate(batches):
        metrics = learner.learn(batch)
        assert len(metrics) == 3 and all("clip_fraction" in m for m in metrics)
        recent = batches[max(0, i - 1) : i + 1]
        assert seen[-3] is batch  # the new batch first
        assert all(any(b is r for r in recent) for b in seen[-2:])
    assert learner.updates == 12
    # passes reach back to older batches (seeded draws), never beyond the buffer's two
    drawn = [(i // 3, next(j for j, b in enumerate(batches) if b is s)) for i, s in enumerate(seen)]
    assert all(j in (new, new - 1) for new, j in drawn)
    assert any(j == new - 1 for new, j in drawn)
    assert len(learner.passes.recent) == 2


def test_appo_needs_vtrace_and_a_clip_below_one():
    with pytest.raises(ConfigError, match="--loss appo needs --algo vtrace"):
        resolve({"env": "CartPole-v1", "loss": "appo", "algo": "reinforce"})
    with pytest.raises(ConfigError, match="--appo-clip must be in"):
        dataclasses.replace(resolve({"env": "CartPole-v1"}), appo_clip=1.5)
