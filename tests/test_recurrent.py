"""The LSTM core and the exactness of the whole path from explorer to learner.

Exactness: with the weights unchanged, the learner's forward pass over a batch made of the
explorer's unrolls gives back the explorer's behaviour logits, for feed-forward and LSTM
networks, on Pong and MinAtar, with episodes ending inside unrolls and across unroll boundaries.
Any slip in the plumbing (an observation off by one step, a state not carried or not reset, a
last action or reward misaligned, columns mixed up in the batch) breaks it.
"""

import dataclasses

import pytest
import torch

from impala.agent import Learner, ParameterStore, rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.agent.factory import build_explorer, build_model
from impala.config import resolve
from impala.envs import probe_env
from impala.nets import RecurrentNet
from impala.nets.mlp import MLPTorso


def _net(num_actions=3, obs_dim=4, core_size=8):
    torch.manual_seed(0)
    return RecurrentNet(MLPTorso(obs_dim, num_hidden=6), num_actions, core_size=core_size)


def _inputs(T, B, obs_dim=4, num_actions=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, B, obs_dim, generator=g),
        torch.randint(num_actions, (T, B), generator=g),
        torch.randn(T, B, generator=g) * 3,
        torch.zeros(T, B, dtype=torch.bool),
    )


def test_lstm_unroll_equals_step_by_step_and_carries_its_state():
    net = _net()
    obs, act, rew, first = _inputs(7, 5)
    state = net.initial_state(5)
    whole_logits, whole_values, whole_state = net.unroll(obs, act, rew, first, state)
    # One step at a time, the state handed on.
    s = state
    for t in range(7):
        logits, values, s = net.unroll(
            obs[t : t + 1], act[t : t + 1], rew[t : t + 1], first[t : t + 1], s
        )
        torch.testing.assert_close(logits[0], whole_logits[t])
        torch.testing.assert_close(values[0], whole_values[t])
    torch.testing.assert_close(s, whole_state)
    # Two unrolls, the second from the first's state: the same as one.
    _, _, mid = net.unroll(obs[:3], act[:3], rew[:3], first[:3], state)
    logits, _, _ = net.unroll(obs[3:], act[3:], rew[3:], first[3:], mid)
    torch.testing.assert_close(logits, whole_logits[3:])
    # ...and not the same from a fresh state: the state matters.
    fresh, _, _ = net.unroll(obs[3:], act[3:], rew[3:], first[3:], net.initial_state(5))
    assert not torch.allclose(fresh, whole_logits[3:])


def test_lstm_state_is_reset_where_an_episode_starts():
    net = _net()
    obs, act, rew, first = _inputs(6, 4)
    first[3, 1] = True  # column 1 starts an episode at t = 3
    state = tuple(torch.randn(4, 8) for _ in range(2))
    logits, _, _ = net.unroll(obs, act, rew, first, state)
    # From t = 3 column 1 is what a fresh start (zero state) gives, whatever came before.
    fresh, _, _ = net.unroll(obs[3:], act[3:], rew[3:], first[3:], net.initial_state(4))
    torch.testing.assert_close(logits[3:, 1], fresh[:, 1])
    assert not torch.allclose(logits[3:, 0], fresh[:, 0])  # the others carry on
    # A reset at t = 0 ignores the state given.
    first[0] = True
    a, _, _ = net.unroll(obs, act, rew, first, state)
    b, _, _ = net.unroll(obs, act, rew, first, net.initial_state(4))
    torch.testing.assert_close(a, b)


def test_lstm_input_has_the_one_hot_last_action_and_the_clipped_last_reward():
    net = _net()
    obs, act, rew, first = _inputs(1, 2)
    state = net.initial_state(2)
    base, _, _ = net.unroll(obs, act, rew.sign(), first, state)
    torch.testing.assert_close(net.unroll(obs, act, rew.sign() * 7, first, state)[0], base)
    assert not torch.allclose(net.unroll(obs, act, rew.sign() * 0.5, first, state)[0], base)
    other = (act + 1) % 3
    assert not torch.allclose(net.unroll(obs, other, rew, first, state)[0], base)
    torch.testing.assert_close(
        net.core.weight_ih.shape, torch.Size([4 * 8, 6 + 3 + 1])
    )  # features + one-hot actions + reward


def _exact_config(env_id, core, **overrides):
    return resolve(
        dict(
            env=env_id,
            core=core,
            core_size=32,
            unroll_length=8,
            envs_per_explorer=3,
            batch_size=3,
            precision="fp32",
            explorer_precision="fp32",  # the learner recomputes what the explorer computed
            **overrides,
        )
    )


