"""The paper's off-policy corrections (Table 2) on a case worked out by hand, the learner's
replay share (--replay-fraction) and its policy-lag limit (--max-policy-lag)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from test_appo import make_learner

from impala import corrections, losses
from impala.agent.buffer import SequenceReplay, join_sequences, select_sequences
from impala.config import batch_note, resolve
from impala.errors import ConfigError

# T = 2, B = 1: rewards 1, 2; discounts 0.9, 0.9; V(x_0) = 0.5, V(x_1) = 1, V(x_2) = 2;
# pi/mu = 2 at t = 0 and 0.5 at t = 1.
CASE = dict(
    log_rhos=torch.tensor([[math.log(2.0)], [math.log(0.5)]], dtype=torch.float64),
    discounts=torch.tensor([[0.9], [0.9]], dtype=torch.float64),
    rewards=torch.tensor([[1.0], [2.0]], dtype=torch.float64),
    values=torch.tensor([[0.5], [1.0]], dtype=torch.float64),
    bootstrap_value=torch.tensor([2.0], dtype=torch.float64),
)
# By hand:
# no correction: v_1 = 2 + 0.9 * 2 = 3.8, v_0 = 1 + 0.9 * 3.8 = 4.42; advantages
#   r_0 + 0.9 v_1 - V_0 = 3.92, r_1 + 0.9 * 2 - V_1 = 2.8.
# 1-step IS: the same v; advantages 2 * 3.92 = 7.84, 0.5 * 2.8 = 1.4.
# V-trace (rho-bar = c-bar = 1): rho = c = (1, 0.5); delta_1 = 0.5 * (2 + 1.8 - 1) = 1.4,
#   v_1 = 1 + 1.4 = 2.4; delta_0 = 1 * (1 + 0.9 - 0.5) = 1.4, v_0 = 0.5 + 1.4 + 0.9 * 1 * 1.4 =
#   3.16; advantages 1 * (1 + 0.9 * 2.4 - 0.5) = 2.66, 0.5 * (2 + 1.8 - 1) = 1.4.
EXPECTED = {
    "none": ([4.42, 3.8], [3.92, 2.8]),
    "epsilon": ([4.42, 3.8], [3.92, 2.8]),
    "is1": ([4.42, 3.8], [7.84, 1.4]),
    "vtrace": ([3.16, 2.4], [2.66, 1.4]),
}


@pytest.mark.parametrize("correction", list(EXPECTED))
def test_each_correction_on_a_case_worked_out_by_hand(correction):
    out = corrections.off_policy_returns(correction, **CASE)
    vs, advantages = EXPECTED[correction]
    np.testing.assert_allclose(out.vs[:, 0].numpy(), vs, rtol=1e-12)
    np.testing.assert_allclose(out.pg_advantages[:, 0].numpy(), advantages, rtol=1e-12)


def test_epsilon_correction_adds_epsilon_inside_the_log():
    logits = torch.tensor([[[0.0, -30.0]]], dtype=torch.float64, requires_grad=True)
    action, advantage = torch.tensor([[1]]), torch.tensor([[1.5]], dtype=torch.float64)
    loss = losses.policy_gradient_loss(logits, action, advantage, log_epsilon=1e-6)
    p = torch.softmax(logits, -1)[0, 0, 1]
    assert loss.item() == pytest.approx(-1.5 * math.log(p.item() + 1e-6), rel=1e-12)
    plain = losses.policy_gradient_loss(logits, action, advantage)
    assert plain.item() == pytest.approx(-1.5 * math.log(p.item()), rel=1e-9)
    # The gradient of log(pi + eps) is damped by pi / (pi + eps): tiny for a tiny pi.
    (grad,) = torch.autograd.grad(loss, logits)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    ratio = (p / (p + 1e-6)).item()
    torch.testing.assert_close(grad, plain_grad * ratio)


def test_the_learner_uses_the_chosen_correction(monkeypatch):
    seen = []
    real = corrections.off_policy_returns

    def spy(correction, **kwargs):
        seen.append(correction)
        return real(correction, **kwargs)

    epsilons = []
    real_loss = losses.actor_critic_loss

    def spy_loss(*args, **kwargs):
        epsilons.append(kwargs["log_epsilon"])
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(corrections, "off_policy_returns", spy)
    monkeypatch.setattr(losses, "actor_critic_loss", spy_loss)
    for correction in ("none", "epsilon", "is1", "vtrace"):
        learner = make_learner(loss="impala", correction=correction)
        learner.learn(_batch(np.random.default_rng(0)))
    assert seen == ["none", "epsilon", "is1", "vtrace"]
    assert epsilons == [None, corrections.EPSILON, None, None]


def _batch(rng, B=4, T=5, versions=None, tag=0.0):
    """A CartPole-shaped V-trace batch; column b's observations are all tag + b."""
    versions = np.zeros(B, np.int64) if versions is None else np.asarray(versions)
    return {
        "obs": torch.full((T + 1, B, 4), tag) + torch.arange(B, dtype=torch.float32)[:, None],
        "action": torch.tensor(rng.integers(0, 2, size=(T, B))),
        "behaviour_logits": torch.tensor(rng.normal(size=(T, B, 2)), dtype=torch.float32),
        "reward": torch.tensor(rng.normal(size=(T, B)), dtype=torch.float32),
        "discount": torch.full((T, B), 0.99),
        "truncation_value": torch.zeros(T, B),
        "policy_version": torch.tensor(np.tile(versions, (T, 1))),
    }


