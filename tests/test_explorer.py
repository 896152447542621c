"""The explorer role in isolation: unroll layout, policy versions and episode ends."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from impala.agent import Explorer, ParameterStore, rollout_spec
from impala.agent.buffer import allocate, numpy_views
from impala.envs import make_vector_env, probe_env
from impala.nets import MLPNet, SeedNet

T = 7


def _explorer(env_id, num_envs, model, max_steps=None, algo="vtrace", sync="unroll", gamma=0.9):
    store = ParameterStore(*ParameterStore.allocate(model))
    vec = make_vector_env(env_id, num_envs, max_episode_steps=max_steps)
    exp = Explorer(0, vec, model, store, unroll_length=T, gamma=gamma, algo=algo, sync=sync, seed=3)
    return exp, store


def _slot(env_id, num_envs, max_steps=None):
    info = probe_env(env_id, max_episode_steps=max_steps)
    storage = allocate(rollout_spec(info, T, num_envs), 1)
    return storage, numpy_views(storage, 0)


def test_truncation_bootstraps_from_last_observation_not_next_episode():
    torch.manual_seed(0)
    model = MLPNet(4, 2, num_hidden=16)
    # value head with a large weight so that different observations give clearly different values
    torch.nn.init.normal_(model.value_head.weight, std=3.0)
    exp, _ = _explorer("CartPole-v1", 2, model, max_steps=5, gamma=0.9)
    _storage, out = _slot("CartPole-v1", 2, max_steps=5)
    exp.fill(out)
    # Episodes of 5 steps (CartPole cannot fail in 5 steps): truncated at t = 4
    disc, tv, obs, actions = out["discount"], out["truncation_value"], out["obs"], out["action"]
    assert np.allclose(disc[4], 0.0) and np.allclose(disc[[0, 1, 2, 3, 5, 6]], 0.9)
    assert np.all(tv[[0, 1, 2, 3, 5, 6]] == 0.0)
    # Replay the same actions in a fresh copy of env 0 to get the truncated episode's last obs.
    env = gym.make("CartPole-v1", max_episode_steps=5)
    env.reset(seed=3)
    for t in range(5):
        last_obs, *_ = env.step(int(actions[t, 0]))
    with torch.no_grad():
        v_last = model(torch.from_numpy(last_obs[None]))[1].item()
        v_next_first = model(torch.from_numpy(obs[5, :1]))[1].item()
    assert tv[4, 0] == pytest.approx(v_last, rel=1e-5)
    assert abs(v_last - v_next_first) > 1e-3  # the test can tell the two apart


def test_termination_has_zero_discount_and_no_bootstrap():
    torch.manual_seed(0)
    exp, _ = _explorer("CartPole-v1", 1, MLPNet(4, 2), gamma=0.99)
    info = probe_env("CartPole-v1")
    storage = allocate(rollout_spec(info, T, 1), 1)
    terminations = 0
    for _ in range(30):  # a random policy ends CartPole in ~20 steps
        out = numpy_views(storage, 0)
        exp.fill(out)
        ended = out["discount"][:, 0] == 0
        terminations += ended.sum()
        assert np.all(out["truncation_value"][ended] == 0)
    assert terminations > 0


def test_unroll_overlap_and_versions():
    """Unroll k+1 starts at the observation unroll k ended on (the bootstrap overlap); CartPole's
    observations all differ, so a copy from anywhere else would show."""
    torch.manual_seed(0)
    model = MLPNet(4, 2, num_hidden=8)
    exp, store = _explorer("CartPole-v1", 3, model)
    _storage, first = _slot("CartPole-v1", 3)
    _storage, second = _slot("CartPole-v1", 3)
    info = exp.fill(first)
    assert info.policy_version == 0 and np.all(first["policy_version"] == 0)
    store.publish(model)  # the learner moves on: version 1
    exp.fill(second)
    assert np.all(second["policy_version"] == 1)
    assert np.array_equal(first["obs"][T], second["obs"][0])
    assert not np.array_equal(first["obs"][T - 1], second["obs"][0])
    assert len({tuple(o) for o in first["obs"][:, 0]}) > T // 2  # observations do differ
    assert first["behaviour_logits"].shape == (T, 3, 2)


def test_sync_episode_refreshes_only_at_episode_start():
    """With the seed's rule mu is refreshed when an episode starts, not at unroll starts; with
    -m 4 an episode ends inside every 7-step unroll, so a never-refreshed mu would show."""
    model = SeedNet(10)
    exp, store = _explorer("ShortCorridor-v0", 1, model, max_steps=4, sync="episode")
    _storage, out = _slot("ShortCorridor-v0", 1, max_steps=4)
    for expected_new in (1, 2):
        store.publish(model)  # a new version while an episode is under way
        exp.fill(out)
        versions = out["policy_version"][:, 0]
        ended = out["discount"][:, 0] == 0
        assert ended.any()
        first_end = int(np.flatnonzero(ended)[0])
        assert np.all(versions[: first_end + 1] == expected_new - 1), versions
        assert versions[first_end + 1] == expected_new, versions
        for t in range(1, T):
            if versions[t] != versions[t - 1]:
                assert ended[t - 1], (t, versions, ended)


def test_reinforce_returns_are_discounted_episode_returns():
    """Each step's return is its reward plus gamma times the next step's return within its
    episode, and the goal step's is its reward (+1); reversed returns would break both."""
    gamma = 0.9
    model = SeedNet(10)
    exp, _ = _explorer("ShortCorridor-v0", 2, model, max_steps=100, algo="reinforce", gamma=gamma)
    rewards, returns = [], []
    for _ in range(6):  # the finished steps run on from one unroll into the next
        _storage, out = _slot("ShortCorridor-v0", 2, max_steps=100)
        exp.fill(out)
        rewards.append(out["reward"].reshape(-1))  # episodes lie whole and in order
        returns.append(out["mc_return"].reshape(-1))
    rewards, returns = np.concatenate(rewards), np.concatenate(returns)
    goals = np.flatnonzero(rewards == 1.0)
    assert len(goals) >= 2
    for k in range(len(rewards) - 1):
        if rewards[k] == 1.0:
            assert returns[k] == pytest.approx(1.0)
        else:
            assert returns[k] == pytest.approx(rewards[k] + gamma * returns[k + 1], rel=1e-5)
    assert np.all(np.diff(returns[goals[0] + 1 : goals[1] + 1]) > 0)  # rises towards the goal