@pytest.mark.parametrize("core", ["ff", "lstm"])
@pytest.mark.parametrize(
    "env_id, overrides",
    [
        ("MinAtar/Breakout-v1", {}),  # episodes of 10-30 steps at random
        ("PongNoFrameskip-v4", {"max_steps_per_episode": 11}),  # truncated every 11 steps
        # Continuous (a Gaussian's means and log-stds) and multi-discrete actions (two
        # categoricals): the LSTM takes the last action's features, not a one-hot.
        ("Pendulum-v1", {"max_steps_per_episode": 11}),
        ("MatchDigits-v0", {}),  # episodes of 10 steps
    ],
)
def test_learner_recomputes_the_explorers_behaviour_logits(env_id, overrides, core):
    import envs_for_tests  # noqa: F401  (registers MatchDigits-v0)

    cfg = _exact_config(env_id, core, **overrides)
    env = probe_env(cfg.env, **cfg.env_options)
    torch.manual_seed(0)
    model = build_model(cfg, env)
    store = ParameterStore(*ParameterStore.allocate(model))
    learner = Learner(cfg, model, store)
    explorer = build_explorer(cfg, env, 0, store)
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
    num_unrolls = 5
    storage = allocate(spec, num_unrolls)
    for slot in range(num_unrolls):
        explorer.fill(numpy_views(storage, slot))
    if env.is_image:
        assert storage["obs"].dtype == torch.uint8  # frames stay compact up to the learner
        # reordered once, in the explorer: it acts on them channels-last and stores them so
        assert torch.from_numpy(explorer.obs).is_contiguous(memory_format=torch.channels_last)
    batch = slots_to_batch(storage, list(range(num_unrolls)), "vtrace")
    discounts = batch["discount"]
    assert (discounts[1:] == 0).any(), "no episode ended inside an unroll"
    if core == "lstm":  # later unrolls start from the state the previous one left
        assert batch["core_h"][cfg.envs_per_explorer :].abs().sum() > 0
    with torch.no_grad():
        logits, _ = learner._forward(batch)
    torch.testing.assert_close(logits[:-1], batch["behaviour_logits"], rtol=1e-5, atol=1e-5)
    if core == "lstm":  # and the check is sharp: a state not carried is seen
        broken = dict(batch, core_h=torch.zeros_like(batch["core_h"]))
        with torch.no_grad():
            wrong, _ = learner._forward(broken)
        assert not torch.allclose(wrong[:-1], batch["behaviour_logits"], atol=1e-4)


def test_recurrent_batches_from_the_replay_buffer_keep_the_state_with_its_column():
    cfg = _exact_config("CartPoleNoVelocity-v1", "lstm", buffer="replay", learn_batch_size=16)
    env = probe_env(cfg.env)
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
    assert spec["core_h"][0] == (3, 32) and spec["first"][0] == (9, 3)
    from impala.agent import ReplayBuffer

    storage = allocate(spec, 2)
    storage["core_h"][...] = torch.arange(6.0).view(2, 3, 1)
    storage["prev_action"][...] = torch.arange(6).view(2, 1, 3)
    buffer = ReplayBuffer(storage, torch.tensor([2]), 2)
    batch = buffer.sample(16, "vtrace", torch.Generator().manual_seed(0))
    assert batch["core_h"].shape == (2, 32) and batch["prev_action"].shape == (9, 2)
    # A column's state and its inputs come from the same slot and environment.
    torch.testing.assert_close(batch["core_h"][:, 0].long(), batch["prev_action"][0])


def test_auto_network_is_resolved_by_observation_type():
    from impala.agent.factory import settle

    for env_id, net in [
        ("CartPole-v1", "mlp"),
        ("MinAtar/Breakout-v1", "minatar"),
        ("ALE/Pong-v5", "shallow"),
    ]:
        cfg = dataclasses.replace(resolve(dict(env=env_id)), net="auto")
        assert settle(cfg, probe_env(env_id)).net == net


def test_a_recurrent_explorer_bootstraps_a_truncation_from_the_episodes_own_state():
    """Where an episode is truncated, the explorer records V(x_last) of its last observation, and
    with an LSTM that value must come from the state the episode built up (fed its last action
    and reward), not from a reset state, which a mutation of the explorer got away with. The
    oracle replays each truncated episode's column through the network, from the unroll's
    recorded start state and inputs, then steps once more on the last observation."""
    cfg = _exact_config("CartPoleNoVelocity-v1", "lstm", max_steps_per_episode=5)
    env = probe_env(cfg.env, **cfg.env_options)
    torch.manual_seed(0)
    model = build_model(cfg, env)
    store = ParameterStore(*ParameterStore.allocate(model))
    explorer = build_explorer(cfg, env, 0, store)
    finals = {}  # (env step of the explorer, environment) -> the observation it ended on
    real_step = explorer.vec_env.step

    def step(actions):
        out = real_step(actions)
        truncated = out[3]
        for e in map(int, truncated.nonzero()[0]):
            finals[(explorer.steps_made // cfg.envs_per_explorer, e)] = out[4]["final_obs"][e]
        return out

    explorer.vec_env.step = step
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
    storage = allocate(spec, 2)
    checked = 0
    for slot in range(2):
        start = explorer.steps_made // cfg.envs_per_explorer
        explorer.fill(numpy_views(storage, slot))
        u = {k: v[slot] for k, v in storage.items()}
        for (step_index, e), final in finals.items():
            t = step_index - start
            if not 0 <= t < cfg.unroll_length:
                continue
            obs = torch.cat([u["obs"][: t + 1, e], torch.as_tensor(final)[None]])
            prev_action = torch.cat(
                [u["prev_action"][: t + 1, e], u["prev_action"][t + 1, e][None]]
            )
            prev_reward = torch.cat(
                [u["prev_reward"][: t + 1, e], u["prev_reward"][t + 1, e][None]]
            )
            first = torch.cat([u["first"][: t + 1, e], torch.zeros(1, dtype=torch.bool)])
            state = (u["core_h"][e][None], u["core_c"][e][None])
            with torch.no_grad():
                _, values, _ = model.unroll(
                    obs[:, None], prev_action[:, None], prev_reward[:, None], first[:, None], state
                )
            assert u["discount"][t, e] == 0
            assert u["truncation_value"][t, e].item() == pytest.approx(
                values[-1, 0].item(), abs=1e-5
            )
            checked += 1
    explorer.vec_env.close()
    assert checked >= 3