@pytest.mark.parametrize("fraction, fresh, replayed", [(0.5, 4, 4), (0.25, 6, 2), (0.2, 8, 2)])
def test_replay_share_of_each_batch_is_as_asked(fraction, fresh, replayed, monkeypatch):
    learner = make_learner(loss="impala", replay_fraction=fraction, replay_size=10)
    seen = []
    monkeypatch.setattr(learner, "update", lambda batch, steps=0: seen.append(batch) or {})
    rng = np.random.default_rng(0)
    for k in range(5):
        learner.learn(_batch(rng, B=fresh, tag=100.0 * k))
    assert seen[0]["obs"].shape[1] == fresh  # nothing to replay yet
    for k, batch in enumerate(seen[1:], start=1):
        tags = batch["obs"][0, :, 0]
        assert batch["obs"].shape[1] == fresh + replayed
        assert replayed / (fresh + replayed) == pytest.approx(fraction)
        torch.testing.assert_close(tags[:fresh], 100.0 * k + torch.arange(float(fresh)))
        # the replayed sequences are earlier batches' (the ring holds the last 10 sequences)
        earlier = {100.0 * j + b for j in range(k) for b in range(fresh)}
        assert set(tags[fresh:].tolist()) <= earlier
    assert learner.replay.size == 10


def test_the_lag_limit_holds_fresh_sequences_before_they_reach_the_replay(monkeypatch):
    learner = make_learner(loss="impala", replay_fraction=0.5, replay_size=50, max_policy_lag=2)
    learner.store.assign(10, learner.store.flat.clone())
    seen = []
    monkeypatch.setattr(learner, "update", lambda batch, steps=0: seen.append(batch) or {})
    rng = np.random.default_rng(0)
    learner.learn(_batch(rng, B=4, versions=[10, 9, 3, 2], tag=0.0))  # two stale
    learner.learn(_batch(rng, B=2, versions=[10, 10], tag=100.0))
    assert learner.stale_sequences == 2 and learner.replay.size == 4
    # the replay holds only the fresh ones; what it gives back is not held to the limit again
    assert sorted(learner.replay.storage["obs"][:4, 0, 0].tolist()) == [0.0, 1.0, 100.0, 101.0]
    second = seen[1]["obs"][0, :, 0].tolist()
    assert second[:2] == [100.0, 101.0] and set(second[2:]) <= {0.0, 1.0}


