import gymnasium as gym
import numpy as np
import pytest

from impala.envs import CORRIDOR_ID, make_env, optimal_right_probability, probe_env
from impala.errors import ConfigError


def test_corridor_dynamics_switched_state():
    env = make_env(CORRIDOR_ID)
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [1.0]
    # left in state 0 stays in 0
    _, r, term, trunc, info = env.step(0)
    assert (info["state"], r, term, trunc) == (0, -1.0, False, False)
    # right from 0 -> 1
    assert env.step(1)[4]["state"] == 1
    # in state 1 actions are switched: right -> 0
    assert env.step(1)[4]["state"] == 0
    env.step(1)
    # left in state 1 -> 2
    assert env.step(0)[4]["state"] == 2
    # left in 2 -> 1, right in 2 -> goal
    assert env.step(0)[4]["state"] == 1
    env.step(0)
    obs, r, term, trunc, info = env.step(1)
    assert (info["state"], r, term) == (3, 1.0, True)
    assert obs.tolist() == [1.0]


def test_corridor_time_limit_truncates():
    env = make_env(CORRIDOR_ID, max_episode_steps=3)
    env.reset(seed=0)
    for _ in range(2):
        assert env.step(0)[3] is False
    _, _, term, trunc, _ = env.step(0)
    assert (term, trunc) == (False, True)


def test_optimal_right_probability_matches_book():
    assert optimal_right_probability(1.0) == pytest.approx(2 - np.sqrt(2), abs=2e-3)
    assert optimal_right_probability(0.97) == pytest.approx(0.589, abs=3e-3)


def test_probe_cartpole():
    info = probe_env("CartPole-v1")
    assert info.obs_shape == (4,) and info.num_actions == 2 and info.max_episode_steps == 500


def test_unknown_env_id_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown environment id 'CartPol-v1'.*CartPole-v1"):
        make_env("CartPol-v1")


def test_action_spaces_taken_and_refused():
    box = probe_env("Pendulum-v1").action
    assert (box.kind, box.low, box.high, box.params_size) == ("box", (-2.0,), (2.0,), 2)
    import envs_for_tests  # noqa: F401  (registers the test environments)

    multi = probe_env("MatchDigits-v0").action
    assert (multi.kind, multi.nvec, multi.params_size, multi.action_shape) == (
        "multi_discrete",
        (3, 3),
        6,
        (2,),
    )
    with pytest.raises(ConfigError, match="MultiBinaryActions-v0.*MultiBinary.*no policy"):
        make_env("MultiBinaryActions-v0")


def test_corridor_registered_with_gymnasium():
    make_env(CORRIDOR_ID).close()
    assert CORRIDOR_ID in gym.registry