def test_seed_step_lines_follow_the_corridor():
    lines = []
    store = ParameterStore(*ParameterStore.allocate(SeedNet(10)))
    vec = make_vector_env("ShortCorridor-v0", 1, max_episode_steps=100)
    exp = Explorer(
        0, vec, SeedNet(10), store, unroll_length=T, gamma=0.9, seed=1, step_printer=lines.append
    )
    _, out = _slot("ShortCorridor-v0", 1, max_steps=100)
    for _ in range(6):
        exp.fill(out)
    assert len(lines) == 6 * T
    assert lines[0].startswith("explorer 0 env 0 step 1 state 0 action ")
    moves = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 0, (2, 0): 1, (2, 1): 3}
    for line in lines:
        words = line.split()
        state, action, nxt, terminal = int(words[7]), int(words[9]), int(words[12]), words[14]
        assert moves[(state, action)] == nxt, line
        assert (terminal == "True") == (nxt == 3), line


def test_parameter_store_versions_and_copies():
    model = SeedNet(4)
    store = ParameterStore(*ParameterStore.allocate(model))
    assert store.version == 0
    other = SeedNet(4)
    assert store.load_into(other, -1) == 0
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True)
    )
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert store.publish(model) == 1
    assert store.load_into(other, 1) is None  # nothing newer
    assert store.load_into(other, 0) == 1
    # a copy, not a view: the store's next write does not reach into the explorer's model
    before = [p.clone() for p in other.parameters()]
    store.assign(2, torch.zeros_like(store.flat))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_action_sampling_follows_the_policy():
    """The explorer's inverse-CDF sampling draws each action with its softmax probability."""
    model = SeedNet(4, obs_dim=1, num_actions=3)
    with torch.no_grad():
        model.hidden.weight.zero_()
        model.hidden.bias.fill_(1.0)
        model.out.weight.zero_()
        model.out.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.0]))  # logits 0, 1, -1; value 0
    exp, _ = _explorer("ShortCorridor-v0", 1, model)
    obs = np.ones((20_000, 1), dtype=np.float32)
    with torch.inference_mode():
        actions, logits = exp._act(obs)
    expected = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0).numpy()
    freq = np.bincount(actions, minlength=3) / len(actions)
    assert np.allclose(freq, expected, atol=0.012), (freq, expected)
    assert logits.shape == (20_000, 3)