def test_sequence_replay_ring_and_checkpoint_state():
    ring = SequenceReplay(3, 0.5, torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    ring.add(_batch(rng, B=2, tag=0.0))
    ring.add(_batch(rng, B=2, tag=10.0))  # overwrites the oldest: holds 10, 11 and 1
    assert sorted(ring.storage["obs"][:, 0, 0].tolist()) == [1.0, 10.0, 11.0]
    copy = SequenceReplay(3, 0.5, torch.Generator())
    copy.restore(ring.state())
    a, b = ring.sample(5), copy.sample(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    both = join_sequences(_batch(rng, B=2), a)
    assert both["obs"].shape[1] == 7 and both["policy_version"].shape == (5, 7)
    torch.testing.assert_close(select_sequences(both, torch.tensor([2, 3]))["obs"], a["obs"][:, :2])


def test_policy_lag_limit_drops_exactly_the_stale_sequences(monkeypatch):
    learner = make_learner(loss="impala", max_policy_lag=3)
    learner.store.assign(10, learner.store.flat.clone())  # the learner's policy is version 10
    seen = []
    real = learner.update
    monkeypatch.setattr(learner, "update", lambda batch, steps=0: seen.append(batch) or real(batch))
    rng = np.random.default_rng(0)
    batch = _batch(rng, B=6, versions=[10, 7, 6, 9, 2, 8])  # lags 0, 3, 4, 1, 8, 2
    batch["policy_version"][0, 1] = 6  # column 1 began with version 6: lag 4 at its oldest
    metrics = learner.learn(batch)
    kept = seen[0]["obs"][0, :, 0].tolist()
    assert kept == [0.0, 3.0, 5.0]
    assert learner.stale_sequences == 3 and metrics[0]["stale_sequences"] == 3
    # a batch with nothing fresh is no update at all
    updates = learner.updates
    assert learner.learn(_batch(rng, B=2, versions=[1, 2])) == []
    assert learner.updates == updates and learner.stale_sequences == 5


def test_an_unroll_wider_than_the_batch_is_learned_from_in_minibatches(monkeypatch):
    """--batch-size 2 with --envs-per-explorer 6: three updates, on sequences 0-1, 2-3, 4-5 in
    order, each after the one before (the weights move between them)."""
    learner = make_learner(loss="impala", batch_size=2, envs_per_explorer=6)
    seen, real = [], learner.update
    monkeypatch.setattr(
        learner,
        "update",
        lambda batch, steps=0: seen.append((batch, learner.updates)) or real(batch),
    )
    metrics = learner.learn(_batch(np.random.default_rng(0), B=6))
    assert len(metrics) == 3 and learner.updates == 3
    assert [batch["obs"][0, :, 0].tolist() for batch, _ in seen] == [[0, 1], [2, 3], [4, 5]]
    assert [updates for _, updates in seen] == [0, 1, 2]
    assert batch_note(learner.cfg) is None  # no note that the batch is rounded up to the unroll
    with pytest.raises(ConfigError, match=r"--batch-size \(4\) must be a multiple or a divisor"):
        resolve({"env": "CartPole-v1", "batch_size": 4, "envs_per_explorer": 6})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"replay_fraction": 1.0}, "--replay-fraction must be in [0, 1), got 1.0"),
        ({"replay_fraction": -0.1}, "--replay-fraction must be in [0, 1), got -0.1"),
        ({"max_policy_lag": -1}, "--max-policy-lag must be a non-negative integer"),
        ({"correction": "is1", "algo": "reinforce"}, "--correction is1 needs --algo vtrace"),
        ({"correction": "none", "loss": "appo"}, "--correction none needs --algo vtrace and --l"),
    ],
)
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve({"env": "CartPole-v1", **settings})


def test_a_correction_replaces_the_fallbacks_appo():
    assert resolve({"env": "Acrobot-v1"}).loss == "appo"
    assert resolve({"env": "Acrobot-v1", "correction": "is1"}).loss == "impala"
